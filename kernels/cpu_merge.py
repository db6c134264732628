"""Scalar numba helpers that merge decoded exponents with the packed sign+mantissa stream (CPU backend)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(inline="always", nogil=True, boundscheck=False)
def sm_bf16(sm: np.ndarray, i: np.uint64) -> np.uint64:  # pragma: no cover - jitted
    v = np.uint64(sm[i])
    return ((v & np.uint64(0x80)) << np.uint64(8)) | (v & np.uint64(0x7F))


@numba.njit(inline="always", nogil=True, boundscheck=False)
def sm_fp16(sm: np.ndarray, i: np.uint64) -> np.uint64:  # pragma: no cover - jitted
    bit = i * np.uint64(11)
    o = bit >> np.uint64(3)
    v = np.uint64(sm[o])
    if o + np.uint64(1) < sm.size:
        v |= np.uint64(sm[o + np.uint64(1)]) << np.uint64(8)
    if o + np.uint64(2) < sm.size:
        v |= np.uint64(sm[o + np.uint64(2)]) << np.uint64(16)
    v = (v >> (bit & np.uint64(7))) & np.uint64(0x7FF)
    return ((v >> np.uint64(10)) << np.uint64(15)) | (v & np.uint64(0x3FF))


@numba.njit(inline="always", nogil=True, boundscheck=False)
def merge_fp16(out: np.ndarray, sm: np.ndarray, base: int, rest: int) -> None:  # pragma: no cover - jitted
    """OR the sign+mantissa fields of elements ``[base, base + rest)`` (``base % 8 == 0``) into ``out``."""
    u = np.uint64
    groups = rest // 8
    m = u(0x7FF)
    for g in range(groups):  # unsigned indices: no negative-index wraparound code in the loop
        o = u((base // 8 + g) * 11)
        lo = u64_le(sm, o)
        hi = u(sm[o + u(8)]) | (u(sm[o + u(9)]) << u(8)) | (u(sm[o + u(10)]) << u(16))
        r = u(base + 8 * g)
        f0 = lo & m
        f1 = (lo >> u(11)) & m
        f2 = (lo >> u(22)) & m
        f3 = (lo >> u(33)) & m
        f4 = (lo >> u(44)) & m
        f5 = ((lo >> u(55)) | (hi << u(9))) & m
        f6 = (hi >> u(2)) & m
        f7 = (hi >> u(13)) & m
        out[r] |= ((f0 >> u(10)) << u(15)) | (f0 & u(0x3FF))
        out[r + u(1)] |= ((f1 >> u(10)) << u(15)) | (f1 & u(0x3FF))
        out[r + u(2)] |= ((f2 >> u(10)) << u(15)) | (f2 & u(0x3FF))
        out[r + u(3)] |= ((f3 >> u(10)) << u(15)) | (f3 & u(0x3FF))
        out[r + u(4)] |= ((f4 >> u(10)) << u(15)) | (f4 & u(0x3FF))
        out[r + u(5)] |= ((f5 >> u(10)) << u(15)) | (f5 & u(0x3FF))
        out[r + u(6)] |= ((f6 >> u(10)) << u(15)) | (f6 & u(0x3FF))
        out[r + u(7)] |= ((f7 >> u(10)) << u(15)) | (f7 & u(0x3FF))
    for i in range(base + 8 * groups, base + rest):
        out[i] |= sm_fp16(sm, u(i))


@numba.njit(inline="always", nogil=True, boundscheck=False)
def u64_le(sm: np.ndarray, o: np.uint64) -> np.uint64:  # pragma: no cover - jitted
    """Little-endian uint64 from 8 bytes at ``o``."""
    u = np.uint64
    v = u(sm[o]) | (u(sm[o + u(1)]) << u(8)) | (u(sm[o + u(2)]) << u(16)) | (u(sm[o + u(3)]) << u(24))
    return (
        v
        | (u(sm[o + u(4)]) << u(32))
        | (u(sm[o + u(5)]) << u(40))
        | (u(sm[o + u(6)]) << u(48))
        | (u(sm[o + u(7)]) << u(56))
    )


@numba.njit(inline="always", nogil=True, boundscheck=False)
def sm_fp32(sm: np.ndarray, i: np.uint64) -> np.uint64:  # pragma: no cover - jitted
    o = np.uint64(3) * i
    v = np.uint64(sm[o]) | (np.uint64(sm[o + np.uint64(1)]) << np.uint64(8))
    v |= np.uint64(sm[o + np.uint64(2)]) << np.uint64(16)
    return ((v >> np.uint64(23)) << np.uint64(31)) | (v & np.uint64(0x7FFFFF))


@numba.njit(nogil=True, cache=True, boundscheck=False)
def merge_fields(
    out: np.ndarray, sm: np.ndarray, start: int, count: int, man_bits: int, total_bits: int
) -> None:  # pragma: no cover - jitted
    """OR ``sign << (total_bits - 1) | mantissa`` into ``out[start:start + count]`` from the LSB-first packed
    fields of ``man_bits + 1`` bits (any width up to 25; bounds-checked, for layouts without a fast path)."""
    u = np.uint64
    width = u(man_bits + 1)
    fmask = (u(1) << width) - u(1)
    mmask = (u(1) << u(man_bits)) - u(1)
    size = u(sm.size)
    for ii in range(start, start + count):
        i = u(ii)
        bit = i * width
        o = bit >> u(3)
        v = u(0)
        for q in range(4):
            if o + u(q) < size:
                v |= u(sm[o + u(q)]) << u(8 * q)
        v = (v >> (bit & u(7))) & fmask
        out[i] |= ((v >> u(man_bits)) << u(total_bits - 1)) | (v & mmask)
