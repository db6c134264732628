"""Checkpoint integrity: per-tensor CRC32 in both formats, verified before any assignment; all-or-nothing loads."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from benchmarks.bitflip_checkpoints import run_trials
from nz_lightning.lightning.checkpoint_integrity import CheckpointIntegrityError, tensor_crc32, verify_checkpoint
from nz_lightning.lightning.strategy import NeuZipStrategy
from nz_lightning.optim import fused_optimizer
from tests.helpers.lit import Tiny, build, loader, trainer

FORMATS = ["dense", "compressed"]


pytestmark = pytest.mark.usefixtures("quiet_lightning")


def trained(fmt: str, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny("adamw")
    trainer(NeuZipStrategy(checkpoint_format=fmt), max_steps=1).fit(model, loader(1))
    return model


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def flip(t: Tensor, rng: random.Random) -> Tensor:
    """A copy of ``t`` with one random bit flipped."""
    raw = t.detach().clone().contiguous().reshape(-1).view(torch.uint8)
    raw[rng.randrange(raw.numel())] ^= 1 << rng.randrange(8)
    return raw.view(t.dtype).reshape(t.shape)


def test_crc32_of_bf16_and_0d_tensors() -> None:
    x = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert tensor_crc32(x) == tensor_crc32(x.clone()) != tensor_crc32(-x)
    assert tensor_crc32(torch.tensor(3.0)) is not None
    assert tensor_crc32(torch.empty(2, 2, device="meta")) is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_checksums_recorded_and_dense_stays_portable(tmp_path: Any, fmt: str) -> None:
    model = trained(fmt)
    path = os.path.join(tmp_path, "m.ckpt")
    model.trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # plain torch reads it (ints and strings only)
    sums = raw["nz_lightning"]["checksums"]
    assert sums["algorithm"] == "crc32" and sums["version"] == 1
    assert sums["state_dict"].keys() == raw["state_dict"].keys()
    assert all(sums["state_dict"][k] == tensor_crc32(v) for k, v in raw["state_dict"].items())
    assert any(k.startswith("optimizer_states/0/") for k in sums["other"])
    assert verify_checkpoint(raw, path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bitflips_in_memory_name_the_tensor(tmp_path: Any, fmt: str) -> None:
    """50 single-bit flips in a random model tensor: each is caught, naming exactly that tensor and the file."""
    path = os.path.join(tmp_path, "m.ckpt")
    trained(fmt).trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["state_dict"]
    rng = random.Random(0)
    for _ in range(50):
        key = rng.choice(sorted(state))
        bad = dict(checkpoint, state_dict={**state, key: flip(state[key], rng)})
        with pytest.raises(CheckpointIntegrityError, match=rf"checkpoint {path} is corrupt: tensor '{key}' .*CRC32"):
            verify_checkpoint(bad, path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bitflips_in_the_file_are_detected(tmp_path: Any, fmt: str) -> None:
    """50 single-bit flips inside the tensor data of the file (benchmarks/bitflip_checkpoints.py runs 1,000)."""
    detected, silent = run_trials(fmt, 50, seed=1, directory=str(tmp_path))
    assert (detected, silent) == (50, 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_checkpoint_leaves_the_model_unchanged(tmp_path: Any, fmt: str) -> None:
    path = os.path.join(tmp_path, "m.ckpt")
    trained(fmt, seed=0).trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    keys = list(checkpoint["state_dict"])
    middle = keys[len(keys) // 2]
    checkpoint["state_dict"][middle] = flip(checkpoint["state_dict"][middle], random.Random(3))
    bad = os.path.join(tmp_path, "bad.ckpt")
    torch.save(checkpoint, bad)

    other = trained(fmt, seed=7)
    before = snapshot(other)
    with pytest.raises(ValueError, match=rf"checkpoint {bad} is corrupt: tensor '{middle}'"):
        trainer(NeuZipStrategy(checkpoint_format=fmt), max_steps=2).fit(other, loader(1), ckpt_path=bad)
    assert_unchanged(other, before)
    strategy = other.trainer.strategy  # a checkpoint dict handed over directly is verified too
    assert isinstance(strategy, NeuZipStrategy)
    with pytest.raises(CheckpointIntegrityError, match=rf"the checkpoint is corrupt: tensor '{middle}'"):
        strategy.load_model_state_dict(checkpoint)
    assert_unchanged(other, before)


def test_old_compressed_checkpoint_corrupt_blob_is_all_or_nothing(tmp_path: Any) -> None:
    """Without checksums (an older file) a corrupt blob mid-checkpoint still fails naming it, before any assignment."""
    path = os.path.join(tmp_path, "m.ckpt")
    trained("compressed").trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["nz_lightning"]["checksums"]
    state = checkpoint["state_dict"]
    blobs = [k for k, v in state.items() if v.dtype == torch.uint8]
    assert len(blobs) >= 3
    middle = blobs[len(blobs) // 2]
    blob = state[middle].clone()
    blob[len(blob) // 2] ^= 0x10
    state[middle] = blob
    bad = os.path.join(tmp_path, "old.ckpt")
    torch.save(checkpoint, bad)

    other = trained("compressed", seed=7)
    before = snapshot(other)
    strategy = other.trainer.strategy
    assert isinstance(strategy, NeuZipStrategy)
    loaded = strategy.load_checkpoint(bad)  # no checksums: read unverified
    with pytest.raises(ValueError, match=rf"checkpoint {bad}: compressed weight '{middle}' is unreadable"):
        strategy.load_model_state_dict(loaded)
    assert_unchanged(other, before)


def test_old_dense_checkpoint_shape_mismatch_is_all_or_nothing(tmp_path: Any) -> None:
    path = os.path.join(tmp_path, "m.ckpt")
    trained("dense").trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["nz_lightning"]["checksums"]
    keys = list(checkpoint["state_dict"])
    last = keys[-1]
    checkpoint["state_dict"][last] = checkpoint["state_dict"][last][:-1]
    other = trained("dense", seed=7)
    before = snapshot(other)
    strategy = other.trainer.strategy
    assert isinstance(strategy, NeuZipStrategy)
    with pytest.raises(RuntimeError, match=rf"size mismatch for '{last}'.*nothing was loaded"):
        strategy.load_model_state_dict(checkpoint)
    assert_unchanged(other, before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_without_checksums_still_resumes(tmp_path: Any, fmt: str) -> None:
    path = os.path.join(tmp_path, "m.ckpt")
    model = trained(fmt)
    model.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["nz_lightning"]["checksums"]
    old = os.path.join(tmp_path, "old.ckpt")
    torch.save(checkpoint, old)
    resumed = build("adamw")
    trainer(NeuZipStrategy(checkpoint_format=fmt), max_steps=2).fit(resumed, loader(2), ckpt_path=old)
    assert resumed.trainer.global_step == 2


def test_second_fused_optimizer_names_the_fix() -> None:
    """A second fused optimizer on one model is refused at construction, saying how to detach the first."""
    model = nn.Linear(4, 4)
    first = fused_optimizer(model, "sgd", lr=0.1)
    with pytest.raises(ValueError, match=r"already installed on this model .*remove_hooks\(\)"):
        fused_optimizer(model, "adamw", lr=0.1)
    first.remove_hooks()
    second = fused_optimizer(model, "sgd", lr=0.1)
    second.backward(model(torch.randn(2, 4)).sum())
