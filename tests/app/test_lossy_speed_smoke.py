"""Smoke test of ``benchmarks/lossy_speed.py``: a tiny run fills the JSON and its markdown block."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.lossy_speed import BEGIN, END, MODES, main


def test_tiny_run_writes_json_and_markdown(tmp_path: Path) -> None:
    out, md = tmp_path / "speed.json", tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nkept\n\n{BEGIN}\nold\n{END}\n")
    main(["--numel", "4096", "--repeats", "1", "--out", str(out), "--md", str(md)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * len(MODES)
    assert all(r["encode_gbps"] > 0 and r["decode_gbps"] > 0 for r in rows)
    lossy = [r for r in rows if r["mode"] == "k=3 B=512"]
    assert all(6 < r["bits_per_weight"] < 9 for r in lossy)
    text = md.read_text()
    assert "kept" in text and "old" not in text and text.count(BEGIN) == 1
