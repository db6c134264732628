"""Parameters that live compressed: a tensor subclass whose data is a ``CompressedTensor``.

``NZParameter`` is a wrapper tensor subclass. Autograd, modules and optimizers see an ordinary parameter of
the original shape and dtype, but it holds no dense storage. Every aten op that needs the values decodes
them into a reused workspace buffer for the duration of that op. View ops (``t``, ``view``, ``detach``...)
stay lazy, so autograd saves a light view for backward instead of a dense copy. Gradients are computed by
PyTorch's own formulas on the same dense values, so they are bit-identical to those of an uncompressed
parameter. In-place ops (``copy_`` from ``load_state_dict``, init functions) decode, apply and re-compress.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from nz_lightning.kernels import DEFAULT_BLOCK_SIZE, CompressedTensor, compress, serialized_size, settle_streams
from nz_lightning.tensor.prefetch import PREFETCH
from nz_lightning.tensor.reuse import REUSE
from nz_lightning.tensor.workspace import CODEC_STATS, DECODE_POOL, gather_rows, row_block, row_bounds


class WeightStore:
    """The compressed value of one (possibly tied) parameter; shared by all views of it.

    A lossless store larger than :data:`~nz_lightning.tensor.workspace.ROW_BLOCK_BYTES` (dense) is held as several row
    blocks (chunks of dim 0), each its own ``CompressedTensor``; a lossy store is one block (its normalization
    blocks must not be cut).

    Args:
        value: The dense tensor to hold (compressed on construction; ``None``: empty, see :meth:`set_blocks`).
        backend: Codec backend to force (``None`` picks by device).
        mantissa_bits: ``None`` for lossless storage; else keep this many mantissa bits (lossy: for inference;
            the fused optimizers refuse such parameters).
        block_size: Block normalization of the lossy mode (see :func:`kernels.compress`).
        row_block_bytes: Dense bytes per row block (``None``: :data:`~nz_lightning.tensor.workspace.ROW_BLOCK_BYTES`).
    """

    def __init__(
        self,
        value: Tensor | None,
        backend: str | None = None,
        *,
        mantissa_bits: int | None = None,
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        row_block_bytes: int | None = None,
    ) -> None:
        self.backend = backend
        self.mantissa_bits = mantissa_bits
        self.block_size = block_size
        self.row_block_bytes = row_block_bytes
        self._blocks: list[CompressedTensor] = []
        self._bounds: list[tuple[int, int]] = []
        self._shape = torch.Size()
        if value is not None:
            self.write(value)

    @classmethod
    def from_blobs(
        cls,
        blobs: Sequence[bytes | bytearray | memoryview],
        *,
        backend: str | None = None,
        device: torch.device | str = "cpu",
        mantissa_bits: int | None = None,
        block_size: int | None = DEFAULT_BLOCK_SIZE,
    ) -> WeightStore:
        """A store from the serialized blocks of :meth:`to_blobs` (kept as they are, not re-split).

        Raises:
            ValueError: No blob, a corrupt blob, or blocks that do not fit together (dtype, trailing dims, rank).
        """
        store = cls(None, backend, mantissa_bits=mantissa_bits, block_size=block_size)
        store.set_blocks([CompressedTensor.from_bytes(b, device=device) for b in blobs])
        return store

    def set_blocks(self, blocks: Sequence[CompressedTensor]) -> None:
        """Replace the held value by ``blocks`` (row blocks in order; e.g. loaded from a checkpoint).

        Raises:
            ValueError: The blocks do not fit together, a lossy store gets several, or they change the shape or
                dtype of a store that already holds a value.
        """
        blocks = list(blocks)
        if not blocks:
            raise ValueError("a WeightStore needs at least one block")
        first = blocks[0]
        if self.lossy and len(blocks) != 1:
            raise ValueError(f"a lossy WeightStore holds exactly one block, got {len(blocks)}")
        if len(blocks) > 1 and len(first.shape) == 0:
            raise ValueError("a 0-d tensor cannot be split into row blocks")
        for k, ct in enumerate(blocks[1:], 1):
            if ct.dtype != first.dtype or len(ct.shape) != len(first.shape) or ct.shape[1:] != first.shape[1:]:
                raise ValueError(
                    f"block {k} ({tuple(ct.shape)} {ct.dtype}) does not fit block 0 ({tuple(first.shape)} "
                    f"{first.dtype}): row blocks need the same dtype and trailing dims"
                )
            if ct.device != first.device:
                raise ValueError(f"block {k} is on {ct.device}, block 0 on {first.device}")
        rows = [int(ct.shape[0]) if len(ct.shape) else 1 for ct in blocks]
        shape = torch.Size([sum(rows), *first.shape[1:]]) if len(first.shape) else first.shape
        if self._blocks and (shape != self._shape or first.dtype != self.dtype):
            raise ValueError(
                f"blocks hold a {tuple(shape)} {first.dtype} tensor, the store a {tuple(self._shape)} {self.dtype} one"
            )
        starts = [0, *itertools.accumulate(rows)]
        self._blocks, self._shape = blocks, shape
        self._bounds = [(starts[k], starts[k + 1]) for k in range(len(blocks))]

    @property
    def blocks(self) -> list[CompressedTensor]:
        """The row blocks, in order (a copy of the list; use :meth:`set_blocks` to replace them)."""
        return list(self._blocks)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` rows of each block along dim 0 (``[(0, 1)]`` for a 0-d tensor)."""
        return list(self._bounds)

    @property
    def ct(self) -> CompressedTensor:
        """The single block of a one-block store.

        Raises:
            AttributeError: The store has several row blocks (use :attr:`blocks`).
        """
        if len(self._blocks) != 1:
            raise AttributeError(f"this WeightStore holds {len(self._blocks)} row blocks: use .blocks, not .ct")
        return self._blocks[0]

    @property
    def lossy(self) -> bool:
        """True when the store holds lossily compressed (read-only) values."""
        return self.mantissa_bits is not None

    def _encode(self, value: Tensor) -> CompressedTensor:
        start = time.perf_counter()
        lossy: dict[str, Any] = {"mantissa_bits": self.mantissa_bits, "block_size": self.block_size}
        ct = compress(value.detach(), backend=self.backend, **(lossy if self.lossy else {}))
        CODEC_STATS.encodes += 1
        CODEC_STATS.encode_seconds += time.perf_counter() - start
        return ct

    @property
    def shape(self) -> torch.Size:
        """Shape of the full (base) tensor."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored values."""
        return self._blocks[0].dtype

    @property
    def device(self) -> torch.device:
        """Device the compressed data (and every decode) lives on."""
        return self._blocks[0].device

    @property
    def nbytes(self) -> int:
        """Bytes held by the compressed form (all blocks, cached decoder tables included)."""
        settle_streams(ct.streams for ct in self._blocks)  # re-encoded blocks' word totals: one read for all
        return sum(ct.nbytes for ct in self._blocks)

    @property
    def serialized_nbytes(self) -> int:
        """Sum of the blocks' serialized sizes (what :meth:`to_blobs` returns, without building it)."""
        settle_streams(ct.streams for ct in self._blocks)
        return sum(serialized_size(ct) for ct in self._blocks)

    def to_blobs(self) -> list[bytes]:
        """The portable bytes of each block (docs/FORMAT.md), in row order (raises if a deferred check failed)."""
        CompressedTensor.check_deferred()
        return [ct.to_bytes() for ct in self._blocks]

    def decode_block(self, k: int, out: Tensor | None = None) -> Tensor:
        """Decode row block ``k`` (into the contiguous ``out`` of its shape if given; no host sync) and return it."""
        start = time.perf_counter()
        out = self._blocks[k].decompress(out=out, backend=self.backend, check=False)
        CODEC_STATS.decodes += 1
        CODEC_STATS.decode_seconds += time.perf_counter() - start
        return out

    def decode_into(self, out: Tensor) -> Tensor:
        """Decode the full tensor, block by block, into the contiguous ``out`` (same shape) and return it."""
        for k in range(len(self._blocks)):
            self.decode_block(k, row_block(out, self._bounds, k))
        return out

    def read(self) -> Tensor:
        """A fresh dense copy of the full tensor."""
        return self.decode_into(torch.empty(self.shape, dtype=self.dtype, device=self.device))

    def write(self, value: Tensor) -> None:
        """Replace the held value, re-compressing it block by block (a lossy store quantizes it again).

        Raises:
            ValueError: ``value`` has another shape or dtype.
        """
        if self._blocks and (value.shape != self.shape or value.dtype != self.dtype):
            raise ValueError(
                f"cannot store a {tuple(value.shape)} {value.dtype} tensor in a {tuple(self.shape)} {self.dtype} slot"
            )
        value = value.detach().to(self.device if self._blocks else value.device)
        whole = value.numel() * value.element_size() + 1  # a lossy store is one block
        bounds = row_bounds(value.shape, value.element_size(), whole if self.lossy else self.row_block_bytes)
        self._blocks = [self._encode(row_block(value, bounds, k)) for k in range(len(bounds))]
        self._shape, self._bounds = value.shape, bounds

    def write_block(self, k: int, value: Tensor) -> None:
        """Replace row block ``k`` by ``value`` (its shape and dtype), re-compressing only that block.

        Raises:
            ValueError: ``value`` does not match the block.
        """
        ct = self._blocks[k]
        if value.shape != ct.shape or value.dtype != ct.dtype:
            raise ValueError(f"block {k} is {tuple(ct.shape)} {ct.dtype}, got {tuple(value.shape)} {value.dtype}")
        self._blocks[k] = self._encode(value.to(self.device))


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
    """Whether an ``embedding`` lookup can gather block by block (several blocks, valid integer indices)."""
    idx = args[1] if len(args) > 1 else None
    if len(weight.store.bounds) < 2 or not weight.is_whole_store() or type(idx) is not torch.Tensor:
        return False
    valid = idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < weight.shape[0])
    return idx.dtype in (torch.int64, torch.int32) and valid


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
