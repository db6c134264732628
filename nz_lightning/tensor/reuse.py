"""Reuse of backward decodes by the fused update: one decode per weight fewer per training step.

In backward, a compressed weight is decoded for the op that needs its value (the input gradient of a linear layer,
say); its post-accumulate-grad hook then runs the fused update, which needs the same value again. Instead of
returning that op's pooled buffer at once, ``NZParameter`` hands it to :data:`REUSE` (:meth:`DecodeReuse.offer`),
which keeps the most recent one; the update takes it (:meth:`DecodeReuse.take`) if it still holds the weight's
current value (the very blocks it was decoded from), else decodes as before. So a weight's backward op and its
update share one decode.

A weight held as several row blocks is served only with :attr:`DecodeReuse.row_blocks` (off by default): its
update, which goes block by block, then reads each block from the held full value instead of decoding it, and the
full buffer (too large for :data:`~nz_lightning.tensor.workspace.DECODE_POOL`) is freed when the update releases
it. That keeps a full dense weight alive during its update, where one block of scratch would do: measured on the
Llama-3 8B architecture (2 layers), 13% fewer block decodes for 0.11 GiB more peak (one MLP weight). At most
``capacity`` buffers are held (one by default), for the time between the op and the update;
:class:`~nz_lightning.optim.fused.FusedOptimizer` drops them at the end of every backward. Forward decodes are never
held.

Under activation checkpointing a block's forward is recomputed in backward, and those decodes are offered too: a
backward op takes a held decode of its weight's current value before decoding
(:meth:`~nz_lightning.tensor.prefetch.Prefetcher.materialize`). With ``capacity`` at least a block's number of
weights (``REUSE.capacity = 8`` for a Llama layer's 7 projections) every weight is then decoded twice per step
(forward and recompute) instead of three times, at the cost of holding a block's dense weights from its recompute
to their updates. With the default capacity no backward op is served that way (each one's own decode evicts the
recomputed one first).
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

from nz_lightning.tensor.workspace import DECODE_POOL

if TYPE_CHECKING:
    from nz_lightning.tensor.store import WeightStore

__all__ = ["REUSE", "DecodeReuse", "same_blocks"]


@dataclass
class _Held:
    store: weakref.ref[WeightStore]
    blocks: list[Any]
    view: Tensor
    base: Tensor
    stream: Any = None  # the CUDA stream the op that decoded it ran on


class DecodeReuse:
    """Holds the last dense values decoded in backward until the fused updates of those weights take them.

    Attributes:
        enabled: Whether backward decodes are held back (on by default).
        row_blocks: Whether weights held as several row blocks are held back too (off by default: it trades one
            full dense weight of peak memory during its update for one decode per row block).
        capacity: How many decodes are held at most (the oldest is released first). 1 by default: a weight's update
            follows its backward op directly. A fused optimizer that finishes each update only after the next
            gradient's all-reduce has started raises it for its backward pass (:mod:`~nz_lightning.optim.overlap`).
        hits: Decodes served by a held one (updates, and backward ops after a recomputed forward).
    """

    def __init__(self) -> None:
        self.enabled = True
        self.row_blocks = False
        self.capacity = 1
        self.hits = 0
        self._active = 0
        self._held: list[_Held] = []
        self._lock = threading.Lock()

    def offer(self, store: WeightStore, view: Tensor, base: Tensor, keep: bool = True) -> None:
        """Keep ``store``'s decoded value ``view`` (in the pooled buffer ``base``) if it may serve its update, else
        release ``base``; the oldest held value is released when more than :attr:`capacity` are held. ``keep=False``
        releases it at once (an op wrote into the buffer)."""
        keep = (
            keep
            and self.enabled
            and self._active > 0  # a fused optimizer's backward (which drops what no update took)
            and torch._C._current_graph_task_id() != -1  # in backward
            and (
                self.row_blocks or (len(store.blocks) == 1 and base.numel() * base.element_size() <= DECODE_POOL.limit)
            )
        )
        if not keep:
            DECODE_POOL.release(base)
            return
        stream = torch.cuda.current_stream(base.device) if base.device.type == "cuda" else None
        with self._lock:
            self._held.append(_Held(weakref.ref(store), store.blocks, view, base, stream))
            old = self._held[: max(0, len(self._held) - max(1, self.capacity))]
            del self._held[: len(old)]
        for held in old:
            DECODE_POOL.release(held.base)

    def holds(self, store: WeightStore) -> bool:
        """Whether a held decode has ``store``'s current value (what :meth:`take` would return)."""
        with self._lock:
            held = [h for h in self._held if h.store() is store]
        if not held:
            return False
        current = store.blocks
        return any(same_blocks(h.blocks, current) for h in held)

    def take(self, store: WeightStore) -> tuple[Tensor, Tensor] | None:
        """``(view, base)`` holding ``store``'s current value if a held decode has it (the caller then owns ``base``
        and releases it to ``DECODE_POOL``), else ``None``."""
        with self._lock:
            found = next((k for k in range(len(self._held) - 1, -1, -1) if self._held[k].store() is store), None)
            if found is None:
                return None
            held = self._held.pop(found)
        current = store.blocks
        if not same_blocks(held.blocks, current):
            DECODE_POOL.release(held.base)  # re-encoded since: stale
            return None
        if held.stream is not None:  # the update may run on another stream than the op that read the buffer
            stream = torch.cuda.current_stream(held.base.device)
            if stream != held.stream:
                stream.wait_stream(held.stream)
        with self._lock:
            self.hits += 1
        return held.view, held.base

    @contextlib.contextmanager
    def holding(self, capacity: int = 1) -> Iterator[None]:
        """Hold backward decodes inside the block (a fused optimizer's backward pass), at most ``capacity`` (or the
        current :attr:`capacity` if larger) at once, dropping them after it."""
        was = self.capacity
        self.capacity = max(was, capacity)
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self.capacity = was
            if self._active == 0:
                self.drop()

    @property
    def held(self) -> int:
        """Number of decodes held now."""
        return len(self._held)

    def drop(self) -> None:
        """Release every held decode."""
        with self._lock:
            old, self._held = self._held, []
        for held in old:
            DECODE_POOL.release(held.base)


def same_blocks(a: list[Any], b: list[Any]) -> bool:
    """Whether two block lists hold the very same blocks (a re-encode makes new ones): a decode of ``a`` is the
    current value of a store whose blocks are ``b``."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


REUSE = DecodeReuse()
"""The process-wide holder of the last backward decode (see the module docstring)."""
