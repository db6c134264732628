"""Vectorized rANS encoder for the CPU backend: 8 lanes per SIMD step, byte-identical to the scalar coder.

The scalar coder spends about 10 cycles per symbol, most of it on the per-lane integer division
``x // freq`` and on bookkeeping. Here the 32 lanes of a segment are encoded as four 8-wide vectors
(an LLVM intrinsic, so AVX2 on x86): symbol extraction, one gathered table lookup, the renormalization
test, and the division done in float32 with an exact integer correction. Emitted renormalization words
are scattered into per-lane scratch regions afterwards, only for the lanes that emitted (about one in six).

Exactness of the float division: after renormalization ``x < freq << (32 - prob_bits)``, so the quotient
``q = x // freq`` is below ``2 ** (32 - prob_bits)``. ``float32(x) / float32(freq)`` carries two roundings
(relative error < 2 ** -23), an absolute error below ``2 ** (9 - prob_bits)``, which is at most 0.5 for
``prob_bits >= 10``. The truncated estimate is then ``q - 1``, ``q`` or ``q + 1``, and one signed remainder
test in each direction makes it exact. Smaller ``prob_bits`` use the scalar coder (``VECTOR_MIN_PROB_BITS``).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.cpython.unsafe.numbers import trailing_zeros as _trailing_zeros
from numba.extending import intrinsic

from .layout import LANES_PER_SEGMENT, STATE_LOWER
from .simd_ir import broadcast as _broadcast
from .simd_ir import element_ptr as _element_ptr
from .simd_ir import gather_i32
from .simd_ir import splat as _splat

VECTOR_MIN_PROB_BITS = 10
"""The float32 division is exact after one correction only for ``prob_bits >= 10`` (module docstring)."""
_W = LANES_PER_SEGMENT
_I32x8 = ir.VectorType(ir.IntType(32), 8)
_F32x8 = ir.VectorType(ir.FloatType(), 8)


def _encode8_intrinsic(
    typingctx: Any, bits: Any, at: Any, table: Any, x: Any, xi: Any, low: Any, li: Any, shift: Any, mask: Any, pb: Any
) -> Any:  # pragma: no cover - compiled
    """One rANS encoding step of 8 lanes; returns the 8-bit mask of lanes that emitted a word.

    ``bits[at:at+8]`` are the float bit patterns (uint16 or uint32), ``table[sym] = cum << 16 | freq``,
    ``x[xi:xi+8]`` the uint32 states (updated in place) and ``low[li:li+8]`` receives each state's low word
    before renormalization (meaningful where the mask bit is set).
    """
    sig = types.uint32(bits, at, table, x, xi, low, li, shift, mask, pb)
    width = bits.dtype.bitwidth

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        bits_v, at_v, tab_v, x_v, xi_v, low_v, li_v, shift_v, mask_v, pb_v = args
        sty = signature.args
        vin = ir.VectorType(ir.IntType(width), 8)
        src = builder.bitcast(_element_ptr(context, builder, sty[0], bits_v, at_v), vin.as_pointer())
        raw = builder.load(src, align=width // 8)
        wide = builder.zext(raw, _I32x8) if width < 32 else raw
        shift32 = builder.trunc(shift_v, ir.IntType(32))
        mask32 = builder.trunc(mask_v, ir.IntType(32))
        pb32 = builder.trunc(pb_v, ir.IntType(32))
        shifted = builder.lshr(wide, _broadcast(builder, shift32, _I32x8))
        sym = builder.and_(shifted, _broadcast(builder, mask32, _I32x8))
        entry = gather_i32(context, builder, sty[2], tab_v, sym, 32)
        freq = builder.and_(entry, _splat(0xFFFF))
        cum = builder.lshr(entry, _splat(16))
        xptr = builder.bitcast(_element_ptr(context, builder, sty[3], x_v, xi_v), _I32x8.as_pointer())
        state = builder.load(xptr, align=4)
        top = builder.sub(ir.Constant(ir.IntType(32), 32), pb32)
        emit = builder.icmp_unsigned(">=", builder.lshr(state, _broadcast(builder, top, _I32x8)), freq)
        low16 = ir.VectorType(ir.IntType(16), 8)
        lptr = builder.bitcast(_element_ptr(context, builder, sty[5], low_v, li_v), low16.as_pointer())
        builder.store(builder.trunc(state, low16), lptr, align=2)
        state = builder.select(emit, builder.lshr(state, _splat(16)), state)
        quot = builder.fptosi(builder.fdiv(builder.uitofp(state, _F32x8), builder.sitofp(freq, _F32x8)), _I32x8)
        rem = builder.sub(state, builder.mul(quot, freq))
        under = builder.icmp_signed("<", rem, _splat(0))
        quot = builder.select(under, builder.sub(quot, _splat(1)), quot)
        rem = builder.select(under, builder.add(rem, freq), rem)
        over = builder.icmp_signed(">=", rem, freq)
        quot = builder.select(over, builder.add(quot, _splat(1)), quot)
        rem = builder.select(over, builder.sub(rem, freq), rem)
        new = builder.add(builder.add(builder.shl(quot, _broadcast(builder, pb32, _I32x8)), rem), cum)
        builder.store(new, xptr, align=4)
        return builder.zext(builder.bitcast(emit, ir.IntType(8)), ir.IntType(32))

    return sig, codegen


_encode8: Any = intrinsic(_encode8_intrinsic)
_ctz: Any = _trailing_zeros


@numba.njit(nogil=True, cache=True, boundscheck=False)
def encode_lanes(
    bits: np.ndarray, shift: int, mask: int, table: np.ndarray, pb: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - jitted
    """Encode all segments; same outputs as the scalar ``kernels.cpu._encode_lanes``.

    ``table[sym] = cum << 16 | freq`` (uint32). Requires ``prob_bits >= VECTOR_MIN_PROB_BITS``.
    """
    n = bits.size
    seg = _W * k
    nseg = (n + seg - 1) // seg
    states = np.empty(nseg * _W, dtype=np.uint32)
    counts = np.empty(nseg * _W, dtype=np.int32)
    words = np.empty(max(n // 4, 1024), dtype=np.uint16)
    # Per-lane scratch regions, filled backwards. The stride is padded to an odd number of 64-byte lines
    # so the 32 regions do not all map to the same L1 cache set.
    stride = ((k + 1 + 31) // 32) * 32 + 32
    scratch = np.empty(_W * stride, dtype=np.uint16)
    low = np.empty(_W, dtype=np.uint16)
    pos = np.empty(_W, dtype=np.int64)
    x = np.empty(_W, dtype=np.uint32)
    ushift = np.uint32(shift)
    umask = np.uint32(mask)
    upb = np.uint32(pb)
    top = np.uint32(32 - pb)
    wp = 0
    for g in range(nseg):
        base = g * seg
        rest = min(seg, n - base)
        full = rest // _W
        for j in range(_W):
            x[j] = STATE_LOWER
            pos[j] = j * stride + k + 1
        row = base + full * _W
        for j in range(rest - full * _W):  # the partial last row (encoding runs backwards), scalar
            sym = (np.uint32(bits[row + j]) >> ushift) & umask
            f = table[sym] & np.uint32(0xFFFF)
            xs = x[j]
            if (xs >> top) >= f:
                pos[j] -= 1
                scratch[pos[j]] = np.uint16(xs & np.uint32(0xFFFF))
                xs >>= np.uint32(16)
            q = xs // f
            x[j] = (q << upb) + (xs - q * f) + (table[sym] >> np.uint32(16))
        for s in range(full - 1, -1, -1):
            at = base + s * _W
            emitted = _encode8(bits, at, table, x, 0, low, 0, ushift, umask, upb)
            emitted |= _encode8(bits, at + 8, table, x, 8, low, 8, ushift, umask, upb) << np.uint32(8)
            emitted |= _encode8(bits, at + 16, table, x, 16, low, 16, ushift, umask, upb) << np.uint32(16)
            emitted |= _encode8(bits, at + 24, table, x, 24, low, 24, ushift, umask, upb) << np.uint32(24)
            while emitted:
                j = _ctz(emitted)
                p = pos[j] - 1
                scratch[p] = low[j]
                pos[j] = p
                emitted &= emitted - np.uint32(1)
        for j in range(_W):
            lane = g * _W + j
            states[lane] = x[j]
            first = pos[j]
            end = j * stride + k + 1
            cnt = end - first
            counts[lane] = cnt
            if wp + cnt > words.size:
                grown = np.empty(max(2 * words.size, wp + cnt), dtype=np.uint16)
                grown[:wp] = words[:wp]
                words = grown
            words[wp : wp + cnt] = scratch[first:end]
            wp += cnt
    return states, counts, words[:wp].copy()
