"""``Trainer(strategy="neuzip", accelerator="gpu", devices=1)`` trains, validates and predicts on compressed CUDA
weights, bit-identically to the uncompressed ``"lomo"`` strategy; lossy inference serves the CPU's rounded weights."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from nz_lightning.tensor.parameter import is_compressed

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("quiet_lightning")]

ACCELERATOR = "gpu"
DEVICE_TYPE = "cuda"


def gpu_trainer(strategy: Any, max_steps: int = 4) -> Any:
    """A quiet single-GPU Trainer with ``strategy``."""
    import lightning.pytorch as pl

    import nz_lightning.lightning.strategy  # noqa: F401 - registers "neuzip" and "lomo"

    return pl.Trainer(
        strategy=strategy,
        accelerator=ACCELERATOR,
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("opt", ["sgd", "adamw", "adalomo"])
def test_neuzip_strategy_fits_on_gpu(opt: str) -> None:
    from tests.helpers.lit import build, loader

    initial = weights(build(opt))
    nz = build(opt)
    trainer = gpu_trainer("neuzip")
    trainer.fit(nz, loader(4))
    assert trainer.global_step == 4
    assert is_compressed(nz.fc.weight) and nz.fc.weight.device.type == DEVICE_TYPE and not is_compressed(nz.fc.bias)
    lomo = build(opt)
    gpu_trainer("lomo").fit(lomo, loader(4))
    assert not is_compressed(lomo.fc.weight) and lomo.fc.weight.device.type == DEVICE_TYPE
    got, want = weights(nz), weights(lomo)
    assert got.keys() == want.keys()
    for key in got:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert any(not torch.equal(got[k], initial[k]) for k in got)
    (val,) = trainer.validate(nz, loader(1))
    assert math.isfinite(val["val_loss"])
    assert is_compressed(nz.fc.weight)


def test_lossy_strategy_predicts_with_cpu_rounded_weights() -> None:
    from nz_lightning.lightning.strategy import NeuZipStrategy
    from nz_lightning.tensor.convert import compress_model
    from tests.helpers.lit import batches, build, loader

    model = build()
    predictions = gpu_trainer(NeuZipStrategy(mantissa_bits=3)).predict(model, loader(2))
    assert predictions is not None and is_compressed(model.head.weight) and model.head.weight.device.type == DEVICE_TYPE
    rounded = weights(compress_model(build(), mantissa_bits=3))  # CPU lossy model's decoded weights
    assert rounded.keys() == weights(model).keys()
    for key, value in weights(model).items():
        assert torch.equal(value, rounded[key]), key
    dense = build()
    dense.load_state_dict(rounded)
    dense = dense.to(model.head.weight.device)
    with torch.no_grad():
        for (x, _), got in zip(batches(2), predictions, strict=True):
            assert torch.equal(dense(x.to(dense.head.weight.device)).cpu(), got.cpu())
