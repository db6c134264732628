"""``compress_async``: the bytes of ``compress``, with the histogram read deferred to ``result()``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nz_lightning.kernels import MODE_CONST, compress, compress_async
from nz_lightning.kernels.async_encode import UNIFORM_FLAG_MAX_NUMEL
from nz_lightning.tensor.sync_count import count_host_syncs
from tests.helpers.generators import float_tensors

BACKENDS = ("torch", "cpu", "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@given(x=float_tensors(max_size=1500), steps=st.sampled_from([1, 7, 64]))
def test_same_bytes_as_compress(backend: str, x: torch.Tensor, steps: int) -> None:
    pending = compress_async(x, backend=backend, steps_per_lane=steps)
    got = pending.result()
    assert pending.taken and pending.ready and pending.result() is got  # the result is taken once
    assert got.to_bytes() == compress(x, backend=backend, steps_per_lane=steps).to_bytes()
    assert torch.equal(got.decompress().reshape(-1).view(torch.uint8), x.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("n", [100, UNIFORM_FLAG_MAX_NUMEL + 1])
def test_constant_mode_is_chosen_with_and_without_the_device_flag(n: int) -> None:
    same = torch.full((n,), -1.5, dtype=torch.bfloat16)
    assert compress_async(same, backend="triton").result().mode == MODE_CONST
    almost = same.clone()
    almost[-1] = -1.75  # one exponent symbol, two bit patterns: coded, not constant
    got = compress_async(almost, backend="triton").result()
    assert got.mode != MODE_CONST and got.to_bytes() == compress(almost, backend="triton").to_bytes()


def test_only_result_reads_the_histogram_and_only_once() -> None:
    x = torch.randn(5000).to(torch.bfloat16)
    with count_host_syncs() as started:
        pending = compress_async(x, backend="triton")
    assert started.total == 0, started.summary()
    with count_host_syncs() as finished:
        pending.result()
    assert finished.by_op() == {"Tensor.tolist": 1}, finished.summary()


def test_the_input_is_copied_unless_told_otherwise() -> None:
    x = torch.randn(64, 8).to(torch.bfloat16)
    want = compress(x, backend="torch").to_bytes()
    scratch = x.clone()
    pending = compress_async(scratch, backend="torch")
    scratch.zero_()  # reusing the buffer before the result is taken does not change it
    assert pending.result().to_bytes() == want
    borrowed = x.clone()
    pending = compress_async(borrowed, backend="torch", copy=False)
    assert pending.result().to_bytes() == want
    strided = x.t()  # not contiguous: copied whatever ``copy`` says
    assert compress_async(strided, copy=False).result().to_bytes() == compress(strided).to_bytes()


def test_empty_tensors_and_bad_input() -> None:
    empty = compress_async(torch.empty(0, 3, dtype=torch.float16))
    assert empty.ready and empty.result().shape == (0, 3)
    with pytest.raises(TypeError, match="int32"):
        compress_async(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="prob_bits"):
        compress_async(torch.zeros(4), prob_bits=3)
    with pytest.raises(ValueError, match="steps_per_lane"):
        compress_async(torch.zeros(4), steps_per_lane=0)
    with pytest.raises(ValueError, match="backend"):
        compress_async(torch.zeros(4), backend="cuda-magic")
