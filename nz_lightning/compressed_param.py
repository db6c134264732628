"""Parameters that live compressed: a tensor subclass whose data is a ``CompressedTensor``.

``NZParameter`` is a wrapper tensor subclass. Autograd, modules and optimizers see an ordinary parameter of
the original shape and dtype, but it holds no dense storage. Every aten op that needs the values decodes
them into a reused workspace buffer for the duration of that op. View ops (``t``, ``view``, ``detach``...)
stay lazy, so autograd saves a light view for backward instead of a dense copy. Gradients are computed by
PyTorch's own formulas on the same dense values, so they are bit-identical to those of an uncompressed
parameter. In-place ops (``copy_`` from ``load_state_dict``, init functions) decode, apply and re-compress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map

from kernels import CompressedTensor, compress

from .workspace import WorkspacePool

_POOL = WorkspacePool()


@dataclass
class CodecStats:
    """Time and counts spent in the codec by all compressed parameters (read by ``NeuZipStats``)."""

    decodes: int = 0
    encodes: int = 0
    decode_seconds: float = 0.0
    encode_seconds: float = 0.0

    def reset(self) -> None:
        """Zero all counters."""
        self.decodes = self.encodes = 0
        self.decode_seconds = self.encode_seconds = 0.0


CODEC_STATS = CodecStats()


class WeightStore:
    """The compressed value of one (possibly tied) parameter; shared by all views of it.

    Args:
        value: The dense tensor to hold (compressed losslessly on construction).
        backend: Codec backend to force (``None`` picks by device).
    """

    def __init__(self, value: torch.Tensor, backend: str | None = None) -> None:
        self.backend = backend
        self.ct: CompressedTensor = self._encode(value)

    def _encode(self, value: torch.Tensor) -> CompressedTensor:
        start = time.perf_counter()
        ct = compress(value.detach(), backend=self.backend)
        CODEC_STATS.encodes += 1
        CODEC_STATS.encode_seconds += time.perf_counter() - start
        return ct

    @property
    def shape(self) -> torch.Size:
        """Shape of the full (base) tensor."""
        return self.ct.shape

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored values."""
        return self.ct.dtype

    @property
    def device(self) -> torch.device:
        """Device the compressed data (and every decode) lives on."""
        return self.ct.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the compressed form."""
        return self.ct.nbytes

    def decode_into(self, out: torch.Tensor) -> torch.Tensor:
        """Decode the full tensor into the contiguous ``out`` (same shape) and return it."""
        start = time.perf_counter()
        self.ct.decompress(out=out, backend=self.backend)
        CODEC_STATS.decodes += 1
        CODEC_STATS.decode_seconds += time.perf_counter() - start
        return out

    def read(self) -> torch.Tensor:
        """A fresh dense copy of the full tensor."""
        return self.decode_into(torch.empty(self.shape, dtype=self.dtype, device=self.device))

    def write(self, value: torch.Tensor) -> None:
        """Replace the held value (re-compressing it).

        Raises:
            ValueError: ``value`` has another shape or dtype.
        """
        if value.shape != self.shape or value.dtype != self.dtype:
            raise ValueError(
                f"cannot store a {tuple(value.shape)} {value.dtype} tensor in a {tuple(self.shape)} {self.dtype} slot"
            )
        self.ct = self._encode(value.to(self.device))


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
            f"compressed_bytes={self._store.nbytes}, requires_grad={self.requires_grad})"
        )

    @property
    def store(self) -> WeightStore:
        """The compressed storage this tensor views."""
        return self._store

    def _is_full(self) -> bool:
        base = torch.empty(self._store.shape, device="meta")
        return self._view == (tuple(base.shape), tuple(base.stride()), 0)

    def dense(self) -> torch.Tensor:
        """A fresh dense tensor with this view's values (not a workspace buffer)."""
        full = self._store.read()
        if self._is_full():
            return full
        return full.as_strided(*self._view).clone()

    def _materialize(self, pool_keys: list[torch.Tensor]) -> torch.Tensor:
        view, base = _POOL.acquire(self._store.shape, self._store.dtype, self._store.device)
        pool_keys.append(base)
        return self._store.decode_into(view).as_strided(*self._view)

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
        held: list[torch.Tensor] = []

        def unwrap(a: Any) -> Any:
            return a._materialize(held) if isinstance(a, NZParameter) else a

        try:
            return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        finally:
            for buf in held:
                _POOL.release(buf)


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
    if func is torch.ops.aten.copy_.default and target._is_full() and isinstance(rest[0], torch.Tensor):
        src = rest[0].dense() if isinstance(rest[0], NZParameter) else rest[0]
        store.write(src.to(dtype=store.dtype, device=store.device).expand(store.shape).contiguous())
        return target
    full = store.read()
    held: list[torch.Tensor] = []

    def unwrap(a: Any) -> Any:
        return a._materialize(held) if isinstance(a, NZParameter) else a

    try:
        func(full.as_strided(*target._view), *tree_map(unwrap, rest), **tree_map(unwrap, kwargs))
    finally:
        for buf in held:
            _POOL.release(buf)
    store.write(full)
    return target


def make_parameter(
    value: torch.Tensor, *, requires_grad: bool = True, backend: str | None = None
) -> torch.nn.Parameter:
    """Compress ``value`` into a new parameter that decodes on use.

    Args:
        value: Dense bf16/fp16/fp32 tensor (any layout; stored contiguous).
        requires_grad: Whether the parameter is trainable.
        backend: Codec backend to force.

    Returns:
        An ``nn.Parameter`` that is an :class:`NZParameter`.
    """
    store = WeightStore(value.detach().contiguous(), backend)
    base = torch.empty(store.shape, device="meta")
    param = NZParameter(store, base.shape, base.stride(), 0)
    return torch.nn.Parameter(param, requires_grad=requires_grad)


def is_compressed(t: torch.Tensor) -> bool:
    """True for parameters held compressed by nz_lightning."""
    return isinstance(t, NZParameter)


def read_dense(p: torch.Tensor) -> torch.Tensor:
    """The current value of a parameter as a dense tensor (a fresh copy for compressed ones, else ``p.detach()``)."""
    return p.dense() if isinstance(p, NZParameter) else p.detach()


def write_dense(p: torch.Tensor, value: torch.Tensor) -> None:
    """Set a parameter's value: re-compress a compressed one, copy into a dense one."""
    if isinstance(p, NZParameter):
        if not p._is_full():
            raise ValueError("cannot write through a partial view of a compressed parameter")
        p.store.write(value)
    else:
        with torch.no_grad():
            p.copy_(value)
