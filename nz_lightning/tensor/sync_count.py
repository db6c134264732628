"""Count, on CPU, the host synchronisations a step would make on a GPU (``count_host_syncs``).

On CUDA, every op that reads a device value on the host (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``,
``.cpu()``), or whose output size depends on device data (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``), blocks the host until the device has
caught up. On CPU the same calls go through the same aten ops, so a dispatch mode that treats every tensor as a
device tensor counts them faithfully, without a GPU. Python-level reads that never reach the dispatcher on a CPU
tensor (``tolist``, ``numpy``, ``cpu``) are counted by wrapping those methods while counting.

Each sync is attributed to a phase by the innermost codec entry point on the Python stack: ``"decode"``
(``WeightStore.decode_block``, row gathers), ``"encode"`` (``WeightStore._encode`` and the deferred re-encode's start
and finish), ``"deferred"`` (a deferred re-encode's read of its histogram: on CUDA a read of pinned host memory that
an asynchronous copy filled, after its event, see ``nz_lightning/tensor/deferred_encode.py``), ``"update"`` (a fused
update, outside its decodes and encodes) or ``"other"`` (the model, the loss, clipping...). Tensors built from Python
data (``torch.tensor(list)``, ``aten.lift_fresh``) are counted apart as ``uploads``: on CUDA the codec uploads them
pinned and ``non_blocking`` (``kernels/transfer.py``), which does not block the host, a difference this CPU proxy
cannot see.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "HostSyncs", "SyncEvent", "count_host_syncs"]

SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "is_nonzero",
        "item",
        "equal",
        "allclose",
        "nonzero",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "bincount",
        "histc",
    }
)
"""aten ops (overload packet names) that synchronise with the host on CUDA whatever their arguments."""
_MASK_INDEXED = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
"""Indexing ops that synchronise when one of their indices is a boolean (or uint8) mask."""
_HOST_READS = ("tolist", "numpy", "cpu")
"""Tensor methods that copy device data to the host without dispatching an aten op on a CPU tensor."""
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


@dataclass(frozen=True)
class SyncEvent:
    """One host synchronisation.

    Attributes:
        op: The aten op (``"aten.nonzero"``) or tensor method (``"Tensor.tolist"``) that synchronised.
        phase: ``"decode"``, ``"encode"``, ``"deferred"``, ``"update"`` or ``"other"`` (see the module docstring).
        where: ``file:line (function)`` of the innermost caller outside torch.
    """

    op: str
    phase: str
    where: str


@dataclass
class HostSyncs:
    """What :func:`count_host_syncs` saw (filled in while the ``with`` block runs).

    Attributes:
        events: Every synchronisation, in order.
        uploads: Tensors built from host data (``aten.lift_fresh``), per phase (not synchronisations, see above).
        decodes: Row-block decodes of compressed parameters (``CODEC_STATS.decodes`` delta).
        encodes: Row-block encodes of compressed parameters (``CODEC_STATS.encodes`` delta).
    """

    events: list[SyncEvent] = field(default_factory=list)
    uploads: Counter[str] = field(default_factory=Counter)
    decodes: int = 0
    encodes: int = 0

    @property
    def total(self) -> int:
        """Number of synchronisations."""
        return len(self.events)

    def count(self, phase: str | None = None) -> int:
        """Synchronisations in ``phase`` (all when ``None``)."""
        return sum(1 for e in self.events if phase is None or e.phase == phase)

    def by_op(self, phase: str | None = None) -> Counter[str]:
        """Synchronisations per op name (of ``phase``, or all)."""
        return Counter(e.op for e in self.events if phase is None or e.phase == phase)

    def by_phase(self) -> Counter[str]:
        """Synchronisations per phase."""
        return Counter(e.phase for e in self.events)

    def summary(self) -> str:
        """A readable digest: totals per phase and per op, and where each kind of sync came from."""
        head = f"{self.total} host syncs ({self.decodes} decodes, {self.encodes} encodes): {dict(self.by_phase())}"
        lines = [f"{head}; uploads {dict(self.uploads)}"]
        sites = Counter((e.phase, e.op, e.where) for e in self.events)
        lines += [f"  {n:4d} x {phase:<6} {op:<28} {where}" for (phase, op, where), n in sites.most_common()]
        return "\n".join(lines)


def _phases() -> dict[CodeType, str]:
    """Code objects of the codec entry points, mapped to the phase they open (imported late: no cycles)."""
    from nz_lightning.kernels.async_encode import read_counts
    from nz_lightning.optim.blockwise import apply_update
    from nz_lightning.tensor import parameter, workspace

    return {
        parameter.WeightStore.decode_block.__code__: "decode",
        parameter.WeightStore._encode.__code__: "encode",
        parameter.WeightStore._set_block.__code__: "encode",
        parameter.WeightStore.finish_encode.__code__: "encode",
        read_counts.__code__: "deferred",
        parameter._row_gather_ok.__code__: "decode",
        workspace.gather_rows.__code__: "decode",
        apply_update.__code__: "update",
    }


def _where_and_phase(phases: dict[CodeType, str]) -> tuple[str, str]:
    frame: FrameType | None = sys._getframe(2)
    where, phase = "", "other"
    while frame is not None:
        path = frame.f_code.co_filename
        if not where and not path.startswith(_TORCH_DIR) and os.path.abspath(path) != _THIS_FILE:
            where = f"{os.path.relpath(path)}:{frame.f_lineno} ({frame.f_code.co_name})"
        found = phases.get(frame.f_code)
        if found is not None:
            phase = found
            break
        frame = frame.f_back
    return where, phase


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _syncs(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":  # the output size is read back unless given
        repeats = args[0] if func._overloadname == "Tensor" else (args[1] if len(args) > 1 else None)
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in _MASK_INDEXED and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(_is_mask(i) for i in args[1])
    return False


class _SyncCounter(TorchDispatchMode):
    """Records the synchronising ops of every tensor (all treated as device tensors)."""

    def __init__(self, result: HostSyncs) -> None:
        super().__init__()
        self.result = result
        self.phases = _phases()
        self.depth = 0  # nested ops of a counted one (e.g. is_nonzero -> item) are not counted again
        self.lock = threading.Lock()

    def record(self, op: str) -> None:
        where, phase = _where_and_phase(self.phases)
        with self.lock:
            self.result.events.append(SyncEvent(op, phase, where))

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if any(getattr(t, "__torch_dispatch__", None) is not torch.Tensor.__torch_dispatch__ for t in types):
            return NotImplemented  # a tensor subclass (NZParameter) handles it first; its inner ops come back here
        counted = self.depth == 0 and _syncs(func, args, kwargs)
        if counted:
            self.record(f"aten.{func.overloadpacket.__name__}")
        elif func.overloadpacket.__name__ == "lift_fresh":
            self.result.uploads[_where_and_phase(self.phases)[1]] += 1
        self.depth += counted
        try:
            return func(*args, **kwargs)
        finally:
            self.depth -= counted


def _wrap_method(counter: _SyncCounter, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if counter.depth == 0:
            counter.record(f"Tensor.{name}")
        return original(self, *args, **kwargs)

    return method


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count the host synchronisations the enclosed code would make on CUDA (run it on CPU tensors).

    Example::

        with count_host_syncs() as syncs:
            opt.backward(model(**batch).loss)
        assert syncs.count("decode") == 0, syncs.summary()

    Yields:
        A :class:`HostSyncs`, filled in as the block runs (decode and encode counts are set when it exits).
    """
    from nz_lightning.tensor.workspace import CODEC_STATS

    result = HostSyncs()
    counter = _SyncCounter(result)
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
    decodes, encodes = CODEC_STATS.decodes, CODEC_STATS.encodes
    for name, original in saved.items():
        setattr(torch.Tensor, name, _wrap_method(counter, name, original))
    try:
        with counter:
            yield result
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        result.decodes = CODEC_STATS.decodes - decodes
        result.encodes = CODEC_STATS.encodes - encodes
