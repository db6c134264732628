"""Re-encodes that do not block the host: the fused update's encode finishes one update later (``ENCODES``).

A fused update ends by re-encoding the weight's new value. The encoder needs the value's exponent histogram on the
host (to choose the fold, the frequency table and raw or coded), and on a GPU reading it back blocks the host until
the device has run everything queued: the backward ops so far and this update. Inside
:meth:`DeferredEncodes.deferring` (each fused optimizer's backward), :class:`~nz_lightning.tensor.store.WeightStore`
instead starts the encode with :func:`~nz_lightning.kernels.compress_async` (histogram queued, copied to pinned host
memory without blocking) and hands it to :data:`ENCODES`, which finishes it (table, encoder launch) once its
histogram has landed, or when more than :attr:`DeferredEncodes.depth` are pending, oldest first: by then the device
has the next weight's (or row block's) backward and update queued, so waiting for the older histogram does not leave
it idle. Every pending encode is finished when the backward ends, and a read of the store first finishes what it
reads: a row block's decode that block's pending encode, any other read (sizes, blobs, the block list) all of the
store's. The bytes are those of a synchronous encode: training is bit-identical.

Cost: each pending encode holds a private copy of the new value (one dense row block, made on the device) until it
finishes.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from nz_lightning.kernels import PendingCompress

if TYPE_CHECKING:
    from nz_lightning.tensor.store import WeightStore

__all__ = ["ENCODES", "DeferredEncodes"]


class DeferredEncodes:
    """The process-wide queue of re-encodes whose host read is deferred (see the module docstring).

    Attributes:
        depth: Most encodes left pending at once. ``None`` (default): 1 on CUDA, 0 elsewhere (on a CPU the histogram
            is on the host already, so deferring saves nothing and would hold a dense copy). 0 turns deferral off.
        deferred: Encodes started deferred so far.
        waited: Of those, finished before their histogram had landed (on CUDA: the host waited for the device),
            whatever finished them (the queue, a read of the store, the end of the backward).
        lock: Held while an encode is queued or finished.

    The queue is process-wide, not per thread: CUDA autograd runs the fused updates' hooks on a worker thread, not
    the thread that called ``backward``. So a store written from another thread during a fused backward is deferred
    too (and finished by the same rules).
    """

    def __init__(self) -> None:
        self.depth: int | None = None
        self.deferred = 0
        self.waited = 0
        self._active = 0
        self._queue: deque[tuple[weakref.ref[WeightStore], int, PendingCompress]] = deque()
        self.lock = threading.RLock()

    def depth_for(self, device: torch.device) -> int:
        """The pending encodes allowed for weights on ``device`` (:attr:`depth`, or its default)."""
        if self.depth is not None:
            return max(0, self.depth)
        return 1 if device.type == "cuda" else 0

    def defers(self, device: torch.device) -> bool:
        """Whether an encode on ``device`` started now is deferred (inside :meth:`deferring`, with a depth > 0)."""
        return self._active > 0 and self.depth_for(device) > 0

    def add(self, store: WeightStore, k: int, pending: PendingCompress) -> None:
        """Queue row block ``k`` of ``store``'s pending encode; finish the oldest ones that are ready or over depth."""
        with self.lock:
            self._queue.append((weakref.ref(store), k, pending))
            self.deferred += 1
            limit, cuda = self.depth_for(pending.device), pending.device.type == "cuda"
            while self._queue and (len(self._queue) > limit or (cuda and self._queue[0][2].ready)):
                self._finish(*self._queue.popleft())

    def finish_all(self) -> None:
        """Finish every pending encode, oldest first; an encode that fails does not stop the others.

        Raises:
            Exception: The first failure, after every other encode was finished (the failed one stays pending in
                its store, which tries again on its next read).
        """
        first: BaseException | None = None
        with self.lock:
            while self._queue:
                try:
                    self._finish(*self._queue.popleft())
                except Exception as err:  # noqa: BLE001 - re-raised below, once the rest is finished
                    first = first or err
        if first is not None:
            raise first

    @property
    def pending(self) -> int:
        """Encodes queued and still to finish (not finished by a read of their store, nor superseded by a write)."""
        with self.lock:
            return sum(1 for ref, k, p in self._queue if (store := ref()) is not None and store.awaits(k, p))

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Defer re-encodes inside the block (a fused optimizer's backward); all are finished when it ends."""
        with self.lock:
            self._active += 1
        try:
            yield
        except BaseException:
            with self.lock:
                self._active -= 1
            with contextlib.suppress(Exception):  # the block's own error is the one to see
                self.finish_all()
            raise
        with self.lock:
            self._active -= 1
        self.finish_all()

    def _finish(self, ref: weakref.ref[WeightStore], k: int, pending: PendingCompress) -> None:
        store = ref()
        if store is not None:
            store.finish_encode(k, pending)


ENCODES = DeferredEncodes()
"""The process-wide queue of deferred re-encodes (see the module docstring)."""
