"""Data-parallel NeuZip / LOMO with 2 gloo processes on CPU (``Trainer(strategy="neuzip", devices=2)``).

Each job runs tests/distributed/worker_dp.py as separate ranks with a hard timeout (a hang fails, never stalls).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.distributed import check_ranks, run_ranks

WORKER = "tests.distributed.worker_dp"


def job(out: Path, world: int, *args: str) -> list[dict[str, Any]]:
    """Run the worker as ``world`` ranks into ``out``; every rank's result (weights loaded under ``"weights"``)."""
    out.mkdir(parents=True, exist_ok=True)
    check_ranks(run_ranks(WORKER, ["--out", str(out), *args], world_size=world, timeout=240))
    results = []
    for rank in range(world):
        result = json.loads((out / f"rank{rank}.json").read_text())
        result["weights"] = torch.load(out / f"rank{rank}.pt", weights_only=True)
        results.append(result)
    return results


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    """Same math, another summation order (per-rank means averaged vs one mean; all-reduce sums in fp32)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=atol, msg=name)


def test_replicas_identical_equal_lomo_and_single_process(tmp_path: Path) -> None:
    """2 ranks: replicas bit-identical, NeuZip == LOMO bit for bit (and with or without overlapping the gradient
    all-reduces with the updates), and == 1 process on the same global batch.

    AdamW with global-norm clipping and 2 accumulated micro-batches: every gradient path goes through the all-reduce
    (SGD runs data parallel in tests/distributed/test_train_py.py and the resume test).
    """
    options = ["--own-sampler", "1", "--opt", "adamw", "--clip", "0.5", "--accum", "2"]
    neuzip = job(tmp_path / "neuzip", 2, *options)
    lomo = job(tmp_path / "lomo", 2, "--compress", "0", *options)
    waited = job(tmp_path / "waited", 2, "--grad-overlap", "0", *options)  # each all-reduce awaited in its hook
    single = job(tmp_path / "single", 1, *options)
    assert neuzip[0]["checksum"] == neuzip[1]["checksum"]  # every rank holds the same weights
    assert waited[0]["checksum"] == waited[1]["checksum"] == neuzip[0]["checksum"]  # overlap changes no bit
    assert neuzip[0]["losses"] != neuzip[1]["losses"]  # ... trained on different halves of each batch
    assert lomo[0]["checksum"] == lomo[1]["checksum"] == neuzip[0]["checksum"]
    assert neuzip[0]["global_step"] == single[0]["global_step"] == 4
    assert single[0]["checksum"] != neuzip[0]["checksum"]  # different summation order, so not bitwise ...
    assert_close(neuzip[0]["weights"], single[0]["weights"], atol=5e-5)  # ... but the same training
    mean_loss = [(a + b) / 2 for a, b in zip(neuzip[0]["losses"], neuzip[1]["losses"], strict=True)]
    assert mean_loss == pytest.approx(single[0]["losses"], rel=1e-4)


def test_resume_same_world_bit_identical_and_other_world(tmp_path: Path) -> None:
    """A 2-rank run resumed mid-run at 2 ranks ends bit-identical; its dense checkpoint resumes at 1 rank too.

    One step per epoch and a checkpoint per epoch: Lightning restarts a resumed epoch's (non-resumable) data from its
    start, so only then is the data of the resumed run the uninterrupted run's. (Compressed checkpoints are written
    by the same code as on one device, where tests/lightning covers their resume.)
    """
    common = ["--steps-per-epoch", "1", "--format", "dense", "--own-sampler", "1"]
    full = job(tmp_path / "full", 2, "--ckpt", "1", *common)
    names = [f"epoch={e}.ckpt" for e in range(4)]
    ckpts = [tmp_path / "full" / "ckpt" / name for name in names]
    assert sorted(p.name for p in (tmp_path / "full" / "ckpt").iterdir()) == names  # rank 0 alone wrote, atomically
    resumed = job(tmp_path / "resumed", 2, "--resume", str(ckpts[1]), *common)
    assert resumed[0]["checksum"] == resumed[1]["checksum"] == full[0]["checksum"]
    assert resumed[0]["losses"] == full[0]["losses"][2:]
    state = torch.load(ckpts[3], weights_only=True)["state_dict"]  # portable: plain torch reads the weights
    for name, value in full[0]["weights"].items():
        assert torch.equal(state[name], value), name
    single = job(tmp_path / "single", 1, "--resume", str(ckpts[1]), "--steps-per-epoch", "1")  # 2 ranks -> 1
    assert_close(single[0]["weights"], full[0]["weights"])


def test_dead_rank_fails_the_job_with_a_clear_error(tmp_path: Path) -> None:
    """Rank 1 dies at step 2: rank 0 stops with an error naming the failed all-reduce instead of hanging."""
    tmp_path.mkdir(exist_ok=True)
    results = run_ranks(WORKER, ["--out", str(tmp_path), "--die-at", "2"], timeout=180)
    assert results[1].returncode == 3
    assert results[0].returncode not in (0, None), results[0].output[-3000:]
    assert "gradient all-reduce failed on rank 0 of 2" in results[0].output
    assert not (tmp_path / "rank0.json").exists()
