"""Float dtype descriptions: how a value splits into an exponent symbol and a sign+mantissa field."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatSpec:
    """Bit layout of one IEEE-style float dtype.

    Attributes:
        dtype: The torch dtype.
        code: The dtype's code in the blob header (see docs/FORMAT.md).
        total_bits: Width of one value.
        exp_bits: Width of the exponent field (the entropy-coded symbol).
        man_bits: Width of the stored mantissa field.
        int_dtype: Signed integer dtype of the same width, used to view the bits.
    """

    dtype: torch.dtype
    code: int
    total_bits: int
    exp_bits: int
    man_bits: int
    int_dtype: torch.dtype

    @property
    def sm_bits(self) -> int:
        """Width of the raw sign+mantissa field (sign on top of the mantissa)."""
        return 1 + self.man_bits

    @property
    def alphabet(self) -> int:
        """Number of distinct exponent symbols."""
        return 1 << self.exp_bits

    @property
    def itemsize(self) -> int:
        """Bytes per value."""
        return self.total_bits // 8


SPECS: tuple[FloatSpec, ...] = (
    FloatSpec(torch.bfloat16, 1, 16, 8, 7, torch.int16),
    FloatSpec(torch.float16, 2, 16, 5, 10, torch.int16),
    FloatSpec(torch.float32, 3, 32, 8, 23, torch.int32),
)
_BY_DTYPE = {s.dtype: s for s in SPECS}
_BY_CODE = {s.code: s for s in SPECS}


def spec_for(dtype: torch.dtype) -> FloatSpec:
    """Return the layout of ``dtype``.

    Raises:
        TypeError: ``dtype`` is not bfloat16, float16 or float32 (integers, bool, complex, float8, float64...).
    """
    spec = _BY_DTYPE.get(dtype)
    if spec is None:
        supported = ", ".join(str(s.dtype) for s in SPECS)
        raise TypeError(f"nz_lightning cannot compress tensors of dtype {dtype}; supported dtypes: {supported}")
    return spec


MAX_SYMBOL_BITS = 10
"""Widest rANS symbol (exponent plus folded mantissa bits) a blob of version 3 may code (alphabet 1024)."""
V2_SYMBOL_BITS = 8
"""Widest symbol of a version-2 blob (table symbols stored as u8: only fp16 folds there, 1 to 3 bits)."""


def max_fold_bits(spec: FloatSpec, symbol_bits: int = MAX_SYMBOL_BITS) -> int:
    """How many top mantissa bits can join the exponent in one rANS symbol of at most ``symbol_bits`` bits.

    With the default (version 3 blobs) that is 2 for bf16 and fp32 and 5 for fp16; version 2 blobs allow
    ``max_fold_bits(spec, V2_SYMBOL_BITS)`` (3 for fp16, 0 for the others).
    """
    return max(0, symbol_bits - spec.exp_bits)


@functools.lru_cache(maxsize=64)
def folded(spec: FloatSpec, bits: int) -> FloatSpec:
    """The coding layout with the top ``bits`` mantissa bits moved from the raw field into the symbol.

    ``folded(spec, 0)`` is ``spec``. The top mantissa bits of weight-like data are not uniform, so coding them
    with the exponent saves bits (docs/FORMAT.md §1.1, versions 2 and 3).

    Raises:
        ValueError: ``bits`` is negative or the symbol would exceed :data:`MAX_SYMBOL_BITS`.
    """
    if not 0 <= bits <= max_fold_bits(spec):
        raise ValueError(f"cannot fold {bits} mantissa bits into the {spec.exp_bits}-bit exponent of {spec.dtype}")
    if bits == 0:
        return spec
    return FloatSpec(spec.dtype, spec.code, spec.total_bits, spec.exp_bits + bits, spec.man_bits - bits, spec.int_dtype)


def spec_for_code(code: int) -> FloatSpec:
    """Return the layout stored under header dtype ``code``.

    Raises:
        ValueError: The code is unknown (corrupt or foreign blob).
    """
    spec = _BY_CODE.get(code)
    if spec is None:
        raise ValueError(f"corrupt blob: unknown dtype code {code}")
    return spec
