"""Smoke test of ``benchmarks/codec.py``: the tiny configuration runs end to end and writes both outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("zipnn")

from benchmarks.codec import MD_BEGIN, MD_END, main  # noqa: E402


def test_tiny_benchmark_writes_json_and_markdown(tmp_path: Path) -> None:
    """``--tiny`` measures a couple of 64k-element tensors and fills the JSON and the markdown block."""
    out = tmp_path / "out" / "codec.json"
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nintro kept\n\n{MD_BEGIN}\nold block\n{MD_END}\n\ntail kept\n")

    result = main(["--tiny", "--no-gpu", "--out", str(out), "--md", str(md)])

    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert {"machine", "config", "tensors", "skipped", "totals", "reference_torch_decode", "targets", "gpu"} <= set(
        data
    )
    assert {"cpu_model", "logical_cores", "torch", "numba", "zipnn", "date", "gpu"} <= set(data["machine"])
    assert data["config"]["repeats"] == 1
    assert len(data["tensors"]) >= 2
    for row in data["tensors"]:
        assert row["numel"] == 65536
        assert row["ours_lossless"] and row["zipnn_lossless"]
        assert row["bound_bpw"] == pytest.approx(row["sm_bits"] + row["exp_entropy"])
        assert row["ours_bpw"] == pytest.approx(row["ours_bpw_api"])
        assert row["lane_overhead_bpw"] == pytest.approx(48 * row["lanes"] / row["numel"])
        assert set(row["gbps"]) == {"ours_encode", "ours_decode", "zipnn_encode", "zipnn_decode", "memcpy"}
        assert all(v > 0 for v in row["gbps"].values())
    total = data["totals"]["all"]
    assert {"bound_bpw", "ours_bpw", "zipnn_bpw", "gbps", "decode_vs_zipnn", "encode_vs_zipnn"} <= set(total)
    assert set(data["targets"]) == {"ratio_ge_zipnn", "gap_le_0.05_for_ge_1M", "decode_ge_zipnn", "encode_ge_0.5_GBps"}
    assert data["targets"]["gap_le_0.05_for_ge_1M"]["met"] is None  # no tensor of >= 1M elements in --tiny

    text = md.read_text()
    assert text.count(MD_BEGIN) == 1 and text.count(MD_END) == 1
    assert "old block" not in text
    assert text.startswith("# Benchmarks\n\nintro kept\n") and text.endswith("\n\ntail kept\n")
    block = text[text.index(MD_BEGIN) : text.index(MD_END)]
    assert "| tensor |" in block and "| group |" in block and "Targets in this run" in block


def test_markdown_block_created_when_absent(tmp_path: Path) -> None:
    """Writing into a missing file creates it with the markers."""
    from benchmarks.codec import write_markdown

    md = tmp_path / "docs" / "B.md"
    write_markdown(md, f"{MD_BEGIN}\nx\n{MD_END}")
    write_markdown(md, f"{MD_BEGIN}\ny\n{MD_END}")
    text = md.read_text()
    assert text.count(MD_BEGIN) == 1 and "\ny\n" in text and "\nx\n" not in text
