"""Lossy mode of the codec: rounding, saturation, special values, block normalization, format, backends."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nz_lightning.kernels import CompressedTensor, compress, entropy_bits
from nz_lightning.kernels.backends import BACKENDS
from nz_lightning.kernels.lossy import quantize
from nz_lightning.kernels.spec import spec_for
from tests.helpers.generators import DTYPES, bits_to_tensor, float_tensors, special_patterns

MAX_K = {torch.bfloat16: 6, torch.float16: 9, torch.float32: 22}


def _bits(x: torch.Tensor) -> list[int]:
    spec = spec_for(x.dtype)
    return (x.reshape(-1).view(spec.int_dtype).to(torch.int64) & ((1 << spec.total_bits) - 1)).tolist()


def _oracle_rne(x: torch.Tensor, k: int) -> torch.Tensor:
    """Independent round-to-nearest-even to k mantissa bits in float64, saturating at the largest grid value."""
    info = torch.finfo(x.dtype)
    emin = int(math.log2(info.tiny))
    emax = int(math.log2(info.max))
    top = (2 - 2.0**-k) * 2.0**emax
    out = []
    for v in x.reshape(-1).double().tolist():
        if not math.isfinite(v) or v == 0:
            out.append(v)
            continue
        e = max(math.frexp(abs(v))[1] - 1, emin)
        step = 2.0 ** (e - k)
        q = round(abs(v) / step) * step
        out.append(math.copysign(min(q, top), v))
    return torch.tensor(out, dtype=torch.float64).to(x.dtype).reshape(x.shape)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that any two NaNs compare equal."""
    nan_a, nan_b = torch.isnan(a.float()), torch.isnan(b.float())
    return torch.equal(nan_a, nan_b) and _bits(a[~nan_a]) == _bits(b[~nan_b])


@given(x=float_tensors(max_size=800), data=st.data())
def test_no_normalization_is_exact_round_to_nearest_even(x: torch.Tensor, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, MAX_K[x.dtype]))
    y = compress(x, mantissa_bits=k, block_size=None).decompress()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert _same_values(y, _oracle_rne(x, k))


@given(x=float_tensors(max_size=800), data=st.data())
def test_relative_error_bound_on_normal_values(x: torch.Tensor, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, MAX_K[x.dtype]))
    y = compress(x, mantissa_bits=k, block_size=None).decompress().double()
    xd = x.double()
    normal = torch.isfinite(xd) & (xd.abs() >= torch.finfo(x.dtype).tiny)
    rel = ((y - xd).abs() / xd.abs())[normal]
    assert rel.numel() == 0 or float(rel.max()) <= 2.0 ** -(k + 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [None, 1, 64, 512])
def test_special_values(dtype: torch.dtype, block_size: int | None) -> None:
    spec = spec_for(dtype)
    x = bits_to_tensor(special_patterns(spec) * 3, dtype)
    for k in (0, 1, MAX_K[dtype]):
        y = compress(x, mantissa_bits=k, block_size=block_size).decompress()
        xf, yf = x.double(), y.double()
        assert torch.equal(torch.isnan(xf), torch.isnan(yf)), "NaN must stay NaN"
        assert torch.equal(torch.signbit(xf), torch.signbit(yf)), "signs (and -0.0) must survive"
        inf = torch.isinf(xf)
        assert torch.equal(yf[inf], xf[inf])
        finite = torch.isfinite(xf)
        assert torch.isfinite(yf[finite]).all(), "a finite value must never become inf"
        assert torch.equal(yf[xf == 0], xf[xf == 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturation_and_carry_into_exponent(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    x = torch.tensor([info.max, -info.max, 1.99, 1.5, 3.5], dtype=dtype)
    y = compress(x, mantissa_bits=0, block_size=None).decompress().double()
    emax = int(math.log2(info.max))
    assert y[0] == 2.0**emax and y[1] == -(2.0**emax), "max finite saturates instead of rounding to inf"
    assert y[2] == 2.0, "rounding up carries into the exponent"
    assert y[3] == 2.0 and y[4] == 4.0, "ties go to even (1.5 -> 2, 3.5 -> 4)"


@given(x=float_tensors(max_size=1500), data=st.data())
def test_block_absmax_survives_and_roundtrip_is_idempotent(x: torch.Tensor, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, MAX_K[x.dtype]))
    block = data.draw(st.sampled_from([1, 2, 8, 64, 128, 256, 512, 1024]))
    y = compress(x, mantissa_bits=k, block_size=block).decompress()
    flat_x, flat_y = x.reshape(-1).double(), y.reshape(-1).double()
    for start in range(0, flat_x.numel(), block):
        bx = flat_x[start : start + block]
        finite = torch.isfinite(bx)
        if finite.any():
            i = int(torch.where(finite, bx.abs(), -1.0).argmax())
            if 0 < abs(float(bx[i])) < torch.finfo(x.dtype).tiny:
                continue  # a subnormal absmax is not normalized: it lies on the absolute subnormal grid
            assert flat_y[start + i] == bx[i], f"block at {start}: absmax {bx[i]} decoded as {flat_y[start + i]}"
    again = compress(y, mantissa_bits=k, block_size=block).decompress()
    assert _same_values(again, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k", "block"), [(0, 512), (1, 64), (3, 512), (3, None)])
def test_bits_per_weight_match_the_formula(dtype: torch.dtype, k: int, block: int | None) -> None:
    x = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
    c = compress(x, mantissa_bits=k, block_size=block)
    spec = spec_for(dtype)
    q, _, _ = quantize(x, spec, k, block)  # the stored exponents are those of x / scale
    exps = (q.to(torch.int64) >> spec.man_bits) & (spec.alphabet - 1)
    h = entropy_bits(torch.bincount(exps, minlength=spec.alphabet).tolist())
    scale_bits = 0.0 if block is None else 8 * ((spec.man_bits + 7) // 8) / block
    expected = 1 + k + h + scale_bits
    assert expected <= c.bits_per_weight + 1e-9 <= expected + 0.05


@given(x=float_tensors(max_size=600), data=st.data())
def test_backends_write_identical_bytes(x: torch.Tensor, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, MAX_K[x.dtype]))
    block = data.draw(st.sampled_from([None, 4, 64, 512]))
    blobs = {b: compress(x, mantissa_bits=k, block_size=block, backend=b).to_bytes() for b in BACKENDS}
    assert len(set(blobs.values())) == 1
    restored = CompressedTensor.from_bytes(blobs["torch"])
    decoded = {b: _bits(restored.decompress(backend=b)) for b in BACKENDS}
    assert all(bits == decoded["torch"] for bits in decoded.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prob_bits", [9, 12, 14])
def test_cpu_decode_matches_torch_for_vector_and_scalar_decoders(dtype: torch.dtype, prob_bits: int) -> None:
    """prob_bits <= 12 decodes the carrier with the vector decoder (in place for 16-bit dtypes), above with the
    scalar one; both must give the torch reference's values."""
    x = (torch.randn(50_003, generator=torch.Generator().manual_seed(prob_bits)) * 0.02).to(dtype)
    c = compress(x, mantissa_bits=3, block_size=512, prob_bits=prob_bits)
    out = torch.empty_like(x)
    assert c.decompress(out=out, backend="cpu") is out
    assert _bits(out) == _bits(c.decompress(backend="torch"))


def test_blob_roundtrip_metadata_and_out() -> None:
    x = torch.randn(37, 19, dtype=torch.bfloat16)
    c = compress(x, mantissa_bits=3, block_size=64)
    back = CompressedTensor.from_bytes(c.to_bytes())
    assert (back.mantissa_bits, back.block_size, back.lossy) == (3, 64, True)
    assert len(c.to_bytes()) == round(c.bits_per_weight * x.numel() / 8)
    out = torch.empty_like(x)
    assert back.decompress(out=out) is out
    assert _bits(out) == _bits(c.decompress())
    assert "lossy" in repr(c)


def test_corrupt_lossy_blobs_are_rejected() -> None:
    x = torch.randn(4000, dtype=torch.float16)
    x[5] = float("nan")
    blob = compress(x, mantissa_bits=2, block_size=128).to_bytes()
    for cut in (1, 9, len(blob) // 2):
        with pytest.raises(ValueError):
            CompressedTensor.from_bytes(blob[:-cut])
    for pos in range(0, len(blob), max(1, len(blob) // 97)):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        try:
            y = CompressedTensor.from_bytes(bytes(bad)).decompress()
        except ValueError:
            continue
        pytest.fail(f"bit flip at byte {pos} decoded to a tensor of shape {tuple(y.shape)}")


@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [
        (torch.bfloat16, {"mantissa_bits": 7}),
        (torch.float16, {"mantissa_bits": 10}),
        (torch.float32, {"mantissa_bits": 23}),
        (torch.bfloat16, {"mantissa_bits": -1}),
        (torch.bfloat16, {"mantissa_bits": True}),
        (torch.bfloat16, {"mantissa_bits": 3, "block_size": 3}),
        (torch.bfloat16, {"mantissa_bits": 3, "block_size": 0}),
        (torch.bfloat16, {"mantissa_bits": 3, "block_size": 1 << 31}),
    ],
)
def test_bad_lossy_options_are_rejected(dtype: torch.dtype, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="mantissa_bits|block_size"):
        compress(torch.ones(8, dtype=dtype), **kwargs)


def test_empty_and_zero_dim() -> None:
    for x in (torch.zeros(0, 5, dtype=torch.bfloat16), torch.tensor(1.3, dtype=torch.bfloat16)):
        y = compress(x, mantissa_bits=1).decompress()
        assert y.shape == x.shape
    tiny = compress(torch.tensor(1.3, dtype=torch.bfloat16), mantissa_bits=1, block_size=None)
    assert float(tiny.decompress()) == 1.5  # 1.296875 between the 1-bit grid points 1.0 and 1.5
    assert len(tiny.to_bytes()) <= 2 + 40, "a tensor too small to code is kept raw (its rounded value)"


def test_many_nans_match_across_backends() -> None:
    x = torch.randn(5000, dtype=torch.bfloat16)
    x[::2] = float("nan")  # more NaNs than the CPU loop's first buffer holds
    for block in (None, 64):
        cpu = compress(x, mantissa_bits=2, block_size=block, backend="cpu")
        assert cpu.to_bytes() == compress(x, mantissa_bits=2, block_size=block, backend="torch").to_bytes()
        y = cpu.decompress()
        assert torch.isnan(y[::2]).all() and not torch.isnan(y[1::2]).any()


def _every_pattern(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """All 2^16 bit patterns of a 16-bit dtype (a 2^16 sample for fp32), shuffled so blocks mix magnitudes."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        ints = torch.randint(-(2**31), 2**31, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    else:
        ints = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    return ints[torch.randperm(ints.numel(), generator=g)].view(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k", "block"), [(0, 512), (1, 64), (3, None), (3, 512), (5, 4)])
def test_numba_lossy_loops_match_torch_on_every_pattern(dtype: torch.dtype, k: int, block: int | None) -> None:
    """The numba quantize/fields/merge (all three dtypes) against the torch code, on every 16-bit pattern:
    subnormals, the largest finite values (saturation and overflow of the scaled product), NaN, inf."""
    x = _every_pattern(dtype, seed=k)
    cpu_blob = compress(x, mantissa_bits=k, block_size=block, backend="cpu").to_bytes()
    assert cpu_blob == compress(x, mantissa_bits=k, block_size=block, backend="torch").to_bytes()
    restored = CompressedTensor.from_bytes(cpu_blob)
    assert _bits(restored.decompress(backend="cpu")) == _bits(restored.decompress(backend="torch"))
