"""The codec on CUDA: large round trips are bit-exact and write the same bytes as the CPU (numba) backend.

64M-element tensors of bf16 / fp16 / fp32 (N(0, 0.02) with a wide spread of scales, special values sprinkled in),
special bit patterns (NaN payloads, infinities, signed zeros, subnormals), constant, tiny and strided tensors, and
the lossy mode. Every blob written on the GPU must equal the CPU backend's blob and decode on either device.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nz_lightning.kernels import MODE_CONST, MODE_LOSSY, MODE_RANS, CompressedTensor, compress, spec_for
from tests.helpers.generators import special_values

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
LARGE = 1 << 26
"""64M elements: 128 MiB (bf16, fp16) or 256 MiB (fp32)."""


def weights_like(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """``n`` values on the GPU: N(0, 0.02) times a log-normal spread of scales, 1/64 of them special values."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    scale = torch.exp(torch.randn(n, generator=gen, device=DEVICE) * 2)
    x = (torch.randn(n, generator=gen, device=DEVICE) * scale * 0.02).to(dtype)
    sp = special_values(dtype, DEVICE)
    pos = torch.randint(0, n, (max(1, n // 64),), generator=gen, device=DEVICE)
    x[pos] = sp[torch.randint(0, sp.numel(), pos.shape, generator=gen, device=DEVICE)]
    x[: sp.numel()] = sp[: min(n, sp.numel())]
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` on the CPU (so that NaNs compare equal to themselves)."""
    return t.contiguous().reshape(-1).view(spec_for(t.dtype).int_dtype).cpu()


def check_same_as_cpu(x: torch.Tensor, **options: Any) -> CompressedTensor:
    """Compress ``x`` (CUDA) with Triton and its CPU copy with numba: same bytes, exact decodes on both devices."""
    got = compress(x, backend="triton", **options)
    back = got.decompress()
    torch.cuda.synchronize()
    want_values = x if got.mode != MODE_LOSSY else None
    x_cpu = x.cpu()
    want = compress(x_cpu, backend="cpu", **options)
    assert got.mode == want.mode
    blob = got.to_bytes()
    reference = compress(x, backend="torch", **options)  # the pure-torch oracle, on the GPU (no numba involved)
    assert blob == reference.to_bytes(), "the Triton blob differs from the torch reference's"
    assert blob == want.to_bytes(), "the GPU blob differs from the CPU backend's"
    cpu_back = want.decompress()
    assert torch.equal(bits(back), bits(cpu_back))
    if want_values is not None:
        assert torch.equal(bits(back), bits(x_cpu))
    gpu_from_blob = CompressedTensor.from_bytes(blob, device=DEVICE).decompress()
    assert torch.equal(bits(gpu_from_blob), bits(cpu_back))
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_round_trip_same_bytes_as_cpu(dtype: torch.dtype) -> None:
    x = weights_like(dtype, LARGE, seed=11)
    c = check_same_as_cpu(x)
    assert c.mode == MODE_RANS and c.shape == x.shape
    assert c.bits_per_weight < 8 * x.element_size()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_special_values_same_bytes_as_cpu(dtype: torch.dtype) -> None:
    sp = special_values(dtype, DEVICE)
    x = sp.repeat(7 * 512).reshape(-1, 7)[:, :5]  # every special value, many times, strided
    assert not x.is_contiguous()
    check_same_as_cpu(x, steps_per_lane=7)
    check_same_as_cpu(weights_like(dtype, 100_003, seed=3), steps_per_lane=64, prob_bits=15)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_constant_and_tiny_tensors(dtype: torch.dtype) -> None:
    c = check_same_as_cpu(torch.full((3, 1000), -1.5, dtype=dtype, device=DEVICE))
    assert c.mode == MODE_CONST
    for n in (1, 2, 31, 33):
        check_same_as_cpu(weights_like(dtype, n, seed=n))
    assert compress(torch.empty(0, dtype=dtype, device=DEVICE)).decompress().numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [512, None])
def test_lossy_same_bytes_as_cpu(dtype: torch.dtype, block_size: int | None) -> None:
    x = weights_like(dtype, 1 << 22, seed=5)
    c = check_same_as_cpu(x, mantissa_bits=3, block_size=block_size)
    assert c.mode == MODE_LOSSY
