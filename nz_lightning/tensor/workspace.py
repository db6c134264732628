"""Dense scratch for compressed weights: reusable decode buffers and the row-block layout of large weights.

Weights are decoded into a few long-lived buffers, never fresh allocations. A large weight is held as row blocks
(:func:`row_bounds`), so that updates and row gathers (embedding lookups) need one block of dense scratch at a time.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

ROW_BLOCK_BYTES = 4 * 2**20
"""Dense bytes per row block of a lossless ``WeightStore`` (read whenever a store is written; tests set it small).
A larger weight is held as several ``CompressedTensor`` blocks of whole rows (dim 0), so the fused optimizers
decode, update and re-encode it one block at a time."""


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


def row_bounds(shape: Sequence[int], itemsize: int, block_bytes: int | None = None) -> list[tuple[int, int]]:
    """The row ranges ``[(start, stop), ...]`` a tensor of ``shape`` is split into (one range if it fits a block).

    Args:
        shape: The tensor's shape (a 0-d tensor is the single range ``(0, 1)``).
        itemsize: Bytes per element.
        block_bytes: Dense bytes per block (``None``: :data:`ROW_BLOCK_BYTES`).

    Returns:
        Consecutive ranges covering ``range(shape[0])``, each of as many whole rows as fit ``block_bytes``.
    """
    if len(shape) == 0:
        return [(0, 1)]
    rows, row_bytes = int(shape[0]), math.prod(shape[1:]) * itemsize
    per_block = max(1, (ROW_BLOCK_BYTES if block_bytes is None else block_bytes) // max(row_bytes, 1))
    if rows <= per_block:
        return [(0, rows)]
    return [(s, min(s + per_block, rows)) for s in range(0, rows, per_block)]


def row_block(t: Tensor, bounds: Sequence[tuple[int, int]], k: int) -> Tensor:
    """Block ``k`` of ``t`` under ``bounds``: ``t`` itself when there is one block, else ``t[start:stop]``."""
    return t if len(bounds) == 1 else t[bounds[k][0] : bounds[k][1]]


MAX_POOLED_BYTES = 64 * 2**20
"""Upper bound of a pooled buffer's size, whatever the model."""


class WorkspacePool:
    """Flat buffers per (dtype, device), handed out for the duration of one op and then returned.

    A buffer is only reused after it is released, so two compressed arguments of one op never share one.
    At most ``keep`` free buffers per key are retained, each of at most :attr:`limit` bytes (larger requests get a
    buffer that is freed on release: a large embedding should not stay resident as a workspace).

    Args:
        keep: Free buffers retained per (dtype, device).
        max_bytes: Fixed size limit of a retained buffer; ``None`` (default): sized to the models, see :attr:`limit`.
    """

    def __init__(self, keep: int = 1, max_bytes: int | None = None) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self._fitted = 0
        self._free: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def acquire(
        self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A contiguous tensor of ``shape`` backed by a pooled buffer (contents undefined), and that buffer.

        Pass the buffer (second item) to :meth:`release` when done.
        """
        numel = math.prod(shape)
        key = (dtype, torch.device(device))
        with self._lock:
            free = self._free.setdefault(key, [])
            # by index, never list.remove: that compares tensors with ==, elementwise (and fails on other sizes)
            fits = [i for i, b in enumerate(free) if b.numel() >= numel]
            if fits:
                buf = free.pop(min(fits, key=lambda i: free[i].numel()))
            else:
                if free and max(numel, 1) * dtype.itemsize <= self.limit:  # a buffer that will be kept
                    free.pop(max(range(len(free)), key=lambda i: free[i].numel()))  # replace the largest too-small
                with torch.inference_mode(False):  # a buffer made under inference_mode must stay writable after it
                    buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
        return buf[:numel].view(shape), buf

    @property
    def limit(self) -> int:
        """Largest buffer retained: ``max_bytes`` if set, else the largest row block :meth:`fit` was told about
        (:data:`ROW_BLOCK_BYTES` before any), at most :data:`MAX_POOLED_BYTES`.

        What is decoded block by block (fused updates, blocked head and embedding, lookups) and every weight of up to
        one block then reuses pooled buffers; whole decodes of larger weights get a buffer freed after the op, so a
        small model never keeps more than its largest block resident.
        """
        if self.max_bytes is not None:
            return self.max_bytes
        return min(MAX_POOLED_BYTES, self._fitted or ROW_BLOCK_BYTES)

    def fit(self, nbytes: int) -> None:
        """Let buffers of up to ``nbytes`` stay pooled (the largest row block of a model just compressed).

        The limit only grows, so that several models in one process all keep their buffers.
        """
        self._fitted = max(self._fitted, int(nbytes))
        self.trim()

    def trim(self) -> None:
        """Drop free buffers above :attr:`limit`."""
        limit = self.limit
        with self._lock:
            for free in self._free.values():
                free[:] = [b for b in free if b.numel() * b.element_size() <= limit]

    def release(self, base: torch.Tensor) -> None:
        """Return a buffer obtained from :meth:`acquire`."""
        key = (base.dtype, base.device)
        if base.numel() * base.element_size() > self.limit:
            return
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < self.keep:
                free.append(base)

    def clear(self) -> None:
        """Drop every pooled buffer."""
        with self._lock:
            self._free.clear()

    def nbytes(self) -> int:
        """Bytes held by free pooled buffers."""
        with self._lock:
            return sum(b.numel() * b.element_size() for bufs in self._free.values() for b in bufs)


class _RowBlocks(Protocol):
    """What :func:`gather_rows` needs of a store (``WeightStore`` has it)."""

    @property
    def shape(self) -> torch.Size: ...  # noqa: D102
    @property
    def dtype(self) -> torch.dtype: ...  # noqa: D102
    @property
    def device(self) -> torch.device: ...  # noqa: D102
    @property
    def bounds(self) -> list[tuple[int, int]]: ...  # noqa: D102
    def decode_block(self, k: int, out: Tensor | None = None) -> Tensor: ...  # noqa: D102


def gather_rows(store: _RowBlocks, indices: Tensor, pool: WorkspacePool) -> Tensor:
    """``store``'s rows at ``indices`` (``embedding``'s forward), decoding one row block at a time.

    Only the blocks that hold a wanted row are decoded, each into a pooled buffer of one block. The result is the
    exact rows (a copy), shaped ``indices.shape + store.shape[1:]``. One host read per lookup (on a GPU, a sync): the
    number of wanted rows in each block, with the indices' minimum and maximum; the positions of each block's rows
    come from one device sort.

    Raises:
        IndexError: An index is negative or not below the number of rows.
    """
    flat = indices.reshape(-1).to(torch.int64)
    rows, bounds = store.shape[0], store.bounds
    out = torch.empty((flat.numel(), *store.shape[1:]), dtype=store.dtype, device=store.device)
    if flat.numel() == 0:
        return out.view(*indices.shape, *store.shape[1:])
    stops = torch.tensor([stop for _, stop in bounds], dtype=torch.int64)
    stops = stops.pin_memory().to(flat.device, non_blocking=True) if flat.is_cuda else stops.to(flat.device)
    block_of = torch.searchsorted(stops, flat, right=True)  # rows [start_k, stop_k) -> k; rows >= all stops -> len
    order = torch.argsort(block_of, stable=True)
    counts = torch.zeros(len(bounds) + 1, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, block_of, torch.ones_like(flat))
    *per_block, _, low, high = torch.cat([counts, flat.min().reshape(1), flat.max().reshape(1)]).tolist()
    if low < 0 or high >= rows:
        raise IndexError(
            f"index out of range in self: embedding indices span [{low}, {high}], the table has {rows} rows"
        )
    taken = 0
    for k, ((start, stop), count) in enumerate(zip(bounds, per_block, strict=True)):
        if count == 0:
            continue
        where = order[taken : taken + count]
        taken += count
        view, base = pool.acquire((stop - start, *store.shape[1:]), store.dtype, store.device)
        try:
            out[where] = store.decode_block(k, view)[flat[where] - start]
        finally:
            pool.release(base)
    return out.view(*indices.shape, *store.shape[1:])


DECODE_POOL = WorkspacePool()
"""The process-wide pool that compressed parameters (and the block-wise optimizers) decode weights into."""


@contextlib.contextmanager
def decoded_block(store: _RowBlocks, k: int) -> Iterator[Tensor]:
    """Row block ``k`` of ``store`` decoded into a :data:`DECODE_POOL` buffer, released when the block is left."""
    start, stop = store.bounds[k]
    view, base = DECODE_POOL.acquire((stop - start, *store.shape[1:]), store.dtype, store.device)
    try:
        yield store.decode_block(k, view)
    finally:
        DECODE_POOL.release(base)
