"""Decode-ahead: decode the next compressed weight on a side stream while the current op computes.

Off by default. ``with prefetch_decodes():`` (or ``PREFETCH.enable()``) makes every decode of a compressed
parameter's op (``NZParameter``) also issue the decode of the weight that followed it the last time (the order is
learnt per direction, forward and backward, during the first step), into a second pooled buffer:

* on CUDA, on a side stream that first waits for the main stream (so the buffer and the coded data are ready);
  an event recorded after the decode is waited on by the main stream when the weight is used; the buffer is
  ``record_stream``-ed on the side stream, and a prefetch that is never used is waited on before it is freed;
* elsewhere (CPU), synchronously: the same code path, so tests prove the results bit-identical on and off.

A prefetch is used only if the weight still holds the very blocks it decoded (a fused update re-encoding the
weight in between makes it stale: it is dropped and the weight decoded again). No host sync is added.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nz_lightning.tensor.reuse import REUSE, same_blocks
from nz_lightning.tensor.workspace import DECODE_POOL

if TYPE_CHECKING:
    from nz_lightning.tensor.parameter import WeightStore

__all__ = ["PREFETCH", "Prefetcher", "prefetch_decodes"]


@dataclass
class _Pending:
    """A decode issued ahead of its use."""

    store: WeightStore
    blocks: list[Any]  # the CompressedTensor blocks decoded (kept alive: identity marks the value)
    view: Tensor
    base: Tensor
    event: Any  # torch.cuda.Event on CUDA, else None


class Prefetcher:
    """Issues each weight's successor decode ahead of its use (see the module docstring).

    Attributes:
        enabled: Whether decodes are prefetched.
        hits: Decodes served by a prefetch.
        misses: Prefetches dropped unused (mispredicted or stale).
    """

    def __init__(self) -> None:
        self.enabled = False
        self.hits = 0
        self.misses = 0
        self._next: dict[tuple[int, bool], tuple[weakref.ref[Any], weakref.ref[Any]]] = {}
        self._last: dict[bool, weakref.ref[Any]] = {}
        self._pending: _Pending | None = None
        self._streams: dict[torch.device, Any] = {}
        self._keep = DECODE_POOL.keep
        self._lock = threading.RLock()

    def enable(self) -> None:
        """Start prefetching (the decode pool then keeps two buffers per dtype and device)."""
        with self._lock:
            if not self.enabled:
                self._keep, DECODE_POOL.keep = DECODE_POOL.keep, max(DECODE_POOL.keep, 2)
            self.enabled = True

    def disable(self) -> None:
        """Stop prefetching, drop a pending prefetch and forget the learnt order."""
        with self._lock:
            if self.enabled:
                DECODE_POOL.keep = self._keep
            self.enabled = False
            self.reset()

    def reset(self) -> None:
        """Drop the pending prefetch (freeing its buffer) and the learnt order."""
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is not None:
                self._drop(pending)
            self._next.clear()
            self._last.clear()

    def materialize(self, store: WeightStore) -> tuple[Tensor, Tensor]:
        """The dense value of ``store`` in a pooled buffer, and that buffer (release it to ``DECODE_POOL``).

        Served by the pending prefetch when it holds ``store``'s current value; in backward, by a decode
        :data:`~nz_lightning.tensor.reuse.REUSE` holds (the recomputed forward of a checkpointed block decoded it);
        else decoded now. Then the decode of the weight that followed ``store`` last time is issued.
        """
        backward = torch._C._current_graph_task_id() != -1
        if not self.enabled:
            held = REUSE.take(store) if backward else None
            if held is not None:
                return held
            view, base = DECODE_POOL.acquire(store.shape, store.dtype, store.device)
            return store.decode_into(view), base
        with self._lock:
            ready = REUSE.take(store) if backward else None
            pending = self._take(store)
            if ready is None:
                ready = pending
            elif pending is not None:  # a held decode served it: the prefetched copy is not needed
                DECODE_POOL.release(pending[1])
            if ready is None:
                view, base = DECODE_POOL.acquire(store.shape, store.dtype, store.device)
                ready = store.decode_into(view), base
            successor = self._learn(store, backward)
            if successor is not None and successor is not store and not (backward and REUSE.holds(successor)):
                self._issue(successor)  # (a decode REUSE holds, e.g. from a recomputed forward, serves it instead)
            return ready

    # -- internals -------------------------------------------------------------------------------------

    def _learn(self, store: WeightStore, backward: bool) -> WeightStore | None:
        """Record ``store`` as the successor of the previous weight (same direction); return its own successor."""
        last = self._last.get(backward)
        prev = None if last is None else last()
        if prev is not None and prev is not store:
            self._next[(id(prev), backward)] = (weakref.ref(prev), weakref.ref(store))
        self._last[backward] = weakref.ref(store)
        link = self._next.get((id(store), backward))
        if link is None or link[0]() is not store:
            return None
        successor: WeightStore | None = link[1]()
        return successor

    def _take(self, store: WeightStore) -> tuple[Tensor, Tensor] | None:
        pending = self._pending
        if pending is None or pending.store is not store:
            return None
        self._pending = None
        if not same_blocks(pending.blocks, store.blocks):
            self._drop(pending)  # re-encoded since: stale
            return None
        if pending.event is not None:
            main = torch.cuda.current_stream(pending.base.device)
            main.wait_event(pending.event)
            pending.base.record_stream(main)
        self.hits += 1
        return pending.view, pending.base

    def _issue(self, store: WeightStore) -> None:
        old, self._pending = self._pending, None
        if old is not None:
            if old.store is store and same_blocks(old.blocks, store.blocks):
                self._pending = old
                return
            self._drop(old)
        blocks = store.blocks  # finishes the store's deferred re-encodes here, on the main stream, before the side one
        device = store.device
        view, base = DECODE_POOL.acquire(store.shape, store.dtype, device)
        event = None
        if device.type == "cuda":
            main, side = torch.cuda.current_stream(device), self._side_stream(device)
            side.wait_stream(main)  # the buffer's last use and the coded data's writes come first
            with torch.cuda.stream(side):
                store.decode_into(view)
                event = torch.cuda.Event()
                event.record(side)
            base.record_stream(side)
        else:
            store.decode_into(view)
        self._pending = _Pending(store, blocks, view, base, event)

    def _drop(self, pending: _Pending) -> None:
        if pending.event is not None:
            torch.cuda.current_stream(pending.base.device).wait_event(pending.event)
        DECODE_POOL.release(pending.base)
        self.misses += 1

    def _side_stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream


PREFETCH = Prefetcher()
"""The process-wide prefetcher every ``NZParameter`` op decodes through."""


@contextlib.contextmanager
def prefetch_decodes(enabled: bool = True) -> Iterator[Prefetcher]:
    """Prefetch decodes of compressed parameters inside the block (restoring the previous setting after it).

    Args:
        enabled: Turn prefetching on (or, ``False``, off) for the block.

    Yields:
        :data:`PREFETCH`.
    """
    was = PREFETCH.enabled
    (PREFETCH.enable if enabled else PREFETCH.disable)()
    try:
        yield PREFETCH
    finally:
        (PREFETCH.enable if was else PREFETCH.disable)()
