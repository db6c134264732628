"""Hypothesis strategies producing float tensors from raw bit patterns, special values included."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from nz_lightning.kernels.spec import FloatSpec, spec_for

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def special_patterns(spec: FloatSpec) -> list[int]:
    """Bit patterns of NaNs with payloads, +-inf, +-0, subnormals, max/min finite (unsigned)."""
    m, e, t = spec.man_bits, spec.exp_bits, spec.total_bits
    sign = 1 << (t - 1)
    exp_all = ((1 << e) - 1) << m
    pats = [
        0,
        sign,  # -0.0
        exp_all,
        exp_all | sign,  # +-inf
        exp_all | 1,  # signalling NaN, payload 1
        exp_all | (1 << (m - 1)),  # quiet NaN
        exp_all | ((1 << m) - 1) | sign,  # negative NaN, full payload
        exp_all | 0x5,
        1,
        (1 << m) - 1,
        sign | 1,  # subnormals
        exp_all - 1,
        (exp_all - 1) | sign,  # +-max finite
        1 << m,
        (1 << m) | sign,  # +-min normal
    ]
    return pats


def bits_to_tensor(bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Float tensor with exactly these unsigned bit patterns."""
    spec = spec_for(dtype)
    t = torch.tensor(bits, dtype=torch.int64)
    signed = t - ((t >> (spec.total_bits - 1)) << spec.total_bits)
    return signed.to(spec.int_dtype).view(dtype)


@st.composite
def float_tensors(draw: st.DrawFn, dtype: torch.dtype | None = None, max_size: int = 3000) -> torch.Tensor:
    """Tensors mixing weight-like values, arbitrary bit patterns and special values, in a random shape."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    spec = spec_for(dtype)
    n = draw(st.integers(0, max_size))
    kind = draw(st.sampled_from(["weights", "bits", "mixed", "constant"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "bits":
        vals = torch.randint(0, 1 << spec.total_bits, (n,), generator=g, dtype=torch.int64)
        x = bits_to_tensor(vals.tolist(), dtype)
    elif kind == "constant":
        pat = draw(st.sampled_from(special_patterns(spec) + [0x3F80 if spec.total_bits == 16 else 0x3F800000]))
        x = bits_to_tensor([pat] * n, dtype)
    else:
        scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 300.0]))
        x = (torch.randn(n, generator=g) * scale).to(dtype)
        if kind == "mixed" and n:
            specials = bits_to_tensor(special_patterns(spec), dtype)
            idx = torch.randint(0, n, (min(n, 40),), generator=g)
            x[idx] = specials[torch.randint(0, specials.numel(), (idx.numel(),), generator=g)]
    shape = draw(st.sampled_from(["flat", "2d", "0d"])) if n == 1 else draw(st.sampled_from(["flat", "2d"]))
    if shape == "0d":
        return x.reshape(())
    if shape == "2d" and n:
        rows = draw(st.sampled_from([d for d in (1, 2, 3, 5, 7, 10) if n % d == 0]))
        return x.reshape(rows, n // rows)
    return x


# NaNs with payloads (quiet, signalling, negative), +-inf, +-0, subnormals, extremes and 1.0, as unsigned bit patterns.
# fmt: off
SPECIAL_BITS = {
    torch.float32: [0x7FC00000, 0x7FC00001, 0x7F800001, 0xFFFFFFFF, 0xFFA5A5A5, 0x7F800000, 0xFF800000, 0x0,
                    0x80000000, 0x00000001, 0x807FFFFF, 0x00400000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000, 0x3F800000],
    torch.float16: [0x7E00, 0x7C01, 0x7FFF, 0xFE01, 0xFD55, 0x7C00, 0xFC00, 0x0000, 0x8000, 0x0001, 0x83FF, 0x0200,
                    0x7BFF, 0xFBFF, 0x0400, 0x3C00],
    torch.bfloat16: [0x7FC0, 0x7F81, 0x7FFF, 0xFFC1, 0xFFA5, 0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001, 0x807F, 0x0040,
                     0x7F7F, 0xFF7F, 0x0080, 0x3F80],
}
# fmt: on


def special_values(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The :data:`SPECIAL_BITS` of ``dtype`` as a tensor on ``device`` (bit patterns exact, NaN payloads kept)."""
    from nz_lightning.kernels.reference import from_bits

    spec = spec_for(dtype)
    bits = torch.tensor(SPECIAL_BITS[dtype], dtype=torch.int64) & ((1 << spec.total_bits) - 1)
    return from_bits(bits, spec).to(device)
