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
