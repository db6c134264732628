"""numba loops of the lossy mode on CPU (bf16, fp16, fp32), byte-identical to the torch code in ``kernels.lossy``.

They do in one pass per element what ``kernels.lossy`` does with a dozen whole-tensor torch ops: quantization
(block absmax, division by the scale, the two-candidate decode-aware rounding) and the decoder's merge of carrier
exponents, packed fields and block scales. The float arithmetic is the same IEEE operations in the same
precision (fp32 for bf16 and fp16, fp64 for fp32; float -> bf16 and float -> fp16 are round-to-nearest-even on
the bits, with fp16 subnormals and overflow to inf, as torch does). The loops take the dtype as its header code
(1 bf16, 2 fp16, 3 fp32).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .spec import FloatSpec

_U32 = np.uint32


def supported(spec: FloatSpec) -> bool:
    """Whether these loops handle ``spec`` (bf16, fp16 and fp32)."""
    return spec.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _f32_intrinsic(typingctx: Any, bits: Any) -> Any:  # pragma: no cover - compiled
    """Reinterpret uint32 bits as a float32 (an LLVM bitcast)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


def _bits32_intrinsic(typingctx: Any, value: Any) -> Any:  # pragma: no cover - compiled
    """Reinterpret a float32 as its uint32 bits (an LLVM bitcast)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


_f32: Any = intrinsic(_f32_intrinsic)
_bits32: Any = intrinsic(_bits32_intrinsic)


@numba.njit(inline="always")
def _to_bf16(bits: Any) -> Any:  # pragma: no cover - jitted
    """Round fp32 bits (finite or inf) to bf16 bits, nearest even."""
    return (bits + _U32(0x7FFF) + ((bits >> _U32(16)) & _U32(1))) >> _U32(16)


@numba.njit(inline="always")
def _fp16_value(mag: Any) -> Any:  # pragma: no cover - jitted
    """A non-negative fp16 bit pattern as a float64 (exact; exponent 31 is inf, NaN never reaches here)."""
    e = mag >> 10
    m = mag & 0x3FF
    if e == 31:
        return np.inf
    if e == 0:  # subnormal: m * 2^-24, exact in float32
        return np.float64(np.float32(m) * np.float32(5.9604644775390625e-08))
    return np.float64(_f32(_U32(((e + 112) << 23) | (m << 13))))


@numba.njit(inline="always")
def _to_fp16(x: Any) -> Any:  # pragma: no cover - jitted
    """Bits of the non-negative float32 ``x`` rounded to fp16, nearest even (subnormals; overflow to inf)."""
    b = np.int64(_bits32(x))
    if b >= 0x47800000:  # >= 65536 (or inf): inf
        return np.int64(0x7C00)
    if b < 0x38800000:  # below 2^-14: adding 0.5 rounds x to a multiple of 2^-24 (nearest even) in float32
        return np.int64(_bits32(x + np.float32(0.5))) - 0x3F000000  # 1024 is the smallest normal's pattern
    return ((b + 0xFFF + ((b >> 13) & 1)) >> 13) - (112 << 10)  # a carry into exponent 31 gives inf


@numba.njit(inline="always")
def _value(mag: Any, code: int) -> Any:  # pragma: no cover - jitted
    """A magnitude bit pattern of the dtype as a float64 (exact)."""
    if code == 1:
        return np.float64(_f32(_U32(mag << 16)))
    if code == 2:
        return _fp16_value(mag)
    return np.float64(_f32(_U32(mag)))


@numba.njit(inline="always")
def _scaled(mag: Any, s: Any, code: int) -> Any:  # pragma: no cover - jitted
    """``dtype(value(mag) * s)``: fp32 product rounded to bf16 or fp16, or fp64 product rounded to fp32."""
    if code == 1:
        p = np.float32(_value(mag, 1)) * np.float32(s)
        return np.float64(_f32(_to_bf16(_bits32(p)) << _U32(16)))
    if code == 2:
        return _fp16_value(_to_fp16(np.float32(_value(mag, 2)) * np.float32(s)))
    return np.float64(np.float32(_value(mag, 3) * s))


@numba.njit(inline="always")
def _scaled_bits(mag: Any, s: Any, code: int) -> Any:  # pragma: no cover - jitted
    """Bits of ``dtype(value(mag) * s)`` (what ``_magnitude_of(_scaled(mag, s, code), code)`` gives, directly)."""
    if code == 1:
        return np.int64(_to_bf16(_bits32(np.float32(_value(mag, 1)) * np.float32(s))))
    if code == 2:
        return _to_fp16(np.float32(_value(mag, 2)) * np.float32(s))
    return np.int64(_bits32(np.float32(_value(mag, 3) * s)))


@numba.njit(inline="always")
def _magnitude_of(v: Any, code: int) -> Any:  # pragma: no cover - jitted
    """Bits of the non-negative finite ``v`` rounded to the dtype (fp32 value for bf16/fp16 first)."""
    if code == 1:
        return np.int64(_to_bf16(_bits32(np.float32(v))))
    if code == 2:
        return _to_fp16(np.float32(v))
    return np.int64(_bits32(np.float32(v)))


@numba.njit(inline="always")
def _error(a: Any, b: Any, code: int) -> Any:  # pragma: no cover - jitted
    """``|a - b|`` in torch's compute precision: float32 for bf16 and fp16, float64 for fp32."""
    if code != 3:
        return np.float64(abs(np.float32(a) - np.float32(b)))
    return abs(a - b)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _quantize(
    bits: np.ndarray, code: int, man: int, k: int, block: int, q: np.ndarray, scales: np.ndarray, nan: np.ndarray
) -> int:  # pragma: no cover - jitted
    n = bits.size
    total = 32 if code == 3 else 16
    top = np.int64(31 if code == 2 else 255)
    mmask = np.int64((1 << man) - 1)
    magmask = np.int64((1 << (total - 1)) - 1)
    drop = man - k
    step = block if block > 0 else n
    nnan = 0
    for b0 in range(0, n, step):
        b1 = min(n, b0 + step)
        s = 1.0
        if block > 0:
            amax = np.int64(0)
            for i in range(b0, b1):
                mag = np.int64(bits[i]) & magmask
                if (mag >> man) != top and mag > amax:
                    amax = mag
            f = amax & mmask if (amax >> man) > 0 else np.int64(0)
            scales[b0 // block] = f
            s = 1.0 + f / float(1 << man)
        for i in range(b0, b1):
            raw = np.int64(bits[i])
            sign = (raw >> (total - 1)) & 1
            mag = raw & magmask
            if (mag >> man) == top:
                if (mag & mmask) != 0:
                    if nnan < nan.size:
                        nan[nnan] = i
                    nnan += 1
                q[i] = (sign << (total - 1)) | (top << man)
                continue
            absx = _value(mag, code)
            target = mag
            if block > 0:
                if code == 1:
                    target = np.int64(_to_bf16(_bits32(np.float32(absx) / np.float32(s))))
                elif code == 2:
                    target = _to_fp16(np.float32(absx) / np.float32(s))
                else:
                    target = _magnitude_of(absx / s, 3)
            lo = (target >> drop) << drop
            hi = lo + (np.int64(1) << drop)
            err_lo = _error(absx, _scaled(lo, s, code) if block > 0 else _value(lo, code), code)
            pick: Any = False
            if (hi >> man) < top:
                v_hi = _scaled(hi, s, code) if block > 0 else _value(hi, code)
                err_hi = _error(v_hi, absx, code)
                odd = (lo >> man) > 0 if k == 0 else ((lo >> drop) & 1) == 1
                pick = err_hi < err_lo or (err_hi == err_lo and odd)
            q[i] = (sign << (total - 1)) | (hi if pick else lo)
    return nnan


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _merge(
    carrier: np.ndarray, sm: np.ndarray, code: int, man: int, k: int, block: int, scales: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - jitted
    """``sm`` must have 4 readable bytes past the last field (see :func:`merge`)."""
    u = np.uint64
    n = carrier.size
    total = 32 if code == 3 else 16
    cman = u(10 if code == 2 else 7)  # the carrier's mantissa width (fp16 carrier for fp16, else bf16)
    top = u(31 if code == 2 else 255)
    width = u(1 + k)
    fmask = u((1 << (1 + k)) - 1)
    kmask = u((1 << k) - 1)
    step = block if block > 0 else n
    for b0 in range(0, n, step):
        b1 = min(n, b0 + step)
        s = 1.0 + scales[b0 // block] / float(1 << man) if block > 0 else 1.0
        for ii in range(b0, b1):
            i = u(ii)
            pos = i * width
            j = pos >> u(3)
            v = u(sm[j]) | (u(sm[j + u(1)]) << u(8)) | (u(sm[j + u(2)]) << u(16)) | (u(sm[j + u(3)]) << u(24))
            field = (v >> (pos & u(7))) & fmask
            exp = (u(carrier[i]) >> cman) & top
            mag = (exp << u(man)) | ((field & kmask) << u(man - k))
            if block > 0 and exp != top:
                mag = u(_scaled_bits(np.int64(mag), s, code))
            out[i] = ((field >> u(k)) << u(total - 1)) | mag


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _fields(q: np.ndarray, code: int, man: int, k: int, carrier: np.ndarray, packed: np.ndarray) -> None:
    # pragma: no cover - jitted
    total = 32 if code == 3 else 16
    top = 31 if code == 2 else 255
    cman = 10 if code == 2 else 7
    width = 1 + k
    acc = np.uint64(0)
    nbits = 0
    pos = 0
    kmask = np.int64((1 << k) - 1)
    for i in range(q.size):
        v = np.int64(q[i])
        carrier[i] = ((v >> man) & top) << cman
        field = (((v >> (total - 1)) & 1) << k) | ((v >> (man - k)) & kmask)
        acc |= np.uint64(field) << np.uint64(nbits)
        nbits += width
        while nbits >= 8:
            packed[pos] = acc & np.uint64(255)
            acc >>= np.uint64(8)
            nbits -= 8
            pos += 1
    if nbits > 0:
        packed[pos] = acc & np.uint64(255)


def fields(q: torch.Tensor, spec: FloatSpec, mantissa_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponent carrier (fp16 for fp16, else bf16) and the packed ``1 + k``-bit fields of grid bit patterns."""
    n = q.numel()
    carrier = np.empty(n, dtype=np.int16)
    packed = np.zeros((n * (1 + mantissa_bits) + 7) // 8, dtype=np.uint8)
    _fields(q.numpy(), spec.code, spec.man_bits, mantissa_bits, carrier, packed)
    return torch.from_numpy(carrier).view(torch.float16 if spec.code == 2 else torch.bfloat16), torch.from_numpy(packed)


def quantize(
    x: torch.Tensor, spec: FloatSpec, mantissa_bits: int, block_size: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Same results as :func:`kernels.lossy.quantize`, but ``q`` is uint16 / uint32."""
    n = x.numel()
    is16 = spec.total_bits == 16
    bits = x.reshape(-1).view(spec.int_dtype).numpy().view(np.uint16 if is16 else np.uint32)
    q = np.empty(n, dtype=np.uint16 if is16 else np.uint32)  # the grid bit patterns, as compact as the input
    nblocks = 0 if block_size is None else -(-n // block_size)
    scales = np.zeros(max(nblocks, 1), dtype=np.int64)
    nan = np.empty(1024, dtype=np.int64)  # NaN positions; weights have none, so start small
    count = _quantize(bits, spec.code, spec.man_bits, mantissa_bits, block_size or 0, q, scales, nan)
    if count > nan.size:  # rerun with room for all of them
        nan = np.empty(count, dtype=np.int64)
        _quantize(bits, spec.code, spec.man_bits, mantissa_bits, block_size or 0, q, scales, nan)
    sc = None if block_size is None else torch.from_numpy(scales[:nblocks])
    return torch.from_numpy(q), sc, torch.from_numpy(nan[:count].copy())


def merge(
    carrier: torch.Tensor,
    sm: torch.Tensor,
    spec: FloatSpec,
    mantissa_bits: int,
    block_size: int | None,
    scales: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Decoded values (NaNs still as inf) from carrier exponents, packed fields and block scale fields."""
    is16 = spec.total_bits == 16
    sc = np.zeros(1, dtype=np.int64) if scales is None else scales.numpy()
    out_bits = out.view(spec.int_dtype).numpy().view(np.uint16 if is16 else np.uint32)
    padded = np.zeros(sm.numel() + 4, dtype=np.uint8)  # the loop reads 4 bytes per field
    padded[: sm.numel()] = sm.numpy()
    _merge(
        carrier.view(torch.int16).numpy(),
        padded,
        spec.code,
        spec.man_bits,
        mantissa_bits,
        block_size or 0,
        sc,
        out_bits,
    )
