"""Where the sections of a lossless blob lie, from its first bytes only: for blobs that stay on a device.

:func:`~kernels.blob.loads` parses a whole blob held in host memory. A blob that arrives in device memory (a
compressed all-gather on GPUs) need not travel to the host and back: :func:`layout` reads its header and frequency
table from a short prefix copied to the host (:data:`LAYOUT_PREFIX_BYTES` at most) and returns the byte range of
each array, which the caller then views or copies on the device. The checksum is not verified (that would need
every byte on the host); the structure is checked as :func:`~kernels.blob.loads` checks it, and corrupt coded
streams are caught by the decoder's consistency check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blob import _CRC, _RANS, VERSION, VERSION_COMPACT, _head, count_bytes, header_size, peek
from .blob_table import decode_table
from .freqtable import FreqTable
from .layout import MAX_PROB_BITS, MAX_STEPS_PER_LANE, MIN_PROB_BITS, effective_steps, num_lanes
from .spec import folded, max_fold_bits, spec_for_code

MAX_TABLE_BYTES = 2 + 1024 * (2 + 2) + 1024 * 3
"""Longest compact table section: a run count, at most 1024 runs of two 2-byte varints, 1024 3-byte frequencies."""
LAYOUT_PREFIX_BYTES = 8 + 8 * 64 + _RANS.size + MAX_TABLE_BYTES
"""Bytes of a blob's start that always hold its header and table (the longest shape, the coder header, the longest
table section)."""


@dataclass(frozen=True)
class BlobLayout:
    """A lossless blob's metadata and the byte ranges ``(start, stop)`` of its arrays within the blob.

    Attributes:
        shape: Shape of the tensor.
        dtype: Its dtype.
        mode: 0 (raw), 1 (rANS) or 3 (constant).
        table: The frequency table (rANS mode), else ``None``.
        fold_bits: Mantissa bits folded into each symbol.
        steps_per_lane: Symbols per lane as written.
        lanes: Number of lanes (rANS mode).
        count_width: Bytes per lane word count (1 or 2).
        states: Lane states (``lanes`` little-endian uint32).
        counts: Lane word counts (``lanes`` unsigned integers of ``count_width`` bytes).
        words: The 16-bit words.
        sm: The packed sign+mantissa fields.
        raw: The raw bytes (raw mode) or the one value (constant mode).
    """

    shape: torch.Size
    dtype: torch.dtype
    mode: int
    table: FreqTable | None = None
    fold_bits: int = 0
    steps_per_lane: int = 0
    lanes: int = 0
    count_width: int = 2
    states: tuple[int, int] = (0, 0)
    counts: tuple[int, int] = (0, 0)
    words: tuple[int, int] = (0, 0)
    sm: tuple[int, int] = (0, 0)
    raw: tuple[int, int] = (0, 0)


def layout(prefix: bytes | bytearray | memoryview, blob_len: int) -> BlobLayout:
    """The layout of a raw, constant or rANS blob of ``blob_len`` bytes from its first bytes.

    Args:
        prefix: The blob's first ``min(blob_len, LAYOUT_PREFIX_BYTES)`` bytes (or more).
        blob_len: The blob's full length.

    Raises:
        ValueError: Bad magic, version, dtype, mode, shape, coder header or table, sections that do not add up to
            ``blob_len``, a lossy blob (not parsed here), or a prefix too short for the header and table.
    """
    view = memoryview(prefix).cast("B")
    shape, dtype, mode = peek(view, blob_len)  # magic, version, dtype, shape, and sizes the length can hold
    version, code, _, ndim = _head(view, blob_len)
    spec = spec_for_code(code)
    n = math.prod(shape)
    fixed = header_size(ndim, mode) - _CRC.size
    if mode in (0, 3):
        return BlobLayout(shape, dtype, mode, raw=(fixed, blob_len - _CRC.size))
    if mode != 1:
        raise ValueError(f"a mode-{mode} (lossy) blob is not parsed in place; use CompressedTensor.from_bytes")
    if n == 0:
        raise ValueError("corrupt blob: coded mode with no elements")
    pos = 8 + 8 * ndim
    if len(view) < pos + _RANS.size:
        raise ValueError(f"truncated prefix: {len(view)} bytes do not hold the coder header")
    prob_bits, fold, nsym, steps, nwords = _RANS.unpack_from(view, pos)
    pos += _RANS.size
    if version == VERSION:
        fold = 0
    elif version == VERSION_COMPACT and not 0 <= fold <= max_fold_bits(spec):
        raise ValueError(f"corrupt blob: {fold} folded mantissa bits for {spec.dtype}")
    elif version not in (VERSION, VERSION_COMPACT):
        raise ValueError(f"a version-{version} blob is not parsed in place; use CompressedTensor.from_bytes")
    if not MIN_PROB_BITS <= prob_bits <= MAX_PROB_BITS:
        raise ValueError(f"corrupt blob: prob_bits {prob_bits} out of range")
    if not 1 <= steps <= MAX_STEPS_PER_LANE:
        raise ValueError(f"corrupt blob: steps_per_lane {steps} out of range")
    coding = folded(spec, fold)
    if version == VERSION_COMPACT:
        table, pos = decode_table(view, pos, nsym, prob_bits, coding.alphabet)
    else:
        raise ValueError("a version-1 rANS blob is not parsed in place; use CompressedTensor.from_bytes")
    k = effective_steps(n, steps)
    lanes = num_lanes(n, k)
    cw = count_bytes(n, steps)
    if nwords > n:
        raise ValueError(f"corrupt blob: {nwords} words for {n} symbols")
    sm_len = (n * coding.sm_bits + 7) // 8
    states = (pos, pos + 4 * lanes)
    counts = (states[1], states[1] + cw * lanes)
    words = (counts[1], counts[1] + 2 * nwords)
    sm = (words[1], words[1] + sm_len)
    if sm[1] + _CRC.size != blob_len:
        raise ValueError("corrupt blob: section sizes do not add up to the blob length")
    return BlobLayout(shape, dtype, 1, table, fold, steps, lanes, cw, states, counts, words, sm)
