"""Serialization of ``CompressedTensor`` to portable bytes and back, with full validation (docs/FORMAT.md)."""

from __future__ import annotations

import math
import struct
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .blob_table import decode_table, encode_table, table_nbytes
from .freqtable import FreqTable
from .layout import (
    DEFAULT_STEPS_PER_LANE,
    LANES_PER_SEGMENT,
    MAX_PROB_BITS,
    MAX_STEPS_PER_LANE,
    MIN_PROB_BITS,
    STATE_LOWER,
    effective_steps,
    lane_lengths,
    num_lanes,
)
from .lossy import MAX_BLOCK_LOG2, NO_BLOCK, num_blocks, scale_bytes
from .spec import V2_SYMBOL_BITS, folded, max_fold_bits, spec_for, spec_for_code
from .streams import Streams

if TYPE_CHECKING:
    from .compressed import CompressedTensor

MAGIC = b"NZCT"
VERSION = 1
"""Written for raw, lossy and constant blobs."""
VERSION_FOLDED = 2
"""Read only (written before version 3): an fp16 rANS blob with 1-3 folded mantissa bits, u8 table symbols."""
VERSION_COMPACT = 3
"""Written for every lossless rANS blob: the fold byte (0 to ``10 - exponent bits``), the compact table section
(``kernels.blob_table``) and one-byte lane word counts when a lane holds at most 255 symbols."""
VERSIONS = (VERSION, VERSION_FOLDED, VERSION_COMPACT)
MAX_NDIM = 64
MAX_DIM = (1 << 63) - 1
"""Largest dimension a blob may declare (torch sizes are signed 64-bit), even when another dimension is 0."""
MAX_CONST_BYTES = 64 << 20
"""Default cap on the decoded bytes of a constant-mode blob (:func:`loads`'s ``max_const_bytes``): such a blob is a
few dozen bytes whatever it declares, so without a cap 40 bytes could demand gigabytes. Callers that know the
expected size (a model being loaded, a container record) pass it explicitly."""
CODED_ELEMENTS_PER_BYTE = 8
"""Coded modes store at least the sign bit of every element raw, so a coded blob of ``b`` bytes holds at most
``8 * b`` elements: its decoded size is at most ``8 * itemsize`` times its own."""
PEEK_BYTES = 8 + 8 * MAX_NDIM
"""Bytes of a blob's start that :func:`peek` reads (the fixed header and the longest shape)."""
_HEAD = struct.Struct("<4sBBBB")  # magic, version, dtype code, mode, ndim
_RANS = struct.Struct("<BBHIQ")  # prob_bits, reserved, n_symbols, steps_per_lane, n_words
_LOSSY = struct.Struct("<BBHQ")  # mantissa_bits, block_log2 (255: none), reserved, n_nan
_CRC = struct.Struct("<I")


def header_size(ndim: int, mode: int) -> int:
    """Bytes of fixed header (without table and arrays) plus the trailing checksum."""
    extra = {0: 0, 1: _RANS.size, 2: _RANS.size + _LOSSY.size, 3: 0}[mode]
    return _HEAD.size + 8 * ndim + extra + _CRC.size


def serialized_size(ct: CompressedTensor) -> int:
    """Exact length of ``ct.to_bytes()`` without building it."""
    size = header_size(len(ct.shape), ct.mode)
    if ct.mode == 0:
        return size + ct.numel() * ct.spec.itemsize
    if ct.mode == 3:
        return size + ct.spec.itemsize
    assert ct.streams is not None and ct.table is not None
    if ct.mode == 1:
        st = ct.streams.settle()
        lanes = st.states.numel()
        words = 4 * lanes + count_bytes(ct.numel(), ct.steps_per_lane) * lanes + 2 * st.words.numel()
        return size + table_nbytes(ct.table) + words + st.sm.numel()
    size += 3 * len(ct.table.symbols) + ct.streams.nbytes()
    if ct.mode == 2:
        assert ct.nan_index is not None
        size += (0 if ct.scales is None else ct.scales.numel()) + 8 * ct.nan_index.numel()
    return size


def count_bytes(n: int, steps: int) -> int:
    """Bytes per lane word count in a version-3 blob: 1 when no lane holds more than 255 symbols, else 2."""
    return 1 if effective_steps(n, steps) <= 255 else 2


def raw_serialized_size(shape: torch.Size, dtype: torch.dtype) -> int:
    """Length of the raw (uncoded) serialization of a tensor: its bytes plus the header."""
    return header_size(len(shape), 0) + math.prod(shape) * spec_for(dtype).itemsize


def _le(t: torch.Tensor, np_dtype: str) -> memoryview:
    """``t``'s values as little-endian ``np_dtype`` bytes, without a copy where they already are."""
    arr = np.ascontiguousarray(t.detach().cpu().numpy().astype(np_dtype, copy=False))
    return arr.data.cast("B")


def _parts(ct: CompressedTensor) -> list[bytes | memoryview]:
    """The sections of ``ct``'s blob before its checksum, in order (see docs/FORMAT.md)."""
    version = VERSION_COMPACT if ct.mode == 1 else VERSION
    parts: list[bytes | memoryview] = [_HEAD.pack(MAGIC, version, ct.spec.code, ct.mode, len(ct.shape))]
    parts.append(struct.pack(f"<{len(ct.shape)}Q", *ct.shape))
    if ct.mode in (0, 3):  # raw bytes, or the one value of a constant tensor
        assert ct.raw is not None
        parts.append(_le(ct.raw, "u1"))
        return parts
    assert ct.streams is not None and ct.table is not None
    st, tb = ct.streams.settle(), ct.table
    parts.append(_RANS.pack(tb.prob_bits, ct.fold_bits, len(tb.symbols), ct.steps_per_lane, st.words.numel()))
    if ct.mode == 2:
        assert ct.mantissa_bits is not None and ct.nan_index is not None
        log2 = NO_BLOCK if ct.block_size is None else ct.block_size.bit_length() - 1
        parts.append(_LOSSY.pack(ct.mantissa_bits, log2, 0, ct.nan_index.numel()))
    if ct.mode == 1:
        parts.append(encode_table(tb))
    else:
        parts.append(bytes(tb.symbols))
        parts.append(struct.pack(f"<{len(tb.freqs)}H", *tb.freqs))
    parts.append(_le(st.states.view(torch.int32), "<i4"))
    cw = count_bytes(ct.numel(), ct.steps_per_lane) if ct.mode == 1 else 2
    parts.append(_le(st.counts.to(torch.int32), "<u1" if cw == 1 else "<u2"))
    parts.append(_le(st.words.view(torch.int16), "<i2"))
    parts.append(_le(st.sm, "u1"))
    if ct.mode == 2:
        assert ct.nan_index is not None
        if ct.scales is not None:
            parts.append(_le(ct.scales, "u1"))
        parts.append(_le(ct.nan_index, "<i8"))
    return parts


def _with_crc(parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [*parts, _CRC.pack(crc)]


def dumps(ct: CompressedTensor) -> bytes:
    """Serialize ``ct`` (see docs/FORMAT.md)."""
    return b"".join(_with_crc(_parts(ct)))


def dumps_into(ct: CompressedTensor, out: memoryview) -> int:
    """Write :func:`dumps` of ``ct`` into the start of the writable byte buffer ``out`` (no intermediate blob).

    Returns:
        The blob's length.

    Raises:
        ValueError: ``out`` is shorter than the blob (nothing is written then).
    """
    parts = _with_crc(_parts(ct))
    total = sum(len(p) for p in parts)
    if total > len(out):
        raise ValueError(f"a {total}-byte blob does not fit a {len(out)}-byte buffer")
    pos = 0
    for part in parts:
        out[pos : pos + len(part)] = part
        pos += len(part)
    return total


def _shape(view: memoryview, ndim: int) -> torch.Size:
    if ndim > MAX_NDIM:
        raise ValueError(f"corrupt blob: ndim {ndim} exceeds {MAX_NDIM}")
    if len(view) < _HEAD.size + 8 * ndim:
        raise ValueError(f"truncated blob: {len(view)} bytes cannot hold a {ndim}-dimensional shape")
    dims = struct.unpack_from(f"<{ndim}Q", view, _HEAD.size)
    if any(d > MAX_DIM for d in dims):
        raise ValueError(f"corrupt blob: shape {dims} is too large (a dimension of 2^63 or more)")
    return torch.Size(dims)


def _head(view: memoryview, blob_len: int) -> tuple[int, int, int, int]:
    """``(version, dtype code, mode, ndim)`` of the fixed header at the start of ``view`` (a blob of ``blob_len``).

    Raises:
        ValueError: Too short for any header, bad magic or an unsupported version.
    """
    if blob_len < _HEAD.size + _CRC.size or len(view) < _HEAD.size:
        raise ValueError(f"truncated blob: {blob_len} bytes is shorter than any header")
    magic, version, code, mode, ndim = _HEAD.unpack(view[: _HEAD.size])
    if magic != MAGIC:
        raise ValueError(f"not an nz_lightning blob: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in VERSIONS:
        raise ValueError(f"unsupported blob version {version}; this build reads versions {VERSIONS[0]}-{VERSIONS[-1]}")
    return version, code, mode, ndim


def peek(head: bytes | bytearray | memoryview, blob_len: int) -> tuple[torch.Size, torch.dtype, int]:
    """Shape, dtype and mode a blob declares, from its first bytes, checked against the blob's length.

    No checksum is verified (that needs the whole blob; :func:`loads` does it), but a declared size the blob's
    length cannot hold is rejected: raw mode must hold every byte, constant mode is exactly one value, and coded
    modes hold at most :data:`CODED_ELEMENTS_PER_BYTE` elements per byte.

    Args:
        head: The blob's first ``min(blob_len, PEEK_BYTES)`` bytes (or more).
        blob_len: The blob's full length.

    Raises:
        ValueError: Bad magic, version, dtype, mode or shape, or a size the blob cannot hold.
    """
    view = memoryview(head).cast("B")
    version, code, mode, ndim = _head(view, blob_len)
    spec, shape = spec_for_code(code), _shape(view, ndim)
    n = math.prod(shape)
    if mode not in (0, 1, 2, 3):
        raise ValueError(f"corrupt blob: unknown mode {mode}")
    fixed = header_size(ndim, mode)
    if mode == 0 and blob_len != fixed + n * spec.itemsize:
        raise ValueError(f"corrupt blob: raw blob of {blob_len} bytes declares {n} elements of {spec.dtype}")
    if mode == 3 and blob_len != fixed + spec.itemsize:
        raise ValueError(f"corrupt blob: constant blob of {blob_len} bytes (expected {fixed + spec.itemsize})")
    if mode in (1, 2) and n > CODED_ELEMENTS_PER_BYTE * blob_len:
        raise ValueError(f"corrupt blob: a coded blob of {blob_len} bytes cannot hold {n} elements")
    return shape, spec.dtype, mode


class _Reader:
    """Bounds-checked cursor over a blob body."""

    def __init__(self, data: memoryview, copy: bool = True) -> None:
        self.data = data
        self.pos = 0
        self.copy = copy

    def take(self, nbytes: int, what: str) -> memoryview:
        if nbytes < 0 or self.pos + nbytes > len(self.data):
            raise ValueError(
                f"truncated blob: {what} needs {nbytes} bytes at offset {self.pos}, blob has {len(self.data)}"
            )
        view = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return view

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, what))

    def array(self, count: int, np_dtype: str, what: str) -> np.ndarray:
        itemsize = np.dtype(np_dtype).itemsize
        arr = np.frombuffer(self.take(count * itemsize, what), dtype=np_dtype)
        return arr.copy() if self.copy else arr


def loads(
    cls: type[CompressedTensor],
    data: bytes | bytearray | memoryview,
    device: torch.device,
    max_const_bytes: int | None = MAX_CONST_BYTES,
    copy: bool = True,
) -> CompressedTensor:
    """Parse and validate a blob; allocates O(len(data)), never the declared output.

    Args:
        cls: The class to build.
        data: The blob.
        device: Where its arrays go.
        max_const_bytes: Largest decoded size accepted from a constant-mode blob (``None``: no cap).
        copy: ``False``: on the CPU, the large arrays (raw bytes, words, sign+mantissa) view ``data`` instead of
            copying it, so ``data`` must be writable and outlive the result.

    Raises:
        ValueError: On any inconsistency, or a constant blob declaring more than ``max_const_bytes``.
    """
    view = memoryview(data).cast("B")
    version, code, mode, ndim = _head(view, len(view))
    (crc,) = _CRC.unpack(view[-_CRC.size :])
    body = view[: -_CRC.size]
    if zlib.crc32(body) != crc:
        raise ValueError("corrupt blob: checksum mismatch")
    spec = spec_for_code(code)
    shape = _shape(body, ndim)
    rd = _Reader(body, copy or device.type != "cpu")
    rd.take(_HEAD.size + 8 * ndim, "header")
    n = math.prod(shape)
    if n * spec.itemsize >= 1 << 63:
        raise ValueError(f"corrupt blob: shape {tuple(shape)} is too large ({n} elements)")
    if version != VERSION and mode != 1:
        raise ValueError(f"corrupt blob: version {version} with mode {mode}")
    if mode == 0:
        raw = torch.from_numpy(rd.array(n * spec.itemsize, "u1", "raw payload"))
        _finish(rd)
        return cls(shape, spec.dtype, 0, None, DEFAULT_STEPS_PER_LANE, raw=raw.to(device))
    if mode == 3:
        if n < 2:
            raise ValueError(f"corrupt blob: constant mode with {n} elements")
        if max_const_bytes is not None and n * spec.itemsize > max_const_bytes:
            raise ValueError(
                f"constant blob declares {n * spec.itemsize} decoded bytes ({tuple(shape)} {spec.dtype}), over the "
                f"{max_const_bytes}-byte cap for constant blobs (pass max_const_bytes to allow it)"
            )
        value = torch.from_numpy(rd.array(spec.itemsize, "u1", "constant value"))
        _finish(rd)
        return cls(shape, spec.dtype, 3, None, DEFAULT_STEPS_PER_LANE, raw=value.to(device))
    if mode not in (1, 2):
        raise ValueError(f"corrupt blob: unknown mode {mode}")
    if n == 0:
        raise ValueError("corrupt blob: coded mode with no elements")
    if n > CODED_ELEMENTS_PER_BYTE * len(view):
        raise ValueError(f"corrupt blob: a coded blob of {len(view)} bytes cannot hold {n} elements")
    prob_bits, fold, nsym, steps, nwords = rd.unpack(_RANS, "coder header")
    if version == VERSION:
        fold = 0  # a reserved byte in version 1
    elif version == VERSION_FOLDED and not 1 <= fold <= max_fold_bits(spec, V2_SYMBOL_BITS):
        raise ValueError(f"corrupt blob: {fold} folded mantissa bits for {spec.dtype} in a version 2 blob")
    elif version == VERSION_COMPACT and not 0 <= fold <= max_fold_bits(spec):
        raise ValueError(f"corrupt blob: {fold} folded mantissa bits for {spec.dtype}")
    coding = folded(spec, fold)
    sm_bits, block_size, n_nan, scale_len = coding.sm_bits, None, 0, 0
    if mode == 2:
        k, log2, _, n_nan = rd.unpack(_LOSSY, "lossy header")
        if not 0 <= k < spec.man_bits:
            raise ValueError(f"corrupt blob: mantissa_bits {k} out of range for {spec.dtype}")
        if log2 != NO_BLOCK and log2 > MAX_BLOCK_LOG2:
            raise ValueError(f"corrupt blob: block size 2^{log2} out of range")
        if n_nan > n:
            raise ValueError(f"corrupt blob: {n_nan} NaN positions for {n} elements")
        sm_bits = 1 + k
        block_size = None if log2 == NO_BLOCK else 1 << log2
        scale_len = num_blocks(n, block_size) * scale_bytes(spec)
    if not MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS:
        raise ValueError(f"corrupt blob: prob_bits {prob_bits} out of range")
    if not 1 <= steps <= MAX_STEPS_PER_LANE:
        raise ValueError(f"corrupt blob: steps_per_lane {steps} out of range")
    if version == VERSION_COMPACT:
        table, rd.pos = decode_table(rd.data, rd.pos, nsym, prob_bits, coding.alphabet)
    else:
        table = _read_table(rd, nsym, prob_bits, coding.alphabet)
    k = effective_steps(n, steps)
    cw = 1 if version == VERSION_COMPACT and k <= 255 else 2
    lanes = num_lanes(n, k)
    if nwords > n:
        raise ValueError(f"corrupt blob: {nwords} words for {n} symbols")
    sm_len = (n * sm_bits + 7) // 8
    if rd.pos + 4 * lanes + cw * lanes + 2 * nwords + sm_len + scale_len + 8 * n_nan != len(body):
        raise ValueError("corrupt blob: section sizes do not add up to the blob length")
    states = rd.array(lanes, "<u4", "lane states")
    counts = rd.array(lanes, "<u1" if cw == 1 else "<u2", "lane word counts")
    words = rd.array(nwords, "<i2", "words")
    sm = rd.array(sm_len, "u1", "sign+mantissa")
    scales = rd.array(scale_len, "u1", "block scales") if mode == 2 and block_size is not None else None
    nans = rd.array(n_nan, "<i8", "NaN positions") if mode == 2 else None
    _finish(rd)
    if scales is not None and scales.size:
        per = scale_bytes(spec)
        fields = scales.reshape(-1, per).astype(np.int64) << (8 * np.arange(per, dtype=np.int64))
        if (fields.sum(1) >= 1 << spec.man_bits).any():
            raise ValueError("corrupt blob: a block scale exceeds the mantissa width")
    if nans is not None and ((nans < 0).any() or (nans >= n).any() or (np.diff(nans) <= 0).any()):
        raise ValueError("corrupt blob: NaN positions out of range or not ascending")
    if (states < STATE_LOWER).any():
        raise ValueError("corrupt blob: a lane state is below the rANS lower bound")
    if int(counts.astype(np.int64).sum()) != nwords:
        raise ValueError("corrupt blob: lane word counts do not sum to the word count")
    if (torch.from_numpy(counts.astype(np.int64)) > lane_lengths(n, k)).any():
        raise ValueError("corrupt blob: a lane holds more words than symbols")
    streams = Streams(
        states=torch.from_numpy(states.view(np.int32)),
        counts=torch.from_numpy(counts.astype(np.int32)),
        words=torch.from_numpy(words),
        sm=torch.from_numpy(sm),
    )
    assert lanes % LANES_PER_SEGMENT == 0
    if mode == 1:
        return cls(shape, spec.dtype, 1, table, steps, streams.to(device), fold_bits=fold)
    assert nans is not None
    return cls(
        shape,
        spec.dtype,
        2,
        table,
        steps,
        streams.to(device),
        None,
        sm_bits - 1,
        block_size,
        None if scales is None else torch.from_numpy(scales).to(device),
        torch.from_numpy(nans).to(device),
    )


def _read_table(rd: _Reader, nsym: int, prob_bits: int, alphabet: int) -> FreqTable:
    symbols = rd.array(nsym, "u1", "table symbols").tolist()
    freqs = rd.array(nsym, "<u2", "table frequencies").tolist()
    if not 1 <= nsym <= alphabet:
        raise ValueError(f"corrupt blob: {nsym} table symbols for an alphabet of {alphabet}")
    if any(s >= alphabet for s in symbols) or any(a >= b for a, b in zip(symbols, symbols[1:], strict=False)):
        raise ValueError("corrupt blob: table symbols out of range or not ascending")
    if min(freqs) < 1 or sum(freqs) != 1 << prob_bits:
        raise ValueError(f"corrupt blob: table frequencies do not sum to 2^{prob_bits}")
    return FreqTable(prob_bits, tuple(symbols), tuple(freqs))


def _finish(rd: _Reader) -> None:
    if rd.pos != len(rd.data):
        raise ValueError(f"corrupt blob: {len(rd.data) - rd.pos} trailing bytes")
