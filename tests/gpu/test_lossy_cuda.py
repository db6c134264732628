"""Lossy inference on CUDA (``compress_model(model, mantissa_bits=3)``): the same blobs as on the CPU, and a forward
pass bit-identical to a dense GPU model holding the CPU lossy model's decoded weights."""

from __future__ import annotations

import pytest
import torch

from nz_lightning.kernels import spec_for
from nz_lightning.tensor.convert import compress_model, compressed_parameters

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")


@pytest.mark.parametrize("kind", ["llama-bf16", "gpt2-fp32"])
@pytest.mark.parametrize("block_size", [512, None])
def test_lossy_model_on_cuda_matches_cpu(kind: str, block_size: int | None) -> None:
    from tests.helpers.models import batches, build

    original = build(kind)
    cpu = compress_model(build(kind), mantissa_bits=3, block_size=block_size)
    gpu = compress_model(build(kind).to(DEVICE), mantissa_bits=3, block_size=block_size)
    cpu_params, gpu_params = dict(compressed_parameters(cpu)), dict(compressed_parameters(gpu))
    assert cpu_params and cpu_params.keys() == gpu_params.keys()
    changed = False
    for name, p in gpu_params.items():
        assert p.device.type == DEVICE.type and p.store.lossy and not p.requires_grad
        assert p.store.to_blobs() == cpu_params[name].store.to_blobs(), name
        ints = spec_for(p.dtype).int_dtype
        assert torch.equal(p.dense().cpu().view(ints), cpu_params[name].dense().view(ints)), name
        changed |= not torch.equal(p.dense().cpu(), original.get_parameter(name).detach())
    assert changed, "mantissa_bits=3 rounded nothing"
    reference = build(kind)
    reference.load_state_dict(cpu.state_dict())  # dense: the CPU lossy model's decoded weights
    reference = reference.to(DEVICE).eval()
    ids = batches(1)[0].to(DEVICE)
    with torch.no_grad():
        got = gpu.eval()(input_ids=ids).logits
        want = reference(input_ids=ids).logits
    assert torch.equal(got, want)
