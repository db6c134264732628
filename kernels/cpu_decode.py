"""Vectorized rANS decoder for the CPU backend: a segment's 32 lane states live in four 8-lane registers.

The scalar decoder is bound by its ~40 instructions per symbol and the store/reload of each lane's state
between steps. Here the states and word cursors of a segment are values of a numba ``Vec8`` type whose
data model is an LLVM ``<8 x i32>``, so they stay in vector registers for the whole segment. One step of
8 lanes (an intrinsic) does the slot lookup as a gather from a 32-bit decoder table, the state update,
and the renormalization, which gathers every lane's next word unconditionally (the cursor clamped to the
word array, so a corrupt blob cannot read out of bounds) and keeps it only where the state fell below ``L``.
The sign+mantissa fields are merged in the same vector code: 8-bit fields (bf16, fp16 with three folded
mantissa bits) as bytes directly, the other 16-bit layouts' 6- to 11-bit fields and fp32's 24-bit fields with one
unaligned load and a byte shuffle per 8 values. Rows near the end of the stream, where that load would overrun,
and other field widths are written as exponent bits and merged by scalar code.

The table entry is ``(freq - 1) << 20 | bias << 8 | r`` with ``bias = slot - cum`` and ``r`` the symbol's offset
from the smallest symbol, or, when the present symbols span more than 256 values, its rank among them, mapped back
by one more gather (``kernels/cpu_decode_table.py``): it fits 32 bits for ``prob_bits <= 12``
(``VECTOR_MAX_PROB_BITS``) and at most 256 present symbols. Other tables use the scalar decoder.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, models, register_model

from .cpu_decode_table import MAP_SIZE, MODE_MAP, VECTOR_MAX_PROB_BITS, table32, vector_table_ok
from .cpu_merge import merge_fields, merge_fp16, sm_bf16, sm_fp32
from .layout import LANES_PER_SEGMENT, STATE_LOWER
from .simd_ir import I32x8, broadcast, element_ptr, gather_i32, splat

PACKED_WIDTHS = {16: (6, 7, 9, 10, 11), 32: (24,)}
"""Sign+mantissa field widths the vector decoder merges with a shuffle, per float width (8-bit fields are merged
as bytes; any other width is decoded as exponent bits and merged by ``cpu_merge.merge_fields``)."""
_W = LANES_PER_SEGMENT
_I16x8 = ir.VectorType(ir.IntType(16), 8)
_I8x8 = ir.VectorType(ir.IntType(8), 8)


class Vec8Type(types.Type):
    """numba type of eight uint32 lanes held as one LLVM vector value."""

    def __init__(self) -> None:
        super().__init__(name="Vec8")


vec8 = Vec8Type()


@register_model(Vec8Type)
class _Vec8Model(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, I32x8)


def _vec_ptr(context: Any, builder: ir.IRBuilder, aryty: Any, ary: ir.Value, index: ir.Value, vty: Any) -> ir.Value:
    return builder.bitcast(element_ptr(context, builder, aryty, ary, index), vty.as_pointer())


def _vload_intrinsic(typingctx: Any, ary: Any, at: Any) -> Any:  # pragma: no cover - compiled
    """``ary[at:at+8]`` (uint32 or int32) as a ``Vec8``."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        return builder.load(_vec_ptr(context, builder, signature.args[0], args[0], args[1], I32x8), align=4)

    return vec8(ary, at), codegen


def _vstore_intrinsic(typingctx: Any, ary: Any, at: Any, value: Any) -> Any:  # pragma: no cover - compiled
    """``ary[at:at+8] = value`` (a 32-bit array, or a 16-bit one: then the low halves are stored)."""
    width = ary.dtype.bitwidth

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        vty = ir.VectorType(ir.IntType(width), 8)
        val = args[2] if width == 32 else builder.trunc(args[2], vty)
        builder.store(val, _vec_ptr(context, builder, signature.args[0], args[0], args[1], vty), align=width // 8)
        return ir.Constant(ir.IntType(32), 0)

    return types.int32(ary, at, value), codegen


def _shl_intrinsic(typingctx: Any, value: Any, shift: Any) -> Any:  # pragma: no cover - compiled
    """Every lane shifted left by the same amount."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        return builder.shl(args[0], broadcast(builder, builder.trunc(args[1], ir.IntType(32)), I32x8))

    return vec8(value, shift), codegen


def _vmap_intrinsic(typingctx: Any, table: Any, at: Any, value: Any) -> Any:  # pragma: no cover - compiled
    """Every lane ``v`` replaced by ``table[at + v]`` (a gather; ``at + v`` in bounds)."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        return gather_i32(context, builder, signature.args[0], args[0], args[2], 32, args[1])

    return vec8(table, at, value), codegen


def _step_intrinsic(
    typingctx: Any, x: Any, p: Any, table: Any, words: Any, start: Any, lim: Any, pb: Any, base: Any
) -> Any:  # pragma: no cover - compiled
    """One decoding step of 8 lanes: returns ``(states, cursors, symbols)`` (symbols with ``base`` added).

    Cursors are relative to ``words[start]``; reads are clamped to relative position ``lim``.
    """

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        state, pos, tab_v, words_v, start_v, lim_v, pb_v, base_v = args
        sty = signature.args
        pbs = broadcast(builder, builder.trunc(pb_v, ir.IntType(32)), I32x8)
        slot = builder.and_(state, builder.sub(builder.shl(splat(1), pbs), splat(1)))
        entry = gather_i32(context, builder, sty[2], tab_v, slot, 32)
        freq = builder.add(builder.lshr(entry, splat(20)), splat(1))
        bias = builder.and_(builder.lshr(entry, splat(8)), splat(0xFFF))
        new = builder.add(builder.mul(freq, builder.lshr(state, pbs)), bias)
        refill = builder.icmp_unsigned("<", new, splat(STATE_LOWER))
        lim8 = broadcast(builder, builder.trunc(lim_v, ir.IntType(32)), I32x8)
        safe = builder.select(builder.icmp_unsigned(">", pos, lim8), lim8, pos)
        word = gather_i32(context, builder, sty[3], words_v, safe, 16, start_v)
        state = builder.select(refill, builder.or_(builder.shl(new, splat(16)), word), new)
        pos = builder.add(pos, builder.zext(refill, I32x8))
        base8 = broadcast(builder, builder.trunc(base_v, ir.IntType(32)), I32x8)
        sym = builder.add(builder.and_(entry, splat(0xFF)), base8)
        return context.make_tuple(builder, signature.return_type, [state, pos, sym])

    return types.UniTuple(vec8, 3)(x, p, table, words, start, lim, pb, base), codegen


def _store_bf16_intrinsic(typingctx: Any, out: Any, sm: Any, at: Any, sym: Any) -> Any:  # pragma: no cover
    """``out[at:at+8] = sign << 15 | sym << 7 | mantissa`` from the bf16 sign+mantissa bytes ``sm[at:at+8]``."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        out_v, sm_v, at_v, sym_v = args
        sty = signature.args
        fields = builder.zext(builder.load(_vec_ptr(context, builder, sty[1], sm_v, at_v, _I8x8), align=1), _I16x8)
        sign = builder.shl(builder.and_(fields, splat(0x80, _I16x8)), splat(8, _I16x8))
        exp = builder.shl(builder.trunc(sym_v, _I16x8), splat(7, _I16x8))
        value = builder.or_(builder.or_(sign, builder.and_(fields, splat(0x7F, _I16x8))), exp)
        builder.store(value, _vec_ptr(context, builder, sty[0], out_v, at_v, _I16x8), align=2)
        return ir.Constant(ir.IntType(32), 0)

    return types.int32(out, sm, at, sym), codegen


def _field_load_bytes(fieldw: int) -> int:
    """Bytes ``_store_packed`` loads for 8 fields of ``fieldw`` bits (each field's 4-byte window included)."""
    return 16 if (7 * fieldw) // 8 + 4 <= 16 else 32


def _store_packed_intrinsic(typingctx: Any, out: Any, sm: Any, at: Any, sym: Any, fieldw: Any) -> Any:
    """Merge 8 symbols at ``at`` (``at % 8 == 0``) with their packed sign+mantissa fields of literal width
    ``fieldw`` (6 to 11 for the 16-bit layouts, folded or not; 24 fp32).

    The 8 fields fill ``fieldw`` whole bytes from byte ``at / 8 * fieldw``; they are fetched with one unaligned
    load of 16 or 32 bytes and one byte shuffle, so the caller must make sure the load stays inside ``sm``.
    """  # pragma: no cover - compiled
    if not isinstance(fieldw, types.IntegerLiteral):
        return None  # numba retries with the literal
    width = out.dtype.bitwidth
    w = fieldw.literal_value
    nbytes = _field_load_bytes(w)
    picks = [(j * w) // 8 + q for j in range(8) for q in range(4)]
    shifts = [(j * w) % 8 for j in range(8)]
    man = w - 1

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        out_v, sm_v, at_v, sym_v, _ = args
        sty = signature.args
        i64 = ir.IntType(64)
        offset = builder.mul(builder.lshr(at_v, ir.Constant(i64, 3)), ir.Constant(i64, w))
        vty = ir.VectorType(ir.IntType(8), nbytes)
        raw = builder.load(_vec_ptr(context, builder, sty[1], sm_v, offset, vty), align=1)
        spread = builder.shuffle_vector(raw, raw, ir.Constant(ir.VectorType(ir.IntType(32), 32), picks))
        fields = builder.bitcast(spread, I32x8)
        fields = builder.and_(builder.lshr(fields, ir.Constant(I32x8, shifts)), splat((1 << w) - 1))
        sign = builder.shl(builder.lshr(fields, splat(man)), splat(width - 1))
        value = builder.or_(
            builder.or_(sign, builder.and_(fields, splat((1 << man) - 1))), builder.shl(sym_v, splat(man))
        )
        oty = ir.VectorType(ir.IntType(width), 8)
        if width == 16:
            value = builder.trunc(value, oty)
        builder.store(value, _vec_ptr(context, builder, sty[0], out_v, at_v, oty), align=width // 8)
        return ir.Constant(ir.IntType(32), 0)

    return types.int32(out, sm, at, sym, fieldw), codegen


_store_packed: Any = intrinsic(_store_packed_intrinsic)
_vload: Any = intrinsic(_vload_intrinsic)
_vstore: Any = intrinsic(_vstore_intrinsic)
_shl: Any = intrinsic(_shl_intrinsic)
_step: Any = intrinsic(_step_intrinsic)
_vmap: Any = intrinsic(_vmap_intrinsic)
_store_bf16: Any = intrinsic(_store_bf16_intrinsic)


@numba.njit(inline="always", nogil=True, boundscheck=False)
def _field_load_end(at: int, fieldw: int) -> int:  # pragma: no cover - jitted
    """One past the last sign+mantissa byte that ``_store_packed`` reads for the 8 values at ``at``."""
    return at // 8 * fieldw + (16 if (7 * fieldw) // 8 + 4 <= 16 else 32)


@numba.njit(inline="always", nogil=True, boundscheck=False)
def _store_row(out: np.ndarray, sm: np.ndarray, r: int, y0: Any, y1: Any, y2: Any, y3: Any, fieldw: int) -> None:
    """One row of 32 values with packed fields of width ``fieldw`` (one of :data:`PACKED_WIDTHS`)."""
    # pragma: no cover - jitted
    if fieldw == 11:
        _store_packed(out, sm, r, y0, 11)
        _store_packed(out, sm, r + 8, y1, 11)
        _store_packed(out, sm, r + 16, y2, 11)
        _store_packed(out, sm, r + 24, y3, 11)
    elif fieldw == 10:
        _store_packed(out, sm, r, y0, 10)
        _store_packed(out, sm, r + 8, y1, 10)
        _store_packed(out, sm, r + 16, y2, 10)
        _store_packed(out, sm, r + 24, y3, 10)
    elif fieldw == 7:
        _store_packed(out, sm, r, y0, 7)
        _store_packed(out, sm, r + 8, y1, 7)
        _store_packed(out, sm, r + 16, y2, 7)
        _store_packed(out, sm, r + 24, y3, 7)
    elif fieldw == 6:
        _store_packed(out, sm, r, y0, 6)
        _store_packed(out, sm, r + 8, y1, 6)
        _store_packed(out, sm, r + 16, y2, 6)
        _store_packed(out, sm, r + 24, y3, 6)
    elif fieldw == 9:
        _store_packed(out, sm, r, y0, 9)
        _store_packed(out, sm, r + 8, y1, 9)
        _store_packed(out, sm, r + 16, y2, 9)
        _store_packed(out, sm, r + 24, y3, 9)
    else:
        _store_packed(out, sm, r, y0, 24)
        _store_packed(out, sm, r + 8, y1, 24)
        _store_packed(out, sm, r + 16, y2, 24)
        _store_packed(out, sm, r + 24, y3, 24)


@numba.njit(inline="always", nogil=True, boundscheck=False)
def _merge_tail(out: np.ndarray, sm: np.ndarray, r0: int, cnt: int, code: int, man_bits: int) -> None:
    # pragma: no cover - jitted
    """OR the sign+mantissa fields of ``out[r0:r0+cnt]`` (which holds exponent bits) into place."""
    u = np.uint64
    if code == 0:
        return
    if code == 2 and man_bits == 10:
        merge_fp16(out, sm, r0, cnt)
    elif code == 3 and man_bits == 23:
        for j in range(cnt):
            out[u(r0 + j)] |= sm_fp32(sm, u(r0 + j))
    elif code != 3 and man_bits == 7:  # 8-bit fields: bf16, or fp16 with three folded bits
        for j in range(cnt):
            out[u(r0 + j)] |= sm_bf16(sm, u(r0 + j))
    else:
        merge_fields(out, sm, r0, cnt, man_bits, 32 if code == 3 else 16)


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def decode_lanes(
    out: np.ndarray,
    sm: np.ndarray,
    states: np.ndarray,
    offsets: np.ndarray,
    words: np.ndarray,
    table: np.ndarray,
    pb: int,
    k: int,
    code: int,
    man_bits: int,
) -> int:  # pragma: no cover - jitted
    """Decode all segments (in parallel) into ``out`` (uint16/uint32 bits); returns the inconsistent segments.

    Same contract as the scalar ``kernels.cpu._decode_lanes``, with ``table`` from :func:`table32`. ``code`` is
    the dtype code (1 bf16, 2 fp16, 3 fp32) with fields of ``man_bits + 1`` bits (8 or one of
    :data:`PACKED_WIDTHS`; the caller routes other widths to ``code`` 0), or 0 to write exponent bits only.
    """
    nslots = 1 << pb
    mapped = table[nslots + MAP_SIZE] == MODE_MAP  # symbols are map[r], else map[0] + r (cpu_decode_table)
    sbase = np.uint32(0) if mapped else table[nslots]
    n = out.size
    seg = _W * k
    nseg = (n + seg - 1) // seg
    bad = np.zeros(nseg, dtype=np.uint8)  # per segment, not a `+=` reduction: numba's parfor pass fails on that
    for g in numba.prange(nseg):  # under Python 3.12 ("unexpected cycle in lookup()")
        base = g * seg
        rest = min(seg, n - base)
        full = rest // _W
        # Cursors are relative to `start`; `start` is pulled back onto the array when a trailing segment
        # has no words, so even a corrupt blob reads only inside `words`.
        start = min(offsets[g * _W], words.size - 1)
        lim = min(words.size - 1 - start, 0x7FFFFFFF)  # the step compares 32-bit relative cursors
        rel = np.empty(_W, dtype=np.uint32)
        xs = np.empty(_W, dtype=np.uint32)
        for j in range(_W):
            rel[j] = np.uint32(offsets[g * _W + j] - start)
        x0, x1 = _vload(states, g * _W), _vload(states, g * _W + 8)
        x2, x3 = _vload(states, g * _W + 16), _vload(states, g * _W + 24)
        p0, p1, p2, p3 = _vload(rel, 0), _vload(rel, 8), _vload(rel, 16), _vload(rel, 24)
        # fp16/fp32 fields are loaded 16/32 bytes at a time: rows from `fused` on would read past `sm`, so
        # they get exponent bits here and a scalar merge below. The hot loops call only intrinsics.
        fieldw = man_bits + 1
        fused = full if code != 0 else 0  # code 0: exponent bits only, no fields to merge
        while fieldw != 8 and fused > 0 and _field_load_end(base + (fused - 1) * _W + 24, fieldw) > sm.size:
            fused -= 1
        for s in range(fused):
            r = base + s * _W
            x0, p0, y0 = _step(x0, p0, table, words, start, lim, pb, sbase)
            x1, p1, y1 = _step(x1, p1, table, words, start, lim, pb, sbase)
            x2, p2, y2 = _step(x2, p2, table, words, start, lim, pb, sbase)
            x3, p3, y3 = _step(x3, p3, table, words, start, lim, pb, sbase)
            if mapped:
                y0, y1 = _vmap(table, nslots, y0), _vmap(table, nslots, y1)
                y2, y3 = _vmap(table, nslots, y2), _vmap(table, nslots, y3)
            if fieldw == 8:
                _store_bf16(out, sm, r, y0)
                _store_bf16(out, sm, r + 8, y1)
                _store_bf16(out, sm, r + 16, y2)
                _store_bf16(out, sm, r + 24, y3)
            else:
                _store_row(out, sm, r, y0, y1, y2, y3, fieldw)
        for s in range(fused, full):
            r = base + s * _W
            x0, p0, y0 = _step(x0, p0, table, words, start, lim, pb, sbase)
            x1, p1, y1 = _step(x1, p1, table, words, start, lim, pb, sbase)
            x2, p2, y2 = _step(x2, p2, table, words, start, lim, pb, sbase)
            x3, p3, y3 = _step(x3, p3, table, words, start, lim, pb, sbase)
            if mapped:
                y0, y1 = _vmap(table, nslots, y0), _vmap(table, nslots, y1)
                y2, y3 = _vmap(table, nslots, y2), _vmap(table, nslots, y3)
            _vstore(out, r, _shl(y0, man_bits))
            _vstore(out, r + 8, _shl(y1, man_bits))
            _vstore(out, r + 16, _shl(y2, man_bits))
            _vstore(out, r + 24, _shl(y3, man_bits))
        _vstore(xs, 0, x0)
        _vstore(xs, 8, x1)
        _vstore(xs, 16, x2)
        _vstore(xs, 24, x3)
        _vstore(rel, 0, p0)
        _vstore(rel, 8, p1)
        _vstore(rel, 16, p2)
        _vstore(rel, 24, p3)
        r0 = base + full * _W
        for j in range(rest - full * _W):  # the partial last row, scalar
            xj = xs[j]
            e = table[xj & np.uint32((1 << pb) - 1)]
            xn = ((e >> np.uint32(20)) + np.uint32(1)) * (xj >> np.uint32(pb)) + (
                (e >> np.uint32(8)) & np.uint32(0xFFF)
            )
            if xn < np.uint32(STATE_LOWER):
                xn = (xn << np.uint32(16)) | np.uint32(words[start + min(int(rel[j]), lim)])
                rel[j] += np.uint32(1)
            xs[j] = xn
            out[r0 + j] = table[nslots + (e & np.uint32(0xFF))] << np.uint32(man_bits)
        _merge_tail(out, sm, base + fused * _W, rest - fused * _W, code, man_bits)
        err = 0
        for j in range(_W):
            if xs[j] != np.uint32(STATE_LOWER) or start + np.int64(rel[j]) != offsets[g * _W + j + 1]:
                err = 1
        bad[g] = err
    return int(bad.sum())


__all__ = [
    "MAP_SIZE",
    "MODE_MAP",
    "PACKED_WIDTHS",
    "VECTOR_MAX_PROB_BITS",
    "decode_lanes",
    "table32",
    "vector_table_ok",
]
