"""LLVM IR helpers for the numba intrinsics of the CPU backend: 8-lane vectors, splats and gathers."""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba.core.cgutils import get_or_insert_function

I1x8 = ir.VectorType(ir.IntType(1), 8)
I32x8 = ir.VectorType(ir.IntType(32), 8)
I64x8 = ir.VectorType(ir.IntType(64), 8)
F32x8 = ir.VectorType(ir.FloatType(), 8)


def splat(value: int, ty: ir.VectorType = I32x8) -> ir.Constant:
    """A constant vector with ``value`` in every lane."""
    return ir.Constant(ty, [value] * 8)


def broadcast(builder: ir.IRBuilder, scalar: ir.Value, ty: ir.VectorType) -> ir.Value:
    """A vector of type ``ty`` with the run-time ``scalar`` in every lane."""
    vec = ir.Constant(ty, ir.Undefined)
    for i in range(8):
        vec = builder.insert_element(vec, scalar, ir.Constant(ir.IntType(32), i))
    return vec


def element_ptr(context: Any, builder: ir.IRBuilder, aryty: Any, ary: ir.Value, index: ir.Value) -> ir.Value:
    """Pointer to element ``index`` of the numba array ``ary`` (of numba type ``aryty``), without bounds checks."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [index])


def gather_i32(
    context: Any,
    builder: ir.IRBuilder,
    aryty: Any,
    ary: ir.Value,
    index: ir.Value,
    width: int,
    start: ir.Value | None = None,
) -> ir.Value:
    """``ary[start + index]`` for an ``<8 x i32>`` (non-negative) or ``<8 x i64>`` index vector, as ``<8 x i32>``
    (zero-extended from ``width`` bits; ``start`` defaults to 0).

    A gather through a vector of pointers: LLVM emits hardware gathers or scalar loads, whichever its cost
    model prefers for the target. Every index must be in bounds.
    """
    first = element_ptr(context, builder, aryty, ary, start if start is not None else ir.Constant(ir.IntType(64), 0))
    base = builder.ptrtoint(first, ir.IntType(64))
    wide = index if index.type == I64x8 else builder.zext(index, I64x8)
    offsets = builder.shl(wide, splat((width // 8).bit_length() - 1, I64x8))
    addrs = builder.add(broadcast(builder, base, I64x8), offsets)
    ety = ir.IntType(width)
    ptrs = builder.inttoptr(addrs, ir.VectorType(ety.as_pointer(), 8))
    vty = ir.VectorType(ety, 8)
    gather_ty = ir.FunctionType(vty, [ptrs.type, ir.IntType(32), I1x8, vty])
    gather = get_or_insert_function(builder.module, gather_ty, f"llvm.masked.gather.v8i{width}.v8p0")
    align = ir.Constant(ir.IntType(32), width // 8)
    loaded = builder.call(gather, [ptrs, align, splat(1, I1x8), ir.Constant(vty, [0] * 8)])
    return loaded if width == 32 else builder.zext(loaded, I32x8)
