"""The multi-process benchmark (benchmarks/distributed.py) end to end at tiny size, and the memory model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import distributed, distributed_model, distributed_worker


def test_distributed_benchmark_dry_run(tmp_path: Path) -> None:
    """Two 2-rank gloo jobs (data-parallel NeuZip, NeuZip-FSDP with compressed gather) write sane JSON/markdown."""
    distributed.main(
        ["--dry-run", "--worlds", "2", "--methods", "dp-neuzip", "fsdp-nz-cgather", "fsdp-nz-xgather",
         "--timeout", "100", "--out-dir", str(tmp_path)]
    )  # fmt: skip
    result = json.loads((tmp_path / "distributed.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dp-neuzip", "fsdp-nz-cgather", "fsdp-nz-xgather"}
    # the GPU payload path (device pack, exchanged heads), run on the CPU: the same bytes gathered, the same losses
    x = rows.pop("fsdp-nz-xgather")
    assert "error" not in x, x.get("error")
    assert x["losses"] == rows["fsdp-nz-cgather"]["losses"]
    assert x["comm_per_step"]["all_gather_bytes"] == rows["fsdp-nz-cgather"]["comm_per_step"]["all_gather_bytes"]
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["world_size"] == 2 and len(r["ranks"]) == 2 and len(r["losses"]) == 2
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_over_baseline_mib"] >= 0 and r["peak_mib"] > r["baseline_mib"] > 0
        assert all(math.isfinite(x) for losses in r["losses"] for x in losses)
        assert r["losses"][0] != r["losses"][1]  # each rank trains its own micro-batch
    dense_bytes = 2 * rows["dp-neuzip"]["params"]  # bf16
    assert rows["dp-neuzip"]["comm_per_step"]["all_reduce_bytes"] == dense_bytes  # every gradient once per step
    c = rows["fsdp-nz-cgather"]["comm_per_step"]
    assert c["wire_reduce_scatter_bytes"] == c["reduce_scatter_bytes"] >= dense_bytes
    assert 0 < c["all_gather_bytes"] < c["all_gather_dense_bytes"] and c["overflows"] == 0
    assert c["wire_all_gather_bytes"] >= c["all_gather_bytes"]  # + the dense norm vectors
    # sharded: each rank holds about half of the compressed replica's bytes
    assert rows["fsdp-nz-cgather"]["weights_held_bytes"] < 0.6 * rows["dp-neuzip"]["weights_held_bytes"]
    # the same global batch and update: data parallel and FSDP agree bit for bit
    assert rows["dp-neuzip"]["losses"] == rows["fsdp-nz-cgather"]["losses"]
    targets = {t["target"]: t for t in result["targets"]}
    gather = next(t for name, t in targets.items() if name.startswith("compressed all-gather"))
    assert gather["ratio"] == pytest.approx(c["all_gather_bytes"] / c["all_gather_dense_bytes"])
    md = (tmp_path / "distributed.md").read_text()
    assert "| NeuZip-FSDP, compressed all-gather | 16 | 2 |" in md and "Targets (issue 13)" in md
    assert result["units"] == "layer" and all(r["units"] == "layer" for r in rows.values())
    # finer FSDP units (each projection of a layer on its own, for every FSDP method): more, smaller gathers, and
    # dense and NeuZip-FSDP still train identically (the unsplit reference may differ in rounding if shard_model
    # splits the head into row parts)
    assert rows["fsdp-nz-cgather"]["fsdp_units"] == 4 and rows["dp-neuzip"]["fsdp_units"] == 0  # root, emb, layer, head
    fine = distributed.main(
        ["--dry-run", "--worlds", "2", "--methods", "fsdp-dense", "fsdp-nz-cgather", "--units", "weight",
         "--no-backward-prefetch", "--split-bytes", "4096", "--timeout", "100", "--out-dir", str(tmp_path),
         "--name", "fine"]
    )  # fmt: skip
    frows = {r["method"]: r for r in fine["rows"]}
    assert all("error" not in r for r in frows.values()), frows
    assert fine["units"] == "weight" and all(r["units"] == "weight" for r in frows.values())
    assert frows["fsdp-dense"]["losses"] == frows["fsdp-nz-cgather"]["losses"]
    f = frows["fsdp-nz-cgather"]
    assert f["fsdp_units"] >= 4 + 7 and f["comm_per_step"]["all_gathers"] > c["all_gathers"]
    assert f["ranks"][0]["fsdp_modules"].count("model.layers.0.mlp.down_proj") == 1
    assert "seven linear projections" in (tmp_path / "fine.md").read_text()
    fine_md = (tmp_path / "fine.md").read_text()
    assert fine["shape"]["backward_prefetch"] is False and "No backward prefetch" in fine_md
    # a 4 KiB cap splits the tiny model's MLP projections into row parts too (same split for both methods)
    assert fine["shape"]["split_bytes"] == 4096 and "`model.layers.*.mlp.up_proj` split into row-part units" in fine_md
    with pytest.raises(ValueError, match="unknown FSDP units 'block'"):
        distributed_worker.fsdp_units("block")


def test_distributed_memory_model(tmp_path: Path) -> None:
    """The 8B / 70B memory model: every row, components adding up, sharding and compression shrinking weights.

    The codec results it reads (benchmarks/out/, not in git) are stood in for by rows of the measured figures.
    """
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")
    rows = [{"name": f"model.layers.0.{k}.weight", "dtype": "bf16", "ours_bpw": 10.53, "numel": 65536} for k in kinds]
    rows.append({"name": "model.layers.0.up_proj.weight", "dtype": "fp16", "ours_bpw": 13.5, "numel": 65536})
    codec = tmp_path / "codec.json"
    codec.write_text(json.dumps({"rows": rows}))
    result = distributed_model.main(["--codec", str(codec), "--out-dir", str(tmp_path)])
    assert json.loads((tmp_path / "distributed_model.json").read_text())["rows"] == result["rows"]
    assert "13.9 GiB" in (tmp_path / "distributed_model.md").read_text()
    assert result["bits_per_weight"]["gate_proj"] == pytest.approx(10.53)  # bf16 rows only
    rows = result["rows"]
    assert len(rows) == 2 * 3 * 3
    for r in rows:
        g = r["gib"]
        assert g["total"] == pytest.approx(sum(v for k, v in g.items() if k != "total"))
        assert r["fits_24"] == (g["total"] <= 24) and r["fits_80"] == (g["total"] <= 80)
    by = {(r["model"], r["optimizer"], r["method"]): r["gib"] for r in rows}
    for model in ("Llama-3 8B", "Llama-3 70B"):
        nz = by[(model, "sgd", "NeuZip-FSDP")]["weights"]
        dense = by[(model, "sgd", "FSDP2 dense + fused update")]["weights"]
        replica = by[(model, "sgd", "data parallel NeuZip")]["weights"]
        assert nz == pytest.approx(replica / 8) and 0.6 < nz / dense < 0.7
    with pytest.raises(FileNotFoundError, match="codec results missing"):
        distributed_model.main(["--codec", str(tmp_path / "none.json"), "--out-dir", str(tmp_path)])
