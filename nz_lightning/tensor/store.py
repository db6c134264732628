"""The compressed value of one parameter: ``WeightStore``, its row blocks and their (re-)encoding.

``NZParameter`` (``nz_lightning/tensor/parameter.py``) views a store; the fused optimizers read it block by block and
write each block back, re-encoded at once or, inside a fused backward, deferred (``deferred_encode.py``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nz_lightning.kernels import (
    DEFAULT_BLOCK_SIZE,
    CompressedTensor,
    PendingCompress,
    compress,
    compress_async,
    serialized_size,
    settle_streams,
)
from nz_lightning.tensor.deferred_encode import ENCODES
from nz_lightning.tensor.workspace import CODEC_STATS, row_block, row_bounds

__all__ = ["WeightStore"]


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
        self._held: list[CompressedTensor] = []
        self._pending: dict[int, PendingCompress] = {}  # row blocks whose re-encode ENCODES has not finished
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
        if self._held and (shape != self._shape or first.dtype != self.dtype):
            raise ValueError(
                f"blocks hold a {tuple(shape)} {first.dtype} tensor, the store a {tuple(self._shape)} {self.dtype} one"
            )
        starts = [0, *itertools.accumulate(rows)]
        self._pending.clear()  # superseded
        self._held, self._shape = blocks, shape
        self._bounds = [(starts[k], starts[k + 1]) for k in range(len(blocks))]

    @property
    def _blocks(self) -> list[CompressedTensor]:
        """The row blocks, every deferred re-encode of this store finished first."""
        for k in sorted(self._pending):
            self._finish_block(k)
        return self._held

    def _finish_block(self, k: int) -> CompressedTensor:
        """Row block ``k``, its deferred re-encode (if any) finished first."""
        pending = self._pending.get(k)
        if pending is not None:
            self.finish_encode(k, pending)
        return self._held[k]

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

    def _set_block(self, k: int, value: Tensor) -> None:
        """Store ``value`` as row block ``k``: encoded now, or started and left to :data:`ENCODES` to finish."""
        self._pending.pop(k, None)  # superseded
        if self.lossy or not ENCODES.defers(value.device):
            self._held[k] = self._encode(value)
            return
        start = time.perf_counter()
        pending = self._pending[k] = compress_async(value, backend=self.backend)  # a copy: value may be reused
        CODEC_STATS.encode_seconds += time.perf_counter() - start
        ENCODES.add(self, k, pending)

    def awaits(self, k: int, pending: PendingCompress) -> bool:
        """Whether row block ``k``'s value is the deferred re-encode ``pending`` (not finished nor superseded)."""
        return self._pending.get(k) is pending

    def finish_encode(self, k: int, pending: PendingCompress) -> None:
        """Take the result of row block ``k``'s deferred re-encode ``pending`` (ignored if it was superseded)."""
        with ENCODES.lock:
            if not self.awaits(k, pending):
                return
            start = time.perf_counter()
            ENCODES.waited += not pending.ready
            self._held[k] = pending.result()
            del self._pending[k]
            CODEC_STATS.encodes += 1
            CODEC_STATS.encode_seconds += time.perf_counter() - start

    @property
    def shape(self) -> torch.Size:
        """Shape of the full (base) tensor."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored values."""
        return self._held[0].dtype

    @property
    def device(self) -> torch.device:
        """Device the compressed data (and every decode) lives on."""
        return self._held[0].device

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
        out = self._finish_block(k).decompress(out=out, backend=self.backend, check=False)
        CODEC_STATS.decodes += 1
        CODEC_STATS.decode_seconds += time.perf_counter() - start
        return out

    def decode_into(self, out: Tensor) -> Tensor:
        """Decode the full tensor, block by block, into the contiguous ``out`` (same shape) and return it."""
        for k in range(len(self._held)):  # each block's decode finishes only that block's pending encode
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
        if self._held and (value.shape != self.shape or value.dtype != self.dtype):
            raise ValueError(
                f"cannot store a {tuple(value.shape)} {value.dtype} tensor in a {tuple(self.shape)} {self.dtype} slot"
            )
        value = value.detach().to(self.device if self._held else value.device)
        whole = value.numel() * value.element_size() + 1  # a lossy store is one block
        bounds = row_bounds(value.shape, value.element_size(), whole if self.lossy else self.row_block_bytes)
        if self._held and bounds == self._bounds:  # the same row split: each block may be re-encoded deferred
            for k in range(len(bounds)):
                self._set_block(k, row_block(value, bounds, k))
            return
        self._pending.clear()  # superseded
        self._held = [self._encode(row_block(value, bounds, k)) for k in range(len(bounds))]
        self._shape, self._bounds = value.shape, bounds

    def write_block(self, k: int, value: Tensor) -> None:
        """Replace row block ``k`` by ``value`` (its shape and dtype), re-compressing only that block.

        Raises:
            ValueError: ``value`` does not match the block.
        """
        ct = self._held[k]
        if value.shape != ct.shape or value.dtype != ct.dtype:
            raise ValueError(f"block {k} is {tuple(ct.shape)} {ct.dtype}, got {tuple(value.shape)} {value.dtype}")
        self._set_block(k, value.to(self.device))
