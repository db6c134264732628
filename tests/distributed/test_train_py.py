"""``python train.py +strategy=neuzip trainer.devices=2`` and ``+strategy=neuzip_fsdp``: the embedded default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import ROOT


@pytest.mark.parametrize(
    ("strategy", "devices", "options"),
    [("neuzip", 2, []), ("neuzip_fsdp", 1, ["strategy.modules=weights", "strategy.backward_prefetch=false"])],
)
def test_train_py_data_parallel_and_fsdp(tmp_path: Path, strategy: str, devices: int, options: list[str]) -> None:
    """Lightning's launcher starts the second rank from the Hydra command line; rank 0 alone reports and saves."""
    out = tmp_path / "run"
    command = [sys.executable, "train.py", f"+strategy={strategy}", f"trainer.devices={devices}", *options]
    command += ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2"]
    command += [f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/{devices}" in log
    assert (out / "train_ddp_process_1.log").exists() == (devices == 2)  # the second rank's Hydra log
    assert result.stdout.count("nz_lightning run") == 1  # one summary, rank 0's
    assert re.search(r"compressed tensors\s+│ 16 \(", result.stdout)  # the 16 matrices (rank 0's shards with FSDP)
    state = torch.load(out / "checkpoints" / "final.ckpt", weights_only=True)
    assert state["global_step"] == 6 and state["nz_lightning"]["compress"] is True
    assert all(value.dtype == torch.float32 for value in state["state_dict"].values())  # dense (compressed: uint8)
