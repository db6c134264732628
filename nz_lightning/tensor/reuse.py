"""Reuse of backward decodes by the fused update: one decode per weight fewer per training step.

In backward, a compressed weight is decoded for the op that needs its value (the input gradient of a linear layer,
say); its post-accumulate-grad hook then runs the fused update, which needs the same value again. Instead of
returning that op's pooled buffer at once, ``NZParameter`` hands it to :data:`REUSE` (:meth:`DecodeReuse.offer`),
which keeps the most recent one; the update takes it (:meth:`DecodeReuse.take`) if it still holds the weight's
current value (the very blocks it was decoded from), else decodes as before. So a weight's backward op and its
update share one decode.

Only a weight held as one block and no larger than the buffers :data:`~nz_lightning.tensor.workspace.DECODE_POOL`
keeps is held back (a larger weight is updated block by block, to keep one block of dense scratch). At most one
buffer is held, for the time between the op and the hook; :class:`~nz_lightning.optim.fused.FusedOptimizer` drops
it at the end of every backward. Forward decodes are never held.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nz_lightning.tensor.workspace import DECODE_POOL

if TYPE_CHECKING:
    from nz_lightning.tensor.parameter import WeightStore

__all__ = ["REUSE", "DecodeReuse"]


@dataclass
class _Held:
    store: weakref.ref[WeightStore]
    blocks: list[Any]
    view: Tensor
    base: Tensor


class DecodeReuse:
    """Holds the last dense value decoded in backward until the fused update of that weight takes it.

    Attributes:
        enabled: Whether backward decodes are held back (on by default).
        hits: Updates served by a held decode.
    """

    def __init__(self) -> None:
        self.enabled = True
        self.hits = 0
        self._held: _Held | None = None
        self._lock = threading.Lock()

    def offer(self, store: WeightStore, view: Tensor, base: Tensor) -> None:
        """Keep ``store``'s decoded value ``view`` (in the pooled buffer ``base``) if it may serve its update, else
        release ``base``; a value held before is released either way."""
        keep = (
            self.enabled
            and torch._C._current_graph_task_id() != -1  # in backward
            and len(store.blocks) == 1
            and base.numel() * base.element_size() <= DECODE_POOL.limit
        )
        with self._lock:
            old, self._held = self._held, (_Held(weakref.ref(store), store.blocks, view, base) if keep else None)
        if old is not None:
            DECODE_POOL.release(old.base)
        if not keep:
            DECODE_POOL.release(base)

    def take(self, store: WeightStore) -> tuple[Tensor, Tensor] | None:
        """``(view, base)`` holding ``store``'s current value if a held decode has it (the caller then owns ``base``
        and releases it to ``DECODE_POOL``), else ``None``."""
        with self._lock:
            held = self._held
            if held is None or held.store() is not store:
                return None
            self._held = None
        current = store.blocks
        if len(held.blocks) != len(current) or any(a is not b for a, b in zip(held.blocks, current, strict=True)):
            DECODE_POOL.release(held.base)  # re-encoded since: stale
            return None
        self.hits += 1
        return held.view, held.base

    def drop(self) -> None:
        """Release the held decode, if any."""
        with self._lock:
            old, self._held = self._held, None
        if old is not None:
            DECODE_POOL.release(old.base)


REUSE = DecodeReuse()
"""The process-wide holder of the last backward decode (see the module docstring)."""
