"""Lossless round trips: bit-exact for every dtype, shape, stride and special value, on every CPU backend."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nz_lightning import compress
from nz_lightning.kernels import MODE_CONST, MODE_RANS, MODE_RAW, CompressedTensor, blob, spec_for
from nz_lightning.kernels.layout import DEFAULT_STEPS_PER_LANE
from tests.helpers.generators import DTYPES, bits_to_tensor, float_tensors, special_patterns

CPU_BACKENDS = ("torch", "cpu")


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
    assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(x=float_tensors(), steps=st.sampled_from([1, 3, 17, DEFAULT_STEPS_PER_LANE]))
def test_roundtrip_bit_exact(backend: str, x: torch.Tensor, steps: int) -> None:
    c = compress(x, backend=backend, steps_per_lane=steps)
    y = c.decompress(backend=backend)
    assert y.is_contiguous()
    assert_bit_equal(x, y)
    blob = c.to_bytes()
    assert len(blob) == c.to_bytes().__len__() and c.nbytes >= len(blob)
    assert_bit_equal(x, CompressedTensor.from_bytes(blob).decompress(backend=backend))


@given(x=float_tensors(max_size=1500), steps=st.sampled_from([2, 5, 64]))
def test_backends_produce_identical_bytes(x: torch.Tensor, steps: int) -> None:
    blobs = {b: compress(x, backend=b, steps_per_lane=steps).to_bytes() for b in CPU_BACKENDS}
    assert blobs["torch"] == blobs["cpu"]


@given(x=float_tensors(max_size=1500))
def test_cross_backend_decode(x: torch.Tensor) -> None:
    c = compress(x, backend="torch", steps_per_lane=8)
    assert_bit_equal(c.decompress(backend="cpu"), c.decompress(backend="torch"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_special_values_survive(dtype: torch.dtype, backend: str) -> None:
    from nz_lightning.kernels.spec import spec_for

    pats = special_patterns(spec_for(dtype)) * 200
    x = bits_to_tensor(pats, dtype)
    x = torch.cat([x, (torch.randn(5000) * 0.02).to(dtype)])
    c = compress(x, backend=backend)
    assert c.mode == MODE_RANS
    assert_bit_equal(x, c.decompress(backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shapes_and_strides(backend: str) -> None:
    base = (torch.randn(37, 53) * 0.02).to(torch.bfloat16)
    views = [
        base.t(),
        base[::2, 1::3],
        base[:, 5],
        base.unsqueeze(0).expand(3, 37, 53),
        base.reshape(()) if base.numel() == 1 else base[3, 4],
        base[:0],
        torch.empty(0, 5, dtype=torch.bfloat16),
    ]
    for v in views:
        c = compress(v, backend=backend)
        y = c.decompress(backend=backend)
        assert y.shape == v.shape and y.is_contiguous()
        assert_bit_equal(v.contiguous(), y)
        assert c.shape == v.shape and c.dtype == v.dtype and c.numel() == v.numel() and c.device == v.device


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_dim_and_empty(dtype: torch.dtype) -> None:
    for x in (torch.tensor(1.5, dtype=dtype), torch.empty(0, dtype=dtype), torch.empty(4, 0, 3, dtype=dtype)):
        c = compress(x)
        assert c.decompress().shape == x.shape
        assert_bit_equal(x, CompressedTensor.from_bytes(c.to_bytes()).decompress())


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_exponent_codes_to_no_words(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    # exponent 0 and top three mantissa bits 0 (bf16 and fp16 may code those with the exponent), varied lower bits
    x = (1 + 0.1 * torch.rand(100_000, generator=g)).to(dtype)
    c = compress(x)
    assert c.mode == MODE_RANS
    assert c.streams is not None and c.streams.words.numel() == 0
    sm_bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    assert c.bits_per_weight < sm_bits + 0.05
    assert_bit_equal(x, c.decompress())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_constant_tensor_stores_one_value(dtype: torch.dtype, backend: str) -> None:
    spec = spec_for(dtype)
    for pattern in special_patterns(spec) + [0x3F80 if spec.total_bits == 16 else 0x3F800000]:
        x = bits_to_tensor([pattern] * 4099, dtype).reshape(1, 4099)
        c = compress(x, backend=backend)
        assert c.mode == MODE_CONST
        assert len(c.to_bytes()) == blob.header_size(2, MODE_CONST) + spec.itemsize
        assert_bit_equal(x, c.decompress(backend=backend))
        out = torch.empty_like(x)
        assert c.decompress(out=out) is out
        assert_bit_equal(x, out)
        assert_bit_equal(x, CompressedTensor.from_bytes(c.to_bytes()).decompress())
    almost = torch.ones(4099, dtype=dtype)
    almost[17] = -1.0  # one sign differs: not constant
    assert compress(almost).mode == MODE_RANS
    assert compress(torch.ones(1, dtype=dtype)).mode == MODE_RAW  # one element: the raw blob is as small


def test_corrupt_constant_blobs_raise() -> None:
    good = compress(torch.zeros(10, dtype=torch.bfloat16)).to_bytes()
    with pytest.raises(ValueError, match="truncated|corrupt"):
        CompressedTensor.from_bytes(good[:-5] + good[-4:])
    body = bytearray(good[:-4])
    body[8:16] = (1).to_bytes(8, "little")  # shape (1,): a constant blob needs two or more elements
    with pytest.raises(ValueError, match="constant mode"):
        CompressedTensor.from_bytes(bytes(body) + zlib.crc32(bytes(body)).to_bytes(4, "little"))
    for huge in (2**62, 2**64 - 1):  # a tiny constant blob must not claim an impossible size
        body[8:16] = huge.to_bytes(8, "little")
        with pytest.raises(ValueError, match="too large"):
            CompressedTensor.from_bytes(bytes(body) + zlib.crc32(bytes(body)).to_bytes(4, "little"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
def test_incompressible_grows_by_at_most_a_header(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    bits = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32).view(torch.uint8)[: n * dtype.itemsize].view(dtype)
    c = compress(x)
    assert c.mode == MODE_RAW
    header = len(compress(torch.empty(0, dtype=dtype)).to_bytes())
    assert len(c.to_bytes()) <= n * dtype.itemsize + header
    assert_bit_equal(x, CompressedTensor.from_bytes(c.to_bytes()).decompress())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decompress_into_out(backend: str) -> None:
    x = (torch.randn(64, 129) * 0.02).to(torch.float16)
    c = compress(x)
    out = torch.empty_like(x)
    ptr = out.data_ptr()
    res = c.decompress(out=out, backend=backend)
    assert res is out and out.data_ptr() == ptr
    assert_bit_equal(x, out)


def test_decompress_out_mismatch_is_rejected() -> None:
    c = compress((torch.randn(10, 10) * 0.02).to(torch.bfloat16))
    with pytest.raises(ValueError, match="out must have shape"):
        c.decompress(out=torch.empty(10, 11, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        c.decompress(out=torch.empty(10, 10, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        c.decompress(out=torch.empty(10, 10, dtype=torch.bfloat16).t())


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int8, torch.bool, torch.complex64, torch.float64, torch.float8_e4m3fn]
)
def test_unsupported_dtype_is_a_type_error(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        compress(torch.zeros(4, dtype=dtype))


def test_bad_options_are_rejected() -> None:
    x = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend"):
        compress(x, backend="cuda-magic")
    with pytest.raises(ValueError, match="prob_bits"):
        compress(x, prob_bits=20)
    with pytest.raises(ValueError, match="steps_per_lane"):
        compress(x, steps_per_lane=0)
    with pytest.raises(TypeError):
        compress([1.0, 2.0])  # type: ignore[arg-type]


def test_weights_reach_near_entropy() -> None:
    """Gaussian bf16 weights: below 8 + H(exponent) (folded mantissa bits), within 0.05 bit of the folded bound."""
    from nz_lightning.kernels import entropy_bits

    x = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    bits = x.view(torch.int16).to(torch.int64) & 0xFFFF
    exp_bound = 8 + entropy_bits(torch.bincount((bits >> 7) & 0xFF, minlength=256).tolist())
    c = compress(x)
    f = c.fold_bits
    assert f == 2
    bound = 8 - f + entropy_bits(torch.bincount((bits >> (7 - f)) & ((256 << f) - 1), minlength=256 << f).tolist())
    assert bound < exp_bound - 0.05  # the top mantissa bits of Gaussian weights are not uniform
    assert bound < c.bits_per_weight < bound + 0.05
