"""One command for a GPU machine: the GPU test suite, codec throughput, training memory and the Llama-3 8B step.

Run from the repository root: ``python benchmarks/gpu_check.py [--dry-run] [--out DIR] [--stages ...]``
(``make gpu-check``). Each stage runs in its own process under its own time limit; a stage that fails or runs out
of time is recorded (with what it measured so far) and the next one runs. The whole check fits 8 minutes on an
H100 / H200:

====================  ========  ===============================================================================
stage                 budget s  what
====================  ========  ===============================================================================
``env``               20        Python, torch (+ CUDA), Triton, numba, transformers, Lightning versions; device,
                                driver; what a GPU run lacks (a CPU-only torch, no Triton...), said in words
``pytest``            160       ``pytest -m gpu`` on the test files that hold GPU tests, compiled Triton
                                (``TRITON_INTERPRET`` unset); pass / fail / skip counts from ``--junitxml``
``codec``             60        Triton encode / decode GB/s, bf16 / fp16 / fp32, 16 MiB to 1 GiB, next to the
                                device-to-device copy (``benchmarks/gpu_check_codec.py``)
``train``             90        ~1B Llama, 1024 tokens, bf16, activation checkpointing: peak device memory, step
                                time, tokens/s of vanilla / LOMO / NeuZip (``benchmarks/gpu_check_train.py``)
``llama3_8b``         130       Llama-3 8B architecture compressed from ``meta`` on the GPU, fused SGD at 512
                                tokens: peak vs the < 16 GB target and the paper's 15.25 GiB
====================  ========  ===============================================================================

Writes ``DIR/gpu_check.json`` (every stage's status, time and result), ``DIR/gpu_check.md`` (also printed) and
``DIR/gpu_check.log`` (every stage's output); ``DIR`` defaults to ``benchmarks/out``. Exit status 0 when every
stage passed. ``--dry-run`` runs every stage at tiny sizes on the CPU (Triton interpreted, the torch reference
codec, tiny Llamas, one step) in well under a minute: ``tests/app/test_gpu_check_dry_run.py`` runs it.

Which Python: any interpreter with a CUDA build of torch, Triton, transformers and Lightning (plus numba >= 0.68,
pytest and hypothesis for the test stage). The project need not be installed: the stages map ``kernels/`` to
``nz_lightning.kernels`` themselves (``benchmarks/gpu_check_env.py``). On a GPU machine without network, run it
with that machine's own ``python3`` (``make gpu-check PY=python3`` when there is no ``.venv``); the ``env`` stage
names whatever is missing instead of failing later.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.gpu_check_env import PREFIX  # noqa: E402
from benchmarks.gpu_check_report import parse_junit, parse_test_log, render  # noqa: E402

TOTAL_BUDGET_S = 480.0
"""The whole check's limit (8 minutes); each stage also has its own."""


@dataclass(frozen=True)
class Stage:
    """One stage: a module run as ``python -m module *args --result PATH [--dry-run]``, under ``budget_s``."""

    name: str
    budget_s: float
    what: str
    module: str
    args: tuple[str, ...] = ()


STAGES = (
    Stage("env", 20, "versions, device, driver, what is missing", "benchmarks.gpu_check_env", ("stage",)),
    Stage("pytest", 160, "GPU test suite: pytest -m gpu (compiled Triton)", "benchmarks.gpu_check_env", ("pytest",)),
    Stage("codec", 60, "codec encode / decode GB/s vs device copy", "benchmarks.gpu_check_codec"),
    Stage("train", 90, "~1B Llama step: vanilla / LOMO / NeuZip", "benchmarks.gpu_check_train", ("train",)),
    Stage("llama3_8b", 130, "Llama-3 8B architecture fused-SGD step", "benchmarks.gpu_check_train", ("llama3-8b",)),
)


def gpu_test_files() -> list[str]:
    """Test files (relative to the repository root) that hold GPU-marked tests.

    Only these are collected, so that test modules needing packages a GPU machine lacks (hydra, datasets, zipnn)
    cannot stop the run.
    """
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "mark.gpu" in text:
            files.append(str(path.relative_to(ROOT)))
    return files


def stage_command(stage: Stage, work: Path, dry_run: bool) -> list[str]:
    """The command line of ``stage``; its result goes to ``work/<name>.json`` (``work/junit.xml`` for pytest)."""
    cmd = [sys.executable, "-m", stage.module, *stage.args]
    if stage.name == "pytest":
        return [*cmd, "-q", "-rfEs", "-m", "gpu", f"--junitxml={work / 'junit.xml'}", *gpu_test_files()]
    return [*cmd, "--result", str(work / f"{stage.name}.json"), *(["--dry-run"] if dry_run else [])]


def stage_env(dry_run: bool) -> dict[str, str]:
    """Environment of the stage processes: compiled Triton on the GPU; interpreted Triton and no CUDA when dry."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if dry_run:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_process(cmd: list[str], env: dict[str, str], timeout: float, log: IO[str]) -> tuple[int | None, list[str]]:
    """Run ``cmd`` in its own process group; log its output, echo its progress lines, kill it at ``timeout``.

    Returns:
        The exit status (``None`` when it was killed at the limit) and its last 40 output lines.
    """
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    tail: deque[str] = deque(maxlen=40)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip("\n"))
            if line.startswith(PREFIX):
                print("    " + line.rstrip("\n"), flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group (start_new_session above)
        proc.wait()
        code = None
    reader.join(timeout=10)
    log.flush()
    return code, list(tail)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_error(tail: list[str]) -> str:
    lines = [line.strip() for line in tail if line.strip() and not line.startswith(PREFIX)]
    return lines[-1][:500] if lines else "no output"


def run_stage(stage: Stage, work: Path, dry_run: bool, timeout: float, log: IO[str]) -> dict[str, Any]:
    """Run one stage and return its record: ``status`` (ok / failed / timeout), seconds, result and error."""
    cmd = stage_command(stage, work, dry_run)
    log.write(f"\n===== {stage.name}: {shlex.join(cmd)}\n")
    t0 = time.perf_counter()
    env = stage_env(dry_run)
    if stage.name == "pytest":
        env["GPU_CHECK_TEST_LOG"] = str(work / "tests.jsonl")
    code, tail = run_process(cmd, env, timeout, log)
    seconds = time.perf_counter() - t0
    if stage.name == "pytest":
        junit, test_log = work / "junit.xml", work / "tests.jsonl"
        result: dict[str, Any] = {}
        if junit.exists():
            result = parse_junit(junit)
        elif test_log.exists():  # killed at its limit: what finished before
            result = parse_test_log(test_log)
        if result:
            result["files"] = cmd[cmd.index(f"--junitxml={junit}") + 1 :]
            clean = result["failed"] == 0 and result["errors"] == 0 and code == 0
            result["ok"] = clean and (dry_run or result["passed"] > 0)
    else:
        result = _read_json(work / f"{stage.name}.json")
    status = "timeout" if code is None else ("ok" if code == 0 and result.get("ok") else "failed")
    record: dict[str, Any] = {
        "name": stage.name,
        "what": stage.what,
        "status": status,
        "seconds": seconds,
        "budget_s": stage.budget_s,
        "timeout_s": timeout,
        "returncode": code,
        "result": result,
        "log_tail": tail[-15:],
    }
    if status == "timeout":
        record["error"] = f"stopped at its {timeout:.0f} s limit (partial result kept)"
    elif status == "failed":
        record["error"] = result.get("error") or _last_error(tail)
    return record


def skipped(stage: Stage, why: str) -> dict[str, Any]:
    """The record of a stage that was not run, and why."""
    return {
        "name": stage.name,
        "what": stage.what,
        "status": "skipped",
        "seconds": 0.0,
        "budget_s": stage.budget_s,
        "error": f"not run: {why}",
    }


def write_outputs(out: Path, report: dict[str, Any]) -> str:
    """Write ``out/gpu_check.json`` and ``out/gpu_check.md``; return the markdown."""
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = render(report)
    (out / "gpu_check.md").write_text(markdown)
    return markdown


def run_all(args: argparse.Namespace, log: IO[str], work: Path) -> dict[str, Any]:
    """Run the chosen stages in order within the total budget; returns the whole report.

    The JSON and markdown are rewritten after every stage, so a run cut short still leaves what it measured.
    """
    started = time.perf_counter()
    deadline = started + args.total_budget
    chosen = [s for s in STAGES if s.name == "env" or s.name in args.stages]
    records: list[dict[str, Any]] = []
    blocked = ""
    for i, stage in enumerate(chosen, 1):
        tag = f"{PREFIX} ({i}/{len(chosen)}) {stage.name}"
        left = deadline - time.perf_counter()
        timeout = max(1.0, min(stage.budget_s * args.budget_scale, left))
        if blocked or left < 5:
            record = skipped(stage, blocked or "the total time budget is spent")
            records.append(record)
            print(f"{tag}: skipped ({record['error']})", flush=True)
            continue
        print(f"{tag}: {stage.what} (limit {timeout:.0f} s)", flush=True)
        record = run_stage(stage, work, args.dry_run, timeout, log)
        records.append(record)
        line = f"{tag}: {record['status']} in {record['seconds']:.1f} s"
        print(line + (f": {record['error']}" if "error" in record else ""), flush=True)
        if stage.name == "env" and not args.dry_run:
            blocking = (record["result"] or {}).get("blocking") or []
            if blocking:
                blocked = "; ".join(blocking)
        write_outputs(args.out, _report(args, records, started))
    return _report(args, records, started)


def _report(args: argparse.Namespace, records: list[dict[str, Any]], started: float) -> dict[str, Any]:
    return {
        "dry_run": args.dry_run,
        "command": shlex.join(["python", "benchmarks/gpu_check.py", *args.argv]),
        "started": args.started,
        "total_s": time.perf_counter() - started,
        "budget_s": args.total_budget,
        "ok": all(r["status"] == "ok" for r in records),
        "stages": records,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the stages, write JSON, markdown and log; 0 when every stage passed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (tests the script itself)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out", help="folder for JSON, markdown, log")
    names = [s.name for s in STAGES if s.name != "env"]
    ap.add_argument(
        "--stages", nargs="+", default=names, choices=names, help="stages to run, e.g. to rerun one (env always runs)"
    )
    ap.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole check")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage's own limit")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "dry run on the CPU" if args.dry_run else "GPU run"
    stages = len(set(args.stages)) + 1
    print(f"{PREFIX} {mode}: {stages} stages, at most {args.total_budget:.0f} s; python {sys.executable}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp, open(args.out / "gpu_check.log", "w") as log:
        report = run_all(args, log, Path(tmp))
    print(write_outputs(args.out, report))
    print(f"{PREFIX} wrote {args.out / 'gpu_check.json'}, gpu_check.md and gpu_check.log; ok={report['ok']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
