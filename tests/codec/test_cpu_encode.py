"""The vectorized CPU rANS encoder writes exactly what the scalar one and the torch reference write."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nz_lightning import compress
from nz_lightning.kernels import cpu, cpu_encode
from nz_lightning.kernels.freqtable import quantize_counts
from nz_lightning.kernels.layout import MAX_PROB_BITS, MIN_PROB_BITS, effective_steps
from nz_lightning.kernels.spec import spec_for
from tests.helpers.generators import DTYPES, float_tensors


def _skewed(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """One dominant exponent, a few rare ones (frequency 1 after quantization) and every other symbol once."""
    spec = spec_for(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(n).to(dtype)
    rare = torch.randint(0, 1 << spec.total_bits, (max(n // 500, 1),), generator=g, dtype=torch.int64)
    idx = torch.randint(0, n, (rare.numel(),), generator=g)
    signed = rare - ((rare >> (spec.total_bits - 1)) << spec.total_bits)
    x.view(spec.int_dtype)[idx] = signed.to(spec.int_dtype)
    return x


def _both(x: torch.Tensor, prob_bits: int, steps: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    spec = spec_for(x.dtype)
    bits = cpu._bits_array(x.contiguous(), spec)
    counts = cpu.exponent_histogram(x.contiguous(), spec).tolist()
    table = quantize_counts(counts, prob_bits)
    freq, cum = table.dense(spec.alphabet)
    f = np.asarray(freq, dtype=np.uint32)
    c = np.asarray(cum, dtype=np.uint32)
    k = effective_steps(bits.size, steps)
    scalar = cpu._encode_lanes(bits, spec.man_bits, spec.alphabet - 1, f, c, prob_bits, k)
    vector = cpu_encode.encode_lanes(bits, spec.man_bits, spec.alphabet - 1, (c << np.uint32(16)) | f, prob_bits, k)
    return scalar, vector


@settings(max_examples=60, deadline=None)
@given(
    x=float_tensors(max_size=5000),
    prob_bits=st.integers(cpu_encode.VECTOR_MIN_PROB_BITS, MAX_PROB_BITS),
    steps=st.sampled_from([1, 2, 7, 33, 2048]),
)
def test_vector_encoder_matches_scalar(x: torch.Tensor, prob_bits: int, steps: int) -> None:
    if x.numel() == 0:
        return
    scalar, vector = _both(x, prob_bits, steps)
    for a, b in zip(scalar, vector, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prob_bits", [10, 12, 15])
def test_vector_encoder_matches_scalar_on_skewed_tables(dtype: torch.dtype, prob_bits: int) -> None:
    x = _skewed(dtype, 200_003, seed=prob_bits)
    scalar, vector = _both(x, prob_bits, 512)
    for a, b in zip(scalar, vector, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("prob_bits", range(MIN_PROB_BITS, MAX_PROB_BITS + 1))
def test_cpu_backend_bytes_match_reference_for_every_prob_bits(prob_bits: int) -> None:
    g = torch.Generator().manual_seed(prob_bits)
    for dtype in DTYPES:
        x = (torch.randn(3001, generator=g) * 0.02).to(dtype)
        blobs = [compress(x, backend=b, prob_bits=prob_bits, steps_per_lane=40).to_bytes() for b in ("torch", "cpu")]
        assert blobs[0] == blobs[1]
