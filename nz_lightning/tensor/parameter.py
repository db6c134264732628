"""Parameters that live compressed: a tensor subclass whose data is a ``CompressedTensor``.

``NZParameter`` is a wrapper tensor subclass. Autograd, modules and optimizers see an ordinary parameter of
the original shape and dtype, but it holds no dense storage. Every aten op that needs the values decodes
them into a reused workspace buffer for the duration of that op. View ops (``t``, ``view``, ``detach``...)
stay lazy, so autograd saves a light view for backward instead of a dense copy. Gradients are computed by
PyTorch's own formulas on the same dense values, so they are bit-identical to those of an uncompressed
parameter. In-place ops (``copy_`` from ``load_state_dict``, init functions) decode, apply and re-compress.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

from nz_lightning.kernels import DEFAULT_BLOCK_SIZE
from nz_lightning.tensor.prefetch import PREFETCH
from nz_lightning.tensor.reuse import REUSE
from nz_lightning.tensor.store import WeightStore
from nz_lightning.tensor.workspace import DECODE_POOL, gather_rows


class NZParameter(torch.Tensor):
    """A lazily decoded view of a :class:`WeightStore` (use :func:`make_parameter` to build one)."""

    _store: WeightStore
    _view: tuple[tuple[int, ...], tuple[int, ...], int]

    @staticmethod
    def __new__(
        cls, store: WeightStore, size: Any, stride: Any, offset: int, requires_grad: bool = False
    ) -> NZParameter:
        t = torch.Tensor._make_wrapper_subclass(
            cls,
            size,
            strides=stride,
            storage_offset=offset,
            dtype=store.dtype,
            device=store.device,
            requires_grad=requires_grad,
        )
        t._store = store
        t._view = (tuple(size), tuple(stride), int(offset))
        return t

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return (
            f"NZParameter(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"held_bytes={self._store.nbytes}, requires_grad={self.requires_grad})"
        )

    @property
    def store(self) -> WeightStore:
        """The compressed storage this tensor views."""
        return self._store

    def is_whole_store(self) -> bool:
        """Whether this view is the whole stored tensor (its shape, contiguous strides, offset 0)."""
        base = torch.empty(self._store.shape, device="meta")
        return self._view == (tuple(base.shape), tuple(base.stride()), 0)

    def dense(self) -> torch.Tensor:
        """A fresh dense tensor with this view's values (not a workspace buffer)."""
        full = self._store.read()
        if self.is_whole_store():
            return full
        return full.as_strided(*self._view).clone()

    def _materialize(self, decoded: list[tuple[WeightStore, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        view, base = PREFETCH.materialize(self._store)
        decoded.append((self._store, view, base))
        return view.as_strided(*self._view)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        schema = func._schema
        first = args[0] if args else None
        returns_alias = bool(schema.returns) and schema.returns[0].alias_info is not None
        if returns_alias and not schema.is_mutable and isinstance(first, NZParameter):
            view = _lazy_view(func, first, args[1:], kwargs)
            if view is not None:
                return view
        if schema.is_mutable and isinstance(first, NZParameter):
            return _mutate(func, first, args[1:], kwargs)
        if func is torch.ops.aten.embedding.default and isinstance(first, NZParameter) and _row_gather_ok(first, args):
            return gather_rows(
                first.store, args[1], DECODE_POOL
            )  # one decoded row block at a time, not the whole table
        decoded: list[tuple[WeightStore, torch.Tensor, torch.Tensor]] = []

        def unwrap(a: Any) -> Any:
            return a._materialize(decoded) if isinstance(a, NZParameter) else a

        try:
            return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        finally:
            for store, value, base in decoded:  # held for the weight's fused update (in backward), else released;
                REUSE.offer(store, value, base, keep=not schema.is_mutable)  # a mutated buffer is not the value


def _row_gather_ok(weight: NZParameter, args: tuple[Any, ...]) -> bool:
    """Whether an ``embedding`` lookup can gather block by block (several blocks, integer indices, which
    :func:`~nz_lightning.tensor.workspace.gather_rows` checks)."""
    idx = args[1] if len(args) > 1 else None
    if len(weight.store.bounds) < 2 or not weight.is_whole_store() or type(idx) is not torch.Tensor:
        return False
    return idx.dtype in (torch.int64, torch.int32)


def _lazy_view(func: Any, base: NZParameter, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> NZParameter | None:
    """Apply a view op to the view metadata only (on a meta tensor), keeping the result compressed.

    Returns ``None`` when the op's result is not a same-dtype view of the input (ops like ``to.dtype`` are
    declared as possibly aliasing but may return a new tensor); the caller then computes it densely.
    """
    meta = torch.empty(base.store.shape, dtype=base.dtype, device="meta").as_strided(*base._view)
    out = func(meta, *rest, **kwargs)
    if not isinstance(out, torch.Tensor):
        raise NotImplementedError(f"nz_lightning: view op {func} returning several tensors is not supported")
    if out.dtype != base.dtype or out.untyped_storage()._cdata != meta.untyped_storage()._cdata:
        return None
    return NZParameter(base.store, out.shape, out.stride(), out.storage_offset())


def _mutate(func: Any, target: NZParameter, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> NZParameter:
    """In-place op on compressed data: decode, apply to the dense value, re-compress."""
    store = target.store
    if func is torch.ops.aten.copy_.default and target.is_whole_store() and isinstance(rest[0], torch.Tensor):
        src = rest[0].dense() if isinstance(rest[0], NZParameter) else rest[0]
        store.write(src.to(dtype=store.dtype, device=store.device).expand(store.shape).contiguous())
        return target
    full = store.read()
    decoded: list[tuple[WeightStore, torch.Tensor, torch.Tensor]] = []

    def unwrap(a: Any) -> Any:
        return a._materialize(decoded) if isinstance(a, NZParameter) else a

    try:
        func(full.as_strided(*target._view), *tree_map(unwrap, rest), **tree_map(unwrap, kwargs))
    finally:
        for _, _, base in decoded:
            DECODE_POOL.release(base)
    store.write(full)
    return target


def make_parameter(
    value: torch.Tensor,
    *,
    requires_grad: bool = True,
    backend: str | None = None,
    mantissa_bits: int | None = None,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
) -> torch.nn.Parameter:
    """Compress ``value`` into a new parameter that decodes on use.

    Args:
        value: Dense bf16/fp16/fp32 tensor (any layout; stored contiguous).
        requires_grad: Whether the parameter is trainable (forced off for lossy weights).
        backend: Codec backend to force.
        mantissa_bits: ``None`` (lossless) or the mantissa bits a lossy store keeps.
        block_size: Block normalization of the lossy mode.

    Returns:
        An ``nn.Parameter`` that is an :class:`NZParameter`.
    """
    store = WeightStore(value.detach().contiguous(), backend, mantissa_bits=mantissa_bits, block_size=block_size)
    base = torch.empty(store.shape, device="meta")
    param = NZParameter(store, base.shape, base.stride(), 0)
    return torch.nn.Parameter(param, requires_grad=requires_grad and not store.lossy)


def is_compressed(t: torch.Tensor) -> bool:
    """True for parameters held compressed by nz_lightning."""
    return isinstance(t, NZParameter)


def read_dense(p: torch.Tensor) -> torch.Tensor:
    """The current value of a parameter as a dense tensor (a fresh copy for compressed ones, else ``p.detach()``)."""
    return p.dense() if isinstance(p, NZParameter) else p.detach()


def write_dense(p: torch.Tensor, value: torch.Tensor) -> None:
    """Set a parameter's value: re-compress a compressed one, copy into a dense one."""
    if isinstance(p, NZParameter):
        if not p.is_whole_store():
            raise ValueError("cannot write through a partial view of a compressed parameter")
        p.store.write(value)
    else:
        with torch.no_grad():
            p.copy_(value)
