"""Packing of sign+mantissa fields for the CPU encoder (numba), byte-identical to the torch reference.

Fields are packed LSB-first into one byte stream (docs/FORMAT.md). Folded bf16 fields (6 or 7 bits) are built 8 at a
time in a 64-bit register and written with one unaligned 8-byte store per group: each store overruns into the next
group's bytes, which that group's store then overwrites, so only the last group is written byte by byte.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.core.cgutils import get_or_insert_function
from numba.extending import intrinsic

from .simd_ir import I64x8, broadcast, element_ptr, splat


def _store_u64_intrinsic(typingctx: Any, ary: Any, at: Any, value: Any) -> Any:  # pragma: no cover - compiled
    """``ary[at:at+8] = value`` as little-endian bytes (``ary`` uint8, unaligned; ``at + 8 <= ary.size``)."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        ptr = element_ptr(context, builder, signature.args[0], args[0], args[1])
        wide = builder.bitcast(ptr, ir.IntType(64).as_pointer())
        builder.store(args[2], wide, align=1)
        return ir.Constant(ir.IntType(32), 0)

    return types.int32(ary, at, types.uint64), codegen


_store_u64: Any = intrinsic(_store_u64_intrinsic)


def _group_intrinsic(typingctx: Any, bits: Any, at: Any, man_bits: Any, width: Any) -> Any:  # pragma: no cover
    """Fields ``at .. at+7`` of 16-bit floats (sign above the ``man_bits`` mantissa bits) in one uint64, field ``q``
    at bit ``q * width``: one 8-lane vector load, the field arithmetic in 64-bit lanes, an OR reduction."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        i16x8 = ir.VectorType(ir.IntType(16), 8)
        ptr = builder.bitcast(element_ptr(context, builder, signature.args[0], args[0], args[1]), i16x8.as_pointer())
        wide = builder.zext(builder.load(ptr, align=2), I64x8)
        man = broadcast(builder, args[2], I64x8)
        mask = builder.sub(builder.shl(splat(1, I64x8), man), splat(1, I64x8))
        field = builder.or_(builder.shl(builder.lshr(wide, splat(15, I64x8)), man), builder.and_(wide, mask))
        lanes = ir.Constant(I64x8, list(range(8)))
        placed = builder.shl(field, builder.mul(lanes, broadcast(builder, args[3], I64x8)))
        reduce_ty = ir.FunctionType(ir.IntType(64), [I64x8])
        reduce = get_or_insert_function(builder.module, reduce_ty, "llvm.vector.reduce.or.v8i64")
        return builder.call(reduce, [placed])

    return types.uint64(bits, at, types.uint64, types.uint64), codegen


_group: Any = intrinsic(_group_intrinsic)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def pack_sm16(bits: np.ndarray, man_bits: int, width: int) -> np.ndarray:  # pragma: no cover - jitted
    """Pack 16-bit floats' sign+mantissa fields (``width = man_bits + 1``) LSB-first."""
    bits = np.ascontiguousarray(bits)  # the vector loads read consecutive elements
    n = bits.size
    nbytes = (n * width + 7) // 8
    mmask = (1 << man_bits) - 1
    if width == 8:
        out = np.empty(nbytes, dtype=np.uint8)
        for i in range(n):
            b32 = np.uint32(bits[i])
            out[i] = np.uint8(((b32 >> 15) << man_bits) | (b32 & mmask))
        return out
    u = np.uint64
    if 6 <= width < 8:  # folded bf16: 8 fields fill `width` whole bytes (an 8-byte store overruns < 2 groups)
        out = np.zeros(nbytes, dtype=np.uint8)
        uw, um, umask = u(width), u(man_bits), u(mmask)
        groups = n // 8
        for g in range(groups - 1):  # each 8-byte store ends inside the next group's bytes
            _store_u64(out, g * width, _group(bits, 8 * g, um, uw))
        for g in range(max(groups - 1, 0), groups):  # the last full group: its own bytes only
            a = _group(bits, 8 * g, um, uw)
            for q in range(width):
                out[g * width + q] = np.uint8((a >> u(8 * q)) & u(0xFF))
        acc = u(0)
        for i in range(groups * 8, n):  # the short tail group
            b = u(bits[i])
            acc |= (((b >> u(15)) << um) | (b & umask)) << (u(i & 7) * uw)
        for q in range(nbytes - groups * width):
            out[groups * width + q] = np.uint8((acc >> u(8 * q)) & u(0xFF))
        return out
    # Fields go into a 64-bit accumulator flushed as whole little-endian words (the same byte stream).
    words = np.zeros((nbytes + 7) // 8, dtype=np.uint64)
    acc = u(0)
    nacc = u(0)
    o = 0
    for i in range(n):
        b = u(bits[i])
        v = ((b >> u(15)) << u(man_bits)) | (b & u(mmask))
        acc |= v << nacc
        nacc += u(width)
        if nacc >= u(64):
            words[o] = acc
            o += 1
            nacc -= u(64)
            acc = v >> (u(width) - nacc)
    if nacc > u(0):
        words[o] = acc
    return words.view(np.uint8)[:nbytes]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def pack_sm32(bits: np.ndarray) -> np.ndarray:  # pragma: no cover - jitted
    """Pack fp32 sign+mantissa fields (24 bits) as 3 little-endian bytes each."""
    n = bits.size
    out = np.empty(3 * n, dtype=np.uint8)
    for i in range(n):
        b = bits[i]
        v = ((b >> 31) << 23) | (b & 0x7FFFFF)
        out[3 * i] = np.uint8(v & 0xFF)
        out[3 * i + 1] = np.uint8((v >> 8) & 0xFF)
        out[3 * i + 2] = np.uint8((v >> 16) & 0xFF)
    return out
