"""``python train.py +strategy=neuzip trainer.devices=2``: the embedded default as a 2-process data-parallel job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.distributed import ROOT


def test_train_py_two_devices(tmp_path: Path) -> None:
    """Lightning's launcher starts the second rank from the Hydra command line; rank 0 alone reports and saves."""
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "+strategy=neuzip", "trainer.devices=2", "trainer.max_steps=6"]
    command += ["trainer.val_check_interval=3", "trainer.limit_val_batches=2", f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in log
    assert (out / "train_ddp_process_1.log").exists()  # the second rank's Hydra log
    assert result.stdout.count("nz_lightning run") == 1  # one summary, rank 0's
    state = torch.load(out / "checkpoints" / "final.ckpt", weights_only=True)
    assert state["global_step"] == 6 and state["nz_lightning"]["compress"] is True
    assert all(value.dtype == torch.float32 for value in state["state_dict"].values())  # dense (compressed: uint8)
