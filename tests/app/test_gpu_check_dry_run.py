"""``benchmarks/gpu_check.py``: its dry run (every stage, tiny, on the CPU) passes and writes JSON, markdown and log;
without a CUDA device a real run stops after the ``env`` stage and says what is missing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check_report import parse_junit, parse_test_log

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STAGES = ["env", "pytest", "codec", "train", "llama3_8b"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def test_dry_run_every_stage_ok(tmp_path: Path) -> None:
    proc = _run("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["ok"]
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == STAGES
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage.get("error"), stage.get("log_tail"))
        assert 0 < stage["seconds"] <= stage["timeout_s"]
        assert f"({STAGES.index(name) + 1}/{len(STAGES)}) {name}: ok in" in proc.stdout

    env = stages["env"]["result"]
    assert env["torch"] and "triton" in env["versions"] and env["nz_lightning_from"] in ("installed", "checkout")

    tests = stages["pytest"]["result"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"]  # dry run: CUDA hidden, every GPU test skips
    assert tests["failed"] == tests["errors"] == 0
    assert any(f.startswith("tests/gpu/") for f in tests["files"])

    codec = stages["codec"]["result"]
    assert [r["dtype"] for r in codec["rows"]] == ["bfloat16", "float16", "float32"]
    for row in codec["rows"]:
        assert row["lossless"] and row["encode_gbps"] > 0 and row["decode_gbps"] > 0 and row["copy_gbps"] > 0
    training = codec["training"]  # decodes as training makes them: row blocks, one block, shorter lanes
    assert [t["blocks"] > 1 for t in training] == [True, False, True]
    assert training[2]["lanes_per_block"] > training[0]["lanes_per_block"]
    assert all(t["lossless"] and t["decode_gbps"] > 0 and t["issue_us_per_block"] > 0 for t in training)

    rows = {r["method"]: r for r in stages["train"]["result"]["rows"]}
    assert list(rows) == ["vanilla", "lomo", "neuzip"]
    assert all("error" not in r and math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows.values())
    assert len({r["warmup_loss"] for r in rows.values()}) == 1  # the same weights in all three
    assert rows["lomo"]["loss"] == rows["neuzip"]["loss"]  # compressed == uncompressed, same fused SGD
    assert rows["neuzip"]["codec"]["decodes"] > 0 and rows["neuzip"]["codec"]["encodes"] > 0
    assert rows["neuzip"]["step_s_sync_encode"] > 0  # the side-by-side step with synchronous re-encodes
    assert rows["neuzip"]["step_s_row_block_reuse"] > 0  # and with multi-block decode reuse

    big = stages["llama3_8b"]["result"]
    assert big["params"] > 0 and big["measured_s"] > 0 and math.isfinite(big["measured_loss"])

    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## GPU check (dry run on the CPU)" in markdown and "| stage | status |" in markdown
    assert all(f"| {name} | ok |" in markdown for name in STAGES)
    assert "### Codec throughput" in markdown and "### Llama-3 8B architecture" in markdown
    assert "Decodes as training makes them" in markdown and "with synchronous ones" in markdown
    assert markdown.strip() in proc.stdout
    assert "===== codec:" in (tmp_path / "gpu_check.log").read_text()


def test_real_run_without_cuda_says_what_is_missing(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return  # the real run would start; nothing to check here
    proc = _run("--out", str(tmp_path), "--stages", "codec")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    env, codec = report["stages"]
    assert env["status"] == "failed" and env["result"]["blocking"]
    assert "CUDA" in " ".join(env["result"]["blocking"])
    assert codec["status"] == "skipped" and codec["error"].startswith("not run: ")
    assert "MISSING:" in proc.stdout and "**Missing:**" in (tmp_path / "gpu_check.md").read_text()


def test_parse_junit_counts(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite errors="1" failures="1" skipped="1" tests="4">'
        '<testcase classname="a" name="ok" time="0.5"/>'
        '<testcase classname="a" name="bad" time="1"><failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="a" name="boom"><error message="setup failed"/></testcase>'
        '<testcase classname="b" name="skip"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    r = parse_junit(xml)
    assert (r["tests"], r["passed"], r["failed"], r["errors"], r["skipped"]) == (4, 1, 1, 1, 1)
    assert r["time_s"] == 1.5 and r["skip_reasons"] == {"needs a CUDA device": 1}
    assert [p["test"] for p in r["problems"]] == ["a::bad", "a::boom"]


def test_parse_test_log_counts_a_stopped_run(tmp_path: Path) -> None:
    lines = [
        {"test": "t::a", "when": "call", "outcome": "passed", "message": ""},
        {"test": "t::b", "when": "call", "outcome": "failed", "message": "AssertionError"},
        {"test": "t::c", "when": "setup", "outcome": "skipped", "message": "Skipped: no bitsandbytes"},
        {"test": "t::d", "when": "setup", "outcome": "failed", "message": "fixture broke"},
    ]
    log = tmp_path / "tests.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = parse_test_log(log)
    assert (r["tests"], r["passed"], r["failed"], r["errors"], r["skipped"]) == (4, 1, 1, 1, 1)
    assert r["partial"] and r["skip_reasons"] == {"Skipped: no bitsandbytes": 1}


def test_stage_over_its_limit_is_stopped_and_recorded(tmp_path: Path) -> None:
    proc = _run("--dry-run", "--out", str(tmp_path), "--stages", "codec", "--budget-scale", "0.02")
    assert proc.returncode == 1
    env, codec = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert codec["status"] == "timeout" and codec["timeout_s"] == pytest.approx(1.2) and codec["seconds"] < 30
    assert "limit" in codec["error"] and "| codec | timeout |" in (tmp_path / "gpu_check.md").read_text()
