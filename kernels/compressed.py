"""``CompressedTensor`` and ``compress``: the public codec API (re-exported by ``nz_lightning``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import blob, blob_table, lossy
from .backends import CodecBackend, get_backend
from .encode_plan import FOLD_BITS, choose_fold, exponent_counts, fold_histograms, word_bound
from .freqtable import FreqTable
from .layout import (
    DEFAULT_PROB_BITS,
    DEFAULT_STEPS_PER_LANE,
    MAX_PROB_BITS,
    MAX_STEPS_PER_LANE,
    MIN_PROB_BITS,
    num_lanes,
)
from .spec import FloatSpec, folded, spec_for
from .streams import Streams, word_offsets
from .transfer import DECODE_CHECKS

MODE_RAW = 0
MODE_RANS = 1
MODE_LOSSY = 2
MODE_CONST = 3
CACHE_TABLES_MIN_NUMEL = 1 << 20
"""Decoder tables (up to 32 KiB) are cached only for tensors this large, where they cost < 3% of the compressed
size; smaller tensors rebuild them per decode (tens of microseconds)."""


@dataclass
class CompressedTensor:
    """A float tensor held compressed: rANS-coded exponents plus raw sign+mantissa bits, or raw bytes.

    Build one with :func:`compress` or :meth:`from_bytes`; get the original back with :meth:`decompress`
    (bit-exact, except in lossy mode, which keeps only ``mantissa_bits`` mantissa bits).

    Attributes:
        shape: Shape of the original tensor.
        dtype: Dtype of the original tensor.
        mode: ``MODE_RANS`` (coded), ``MODE_RAW`` (the original bytes, when coding would not win),
            ``MODE_LOSSY`` (coded exponents plus the top ``mantissa_bits`` mantissa bits) or ``MODE_CONST``
            (lossless, every element has the same bit pattern, stored once).
        table: The static frequency table (``None`` in raw mode).
        steps_per_lane: Symbols per rANS lane (see docs/FORMAT.md).
        streams: The coded arrays (``None`` in raw mode).
        raw: The original bytes as uint8 (raw mode), or the one value's bytes (constant mode).
        mantissa_bits: Mantissa bits kept (lossy mode only, else ``None``).
        block_size: Normalization block size (lossy mode only; ``None`` when off).
        scales: Packed block scale fields (uint8; lossy mode with normalization only).
        nan_index: Positions of NaNs (int64; lossy mode only).
        fold_bits: Top mantissa bits coded together with the exponent in each rANS symbol (lossless mode; else 0).
        verified: Whether the coded data is known consistent: made by :func:`compress`, or decoded once with its
            check. ``decompress(check=False)`` skips the host-side check (a device sync) only for such data.
    """

    shape: torch.Size
    dtype: torch.dtype
    mode: int
    table: FreqTable | None
    steps_per_lane: int
    streams: Streams | None = None
    raw: torch.Tensor | None = None
    mantissa_bits: int | None = None
    block_size: int | None = None
    scales: torch.Tensor | None = None
    nan_index: torch.Tensor | None = None
    fold_bits: int = 0
    verified: bool = field(default=False, compare=False)
    _tables: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def spec(self) -> FloatSpec:
        """Bit layout of the dtype."""
        return spec_for(self.dtype)

    @property
    def lossy(self) -> bool:
        """True in lossy mode (the decoded values are rounded to ``mantissa_bits`` mantissa bits)."""
        return self.mode == MODE_LOSSY

    @property
    def coding_spec(self) -> FloatSpec:
        """Layout whose exponent field the rANS lanes decode into (the carrier's, in lossy mode)."""
        return lossy.carrier_spec(self.spec) if self.lossy else folded(self.spec, self.fold_bits)

    @property
    def device(self) -> torch.device:
        """Device the compressed arrays (and the decompressed tensor) live on."""
        if self.raw is not None:
            return self.raw.device
        assert self.streams is not None
        return self.streams.sm.device

    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Every byte this compressed form holds: header, table, lane states and counts, payload, checksum,
        plus the decoder lookup tables (one per backend used) and word offsets that decodes have built and cached."""
        cached = sum(t.numel() * t.element_size() for t in self._tables.values())
        offsets = None if self.streams is None else self.streams.offsets
        cached += 0 if offsets is None else offsets.numel() * offsets.element_size()
        return blob.serialized_size(self) + cached

    @property
    def bits_per_weight(self) -> float:
        """Serialized bits per element (header included)."""
        return 8 * blob.serialized_size(self) / max(self.numel(), 1)

    def decoder_tables(self, impl: CodecBackend) -> torch.Tensor:
        """The lookup tables backend ``impl`` decodes with (cached per backend name for large tensors)."""
        assert self.table is not None
        key = impl.name
        cached = self._tables.get(key)
        if cached is None or cached.device != self.device:
            cached = impl.decode_tables(self.table, self.coding_spec, self.device)
            if self.numel() >= CACHE_TABLES_MIN_NUMEL:
                self._tables[key] = cached
        return cached

    def drop_caches(self) -> None:
        """Free the cached decoder tables and word offsets (they are rebuilt on the next decode)."""
        self._tables.clear()
        if self.streams is not None:
            self.streams.offsets = None
            self.streams.plan = None

    def decompress(
        self, out: torch.Tensor | None = None, *, backend: str | None = None, check: bool = True
    ) -> torch.Tensor:
        """Decode to a contiguous tensor bit-identical to the original (in lossy mode: its rounded values).

        Args:
            out: Optional preallocated contiguous tensor of the same shape, dtype and device to decode into.
            backend: Force ``"torch"``, ``"cpu"`` or ``"triton"``; default picks by device.
            check: ``True``: check the coded data's consistency before returning (on a GPU, a host sync).
                ``False`` (the training hot path): for :attr:`verified` lossless data, record the check's flag on
                the device instead, raised later by :meth:`check_deferred`; unverified data is still checked.

        Returns:
            ``out`` if given, otherwise a new tensor.

        Raises:
            ValueError: ``out`` does not match, or the coded data is inconsistent (corrupt).
        """
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        else:
            self._check_out(out)
        if self.numel() == 0:
            return out
        flat = out.view(-1)
        if self.mode == MODE_RAW:
            assert self.raw is not None
            flat.view(torch.uint8).copy_(self.raw)
            return out
        if self.mode == MODE_CONST:  # copied as integers, so NaN payloads survive
            assert self.raw is not None
            ints = self.spec.int_dtype
            flat.view(ints).copy_(self.raw.view(ints).expand(flat.numel()))
            return out
        assert self.streams is not None and self.table is not None
        impl = get_backend(backend, self.device)
        if self.lossy:
            assert self.mantissa_bits is not None and self.nan_index is not None
            lossy.decode(
                self.streams,
                self.spec,
                impl,
                self.decoder_tables(impl),
                self.table.prob_bits,
                self.steps_per_lane,
                self.mantissa_bits,
                self.block_size,
                self.scales,
                self.nan_index,
                flat,
            )
            return out
        tables = self.decoder_tables(impl)
        args = (self.streams, self.coding_spec, tables, self.table.prob_bits, self.steps_per_lane, flat)
        if check or not self.verified:
            impl.decode(*args)
            self.verified = True
            return out
        if impl.name == "triton" and self.numel() >= CACHE_TABLES_MIN_NUMEL and self.streams.offsets is None:
            self.streams.offsets = word_offsets(self.streams.counts)  # the decode is then one kernel launch
        bad = impl.decode_flagged(*args, flag=DECODE_CHECKS.flag(self.device))
        if bad is not None:
            DECODE_CHECKS.record(bad)
        return out

    @staticmethod
    def check_deferred() -> None:
        """Raise if a ``decompress(check=False)`` since the last call decoded inconsistent data (a sync per device).

        Raises:
            ValueError: A deferred consistency check failed (the coded data in memory is corrupt).
        """
        DECODE_CHECKS.check()

    @staticmethod
    def reset_deferred() -> None:
        """Forget a failed deferred check (sticky until then: every ``check_deferred`` raises, and saves refuse).

        Call it once the values computed from the corrupt decode were replaced, e.g. by loading a checkpoint.
        """
        DECODE_CHECKS.reset()

    def _check_out(self, out: torch.Tensor) -> None:
        if out.shape != self.shape or out.dtype != self.dtype or out.device != self.device:
            raise ValueError(
                f"out must have shape {tuple(self.shape)}, dtype {self.dtype}, device {self.device}; got "
                f"{tuple(out.shape)}, {out.dtype}, {out.device}"
            )
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")

    def to(self, device: torch.device | str) -> CompressedTensor:
        """Copy of this compressed tensor with its arrays on ``device``."""
        return CompressedTensor(
            self.shape,
            self.dtype,
            self.mode,
            self.table,
            self.steps_per_lane,
            None if self.streams is None else self.streams.to(device),
            None if self.raw is None else self.raw.to(device),
            self.mantissa_bits,
            self.block_size,
            None if self.scales is None else self.scales.to(device),
            None if self.nan_index is None else self.nan_index.to(device),
            self.fold_bits,
            self.verified,
        )

    def to_bytes(self) -> bytes:
        """Portable serialization (docs/FORMAT.md): header, arrays, CRC32; no pickle."""
        return blob.dumps(self)

    def to_bytes_into(self, out: memoryview) -> int:
        """Write :meth:`to_bytes` into the start of the writable byte buffer ``out`` and return its length (no
        intermediate ``bytes``).

        Raises:
            ValueError: ``out`` is too short.
        """
        return blob.dumps_into(self, out)

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        device: torch.device | str = "cpu",
        *,
        max_const_bytes: int | None = blob.MAX_CONST_BYTES,
        copy: bool = True,
    ) -> CompressedTensor:
        """Parse and validate a blob written by :meth:`to_bytes` (allocating O(``len(data)``), not its output).

        Args:
            data: The blob.
            device: Where its arrays go.
            max_const_bytes: Largest decoded size accepted from a constant-mode blob, whose few bytes could
                otherwise declare any size (default :data:`~nz_lightning.kernels.blob.MAX_CONST_BYTES`, 64 MiB;
                ``None``: no cap). Coded blobs need no cap: they decode to at most ``8 * itemsize`` bytes per byte.
            copy: ``False`` (CPU only; ignored elsewhere): the coded arrays view ``data`` instead of copies of it, for
                a blob decoded at once from a buffer that outlives the result. ``data`` must then be writable.

        Raises:
            ValueError: Bad magic or version, truncated or corrupt data (checksum or structure mismatch), or a
                constant blob over ``max_const_bytes``.
        """
        return blob.loads(cls, data, torch.device(device), max_const_bytes, copy)

    def __repr__(self) -> str:
        lossy_kind = f"lossy k={self.mantissa_bits} B={self.block_size}"
        kind = {MODE_RAW: "raw", MODE_RANS: "rans", MODE_CONST: "const"}.get(self.mode, lossy_kind)
        return (
            f"CompressedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, mode={kind}, "
            f"nbytes={self.nbytes}, bits_per_weight={self.bits_per_weight:.3f})"
        )


def _raw(x: torch.Tensor, steps: int) -> CompressedTensor:
    raw = x.reshape(-1).view(torch.uint8).clone()
    return CompressedTensor(x.shape, x.dtype, MODE_RAW, None, steps, raw=raw)


def compress(
    t: torch.Tensor,
    *,
    backend: str | None = None,
    prob_bits: int = DEFAULT_PROB_BITS,
    steps_per_lane: int = DEFAULT_STEPS_PER_LANE,
    mantissa_bits: int | None = None,
    block_size: int | None = lossy.DEFAULT_BLOCK_SIZE,
) -> CompressedTensor:
    """Compress a float tensor, losslessly by default.

    Args:
        t: A bfloat16, float16 or float32 tensor of any shape and strides, on CPU or CUDA.
        backend: Force ``"torch"`` (reference), ``"cpu"`` (numba) or ``"triton"``; default picks by device.
        prob_bits: log2 of the rANS frequency total (8..15).
        steps_per_lane: Symbols per rANS lane (1..65535); fewer means more parallel lanes and more overhead.
        mantissa_bits: ``None`` for lossless. Otherwise the lossy mode (for inference): keep the exponent and the
            top ``mantissa_bits`` mantissa bits (bf16 0-6, fp16 0-9, fp32 0-22), rounded to nearest even with
            carry into the exponent; finite values saturate instead of becoming inf; NaN and ±inf are kept.
        block_size: Lossy mode only: block normalization over this many consecutive elements (a power of two;
            each block's absmax survives exactly, at ``8 * ceil(man_bits / 8) / block_size`` bits/weight), or
            ``None`` for none. Ignored in lossless mode.

    Returns:
        The compressed tensor. A lossless tensor of two or more elements that all share one bit pattern is
        stored as that one value (constant mode). When coding would not make it smaller, raw bytes are kept
        instead: the original bytes (lossless mode) or those of the rounded values (lossy mode).

    Raises:
        TypeError: ``t`` is not a tensor or has an unsupported dtype.
        ValueError: An option is out of range or the backend cannot run on the tensor's device.
    """
    spec, impl = check_options(t, backend, prob_bits, steps_per_lane, mantissa_bits, block_size)
    x = t.detach().contiguous()
    if x.numel() == 0:
        return _raw(x, steps_per_lane)
    if mantissa_bits is not None:
        table, streams, scales, nans = lossy.encode(
            x.reshape(-1), spec, impl, mantissa_bits, block_size, prob_bits, steps_per_lane
        )
        coded = CompressedTensor(
            x.shape, x.dtype, MODE_LOSSY, table, steps_per_lane, streams, None, mantissa_bits, block_size, scales, nans
        )
        if blob.serialized_size(coded) >= blob.raw_serialized_size(x.shape, x.dtype):
            return _raw(coded.decompress(backend=backend), steps_per_lane)  # tiny tensors: raw rounded values
        return coded
    # The host chooses the table (and raw vs coded): one device-to-host read per encode (docs/DESIGN.md);
    # kernels.compress_async defers it.
    counts = exponent_counts(x, impl, uniform_flag=False).tolist()  # the one read (numpy from here on)
    return encode_lossless(x, impl, counts, prob_bits, steps_per_lane)


def check_options(
    t: torch.Tensor,
    backend: str | None,
    prob_bits: int,
    steps_per_lane: int,
    mantissa_bits: int | None = None,
    block_size: int | None = None,
) -> tuple[FloatSpec, CodecBackend]:
    """Validate :func:`compress`'s arguments: ``t``'s layout and the backend that will code it.

    Raises:
        TypeError: ``t`` is not a tensor or has an unsupported dtype.
        ValueError: An option is out of range or the backend cannot run on the tensor's device.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"compress expects a torch.Tensor, got {type(t).__name__}")
    spec = spec_for(t.dtype)
    if not MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS:
        raise ValueError(f"prob_bits must be in [{MIN_PROB_BITS}, {MAX_PROB_BITS}], got {prob_bits}")
    if not 1 <= steps_per_lane <= MAX_STEPS_PER_LANE:
        raise ValueError(f"steps_per_lane must be in [1, {MAX_STEPS_PER_LANE}], got {steps_per_lane}")
    if mantissa_bits is not None:
        lossy.check_options(spec, mantissa_bits, block_size)
    return spec, get_backend(backend, t.device)


def encode_lossless(
    x: torch.Tensor,
    impl: CodecBackend,
    counts: Sequence[int] | np.ndarray,
    prob_bits: int,
    steps_per_lane: int,
    uniform: bool | None = None,
) -> CompressedTensor:
    """Encode the non-empty contiguous ``x`` losslessly, given its widest-fold histogram ``counts`` (read on the host).

    ``uniform`` tells whether all of ``x``'s elements share one bit pattern when known; ``None``: checked here (a
    host read) if the histogram has a single symbol.
    """
    spec, n = spec_for(x.dtype), x.numel()
    layouts = fold_histograms(counts, FOLD_BITS.get(x.dtype, 0))
    if n >= 2 and np.count_nonzero(layouts[0]) == 1:
        ints = x.reshape(-1).view(spec.int_dtype)
        if bool((ints == ints[0]).all()) if uniform is None else uniform:
            value = ints[:1].view(torch.uint8).clone()
            return CompressedTensor(x.shape, x.dtype, MODE_CONST, None, steps_per_lane, raw=value)
    _, fold, table = choose_fold(layouts, spec, n, prob_bits)
    # Raw or coded is decided before coding, from an upper bound on the coded size (the same on every backend), so
    # a device backend can size the word stream from it without reading the total back (docs/DESIGN.md).
    max_words = word_bound(table, layouts[fold], n)
    coding = folded(spec, fold)
    lanes = num_lanes(n, steps_per_lane)
    fixed = blob.header_size(len(x.shape), MODE_RANS) + blob_table.table_nbytes(table)
    most = fixed + (4 + blob.count_bytes(n, steps_per_lane)) * lanes + 2 * max_words + (n * coding.sm_bits + 7) // 8
    if most >= blob.raw_serialized_size(x.shape, x.dtype):
        return _raw(x, steps_per_lane)
    streams = impl.encode_bounded(x, coding, table, steps_per_lane, max_words)
    return CompressedTensor(x.shape, x.dtype, MODE_RANS, table, steps_per_lane, streams, fold_bits=fold, verified=True)
