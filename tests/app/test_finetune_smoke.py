"""Smoke test of ``benchmarks/finetune.py --quick``: the Table 2 benchmark runs end to end and writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: the QLoRA rows cannot run")
pytest.importorskip("matplotlib")

from benchmarks.finetune import main  # noqa: E402
from benchmarks.finetune_data import encode_pairs, sql_pairs  # noqa: E402


def test_sql_pairs_are_deterministic_and_held_out_literals_are_unseen() -> None:
    train, heldout = sql_pairs(200, 20, seed=0)
    assert (train, heldout) == sql_pairs(200, 20, seed=0)
    assert not {p.answer for p in heldout} & {p.answer for p in train}
    ids, labels = encode_pairs(train[:3], 256)
    for row, lab, pair in zip(ids, labels, train[:3], strict=True):
        answer = bytes(int(t) for t in lab[lab >= 0] if t < 256).decode()
        assert answer == pair.answer and bytes(int(t) for t in row[: len(pair.prompt)]).decode() == pair.prompt
    with pytest.raises(ValueError, match="seq_len"):
        encode_pairs(train[:1], 16)


def test_quick_benchmark_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    """Two methods (NeuZip SGD and QLoRA nf4), each in its own process, on a tiny model cached under tmp_path."""
    result = main(
        ["--quick", "--methods", "neuzip-sgd", "qlora-nf4", "--out", str(tmp_path), "--cache", str(tmp_path / "c")]
    )
    assert result is not None
    data = json.loads((tmp_path / "finetune_quick.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["neuzip-sgd", "qlora-nf4"]
    by = {r["method"]: r for r in data["runs"]}
    assert by["qlora-nf4"]["trainable_params"] < by["neuzip-sgd"]["trainable_params"]
    assert by["qlora-nf4"]["weight_bytes"] < by["neuzip-sgd"]["weight_bytes"]
    for r in data["runs"]:
        assert r["peak_mib"] > 0 and r["step_s"] > 0 and r["heldout_loss"] > 0 and 0 <= r["exact_match"] <= 1
    md = (tmp_path / "finetune_quick.md").read_text()
    assert md.startswith("<!-- finetune:begin -->") and "| qlora-nf4 |" in md and "Best NeuZip row" in md
    assert (tmp_path / "finetune_quick.png").stat().st_size > 1000
    assert (tmp_path / "c" / "quick").is_dir()  # the pre-trained model is cached for reruns
