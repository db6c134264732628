"""FSDP2-sharded NeuZip with 2 gloo processes on CPU (``nz_lightning.distributed``).

Each job runs tests/distributed/worker_fsdp.py as 2 ranks with a hard timeout (a hang fails, never stalls). The
ranks run with one numba thread: the codec's OpenMP threading layer otherwise raises torch's intra-op thread count
after the first decode, and bf16 LayerNorm gradients then depend on the thread split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.distributed import check_ranks, run_ranks

WORKER = "tests.distributed.worker_fsdp"


def job(out: Path, name: str) -> list[dict[str, Any]]:
    """Run worker job ``name`` as 2 ranks into ``out``; each rank's JSON result."""
    out.mkdir(parents=True, exist_ok=True)
    results = run_ranks(
        WORKER, ["--out", str(out), "--job", name], world_size=2, timeout=150, env={"NUMBA_NUM_THREADS": "1"}
    )
    check_ranks(results)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("fsdp_train")
    return job(out, "train"), out


def test_compressed_shards_equal_dense_fsdp_bit_for_bit(trained: tuple[list[dict[str, Any]], Path]) -> None:
    """Compressed shards (dense or compressed all-gather, or overflow fallback) == plain FSDP2, same fused update."""
    ranks, _ = trained
    for config in ("sgd-1", "adamw-1", "adamw-2"):
        runs = {k.removeprefix(config + "-"): v for k, v in ranks[0].items() if k.startswith(config + "-")}
        assert "dense" in runs and len(runs) >= 2
        for mode, run in runs.items():
            assert run["checksum"] == runs["dense"]["checksum"], (config, mode)
            assert run["losses"] == runs["dense"]["losses"], (config, mode)
            assert run["nz_locals"] == (0 if mode == "dense" else 6)  # emb, 2x(up, down), head: held compressed
        assert len(set(runs["dense"]["losses"])) > 1  # it trained


def test_every_rank_computes_with_identical_unsharded_weights(trained: tuple[list[dict[str, Any]], Path]) -> None:
    ranks, _ = trained
    for key, run in ranks[0].items():
        assert run["unsharded"] and run["unsharded"] == ranks[1][key]["unsharded"], key
    # ... and the same ones in every mode: the weights each Linear computed with in its last forward
    assert ranks[0]["sgd-1-nz-comp"]["unsharded"] == ranks[0]["sgd-1-dense"]["unsharded"]
    assert ranks[0]["adamw-1-nz-comp"]["unsharded"] == ranks[0]["adamw-1-nz-dense"]["unsharded"]


def test_bytes_on_the_wire_and_held(trained: tuple[list[dict[str, Any]], Path]) -> None:
    ranks, _ = trained
    for rank in ranks:
        comp, dense, overflow = rank["sgd-1-nz-comp"], rank["sgd-1-nz-dense"], rank["sgd-1-nz-overflow"]
        inplace, inplace_overflow = rank["sgd-1-nz-inplace"], rank["sgd-1-nz-inplace-overflow"]
        assert inplace["gather_bytes"] == comp["gather_bytes"] and inplace["overflows"] == 0
        assert inplace_overflow["overflows"] == overflow["overflows"] > 0
        exchange, exchange_overflow = rank["sgd-1-nz-exchange"], rank["sgd-1-nz-exchange-overflow"]
        assert exchange["gather_bytes"] == comp["gather_bytes"] and exchange["overflows"] == 0
        assert exchange_overflow["overflows"] == overflow["overflows"]
        assert exchange["exchanged"] == exchange["nz_locals"] == 6 and inplace["exchanged"] == comp["exchanged"] == 0
        triton = rank["sgd-1-nz-exchange-triton"]
        assert triton["unsettled"] > 0 and exchange["unsettled"] == 0  # the Triton encoder's bound-sized buffers...
        assert triton["overflows"] == 0 and triton["gather_bytes"] == comp["gather_bytes"]  # ...gathered compressed
        assert exchange["head_slots"] and min(exchange["head_slots"]) > 0 and comp["head_slots"] == [0]
        assert comp["gather_dense_bytes"] == dense["gather_dense_bytes"] == dense["gather_bytes"] > 0
        assert comp["gather_bytes"] < 0.8 * dense["gather_bytes"]  # bf16 payloads: ~0.69 of the dense bytes
        assert comp["overflows"] == dense["overflows"] == 0
        assert overflow["overflows"] > 0  # every shard outgrew its capacity: gathered dense, same bits (above)
        assert comp["reduce_scatter_bytes"] == rank["sgd-1-dense"]["reduce_scatter_bytes"] > 0
        # per-weight units under activation checkpointing: each projection is freed after its recompute and gathered
        # again for its own backward (3 gathers instead of 2), never all of a block's weights at once
        per_weight = rank["sgd-1-nz-weights"]
        assert per_weight["gather_dense_bytes"] > comp["gather_dense_bytes"]
        assert per_weight["reduce_scatter_bytes"] == comp["reduce_scatter_bytes"]
        held = comp["held"]
        assert held["total"] < 0.75 * held["dense_equivalent"]
        assert rank["sgd-1-dense"]["held"]["total"] == held["dense_equivalent"]


def test_full_state_dict_is_the_dense_runs(trained: tuple[list[dict[str, Any]], Path]) -> None:
    """Rank 0's gathered dense state dict of the compressed run is the plain FSDP2 run's, tensor for tensor."""
    ranks, out = trained
    reference = torch.load(out / "reference.pt", weights_only=True)
    assert all(type(v) is torch.Tensor and v.dtype == torch.bfloat16 for v in reference.values())
    assert reference["layers.0.up.weight"].shape == (256, 64)  # whole, not a shard
    assert ranks[0]["adamw-1-nz-comp"]["checksum"] == ranks[0]["adamw-1-dense"]["checksum"]
    assert ranks[1]["adamw-1-dense"]["checksum"] is None  # rank 0 only


def test_state_dicts_dense_round_trip_and_exact_resume(tmp_path: Path) -> None:
    """Dense full state dict -> fresh sharded compressed model; per-rank shard state + optimizer -> exact resume."""
    ranks = job(tmp_path, "state")
    first = ranks[0]
    assert first["checksum_gathered"] == first["checksum_reloaded"]
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    assert sorted(gathered) == first["keys"]
    assert first["resume_continued"] == first["resume_resumed"] is not None  # exact resume from per-rank shards
    for rank in ranks:
        assert rank["resume_overflows"] == 0 and rank["resume_compressed_blobs"] == 6
        assert rank["losses"][0] == rank["losses"][1]  # the reloaded model computes exactly as the trained one
        assert rank["fresh_nz_locals"] == 6


def test_bad_input_raises_clear_errors(tmp_path: Path) -> None:
    errors = job(tmp_path, "errors")[0]
    assert "does not divide by the world size 2" in errors["odd_dim"] and "exclude=['head.weight']" in errors["odd_dim"]
    assert errors["odd_dim_excluded_trains"] == "Tensor"  # kept dense-sharded (FSDP pads it), trains
    assert "lossy" in errors["lossy"]
    assert "adalomo" in errors["adalomo"]
    assert "shard_model()" in errors["unsharded"]
    assert "agreed capacity" in errors["capacity"]
    assert errors["refreshed"] == "[True, False]"  # capacities are fixed from the first all-gather on
