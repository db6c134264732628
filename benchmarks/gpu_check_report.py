"""Reading and writing for ``benchmarks/gpu_check.py``: pytest's JUnit XML, and the markdown report of a run."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PAPER_GIB = 15.25


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and problems of a pytest ``--junitxml`` file.

    Returns:
        ``tests``, ``passed``, ``failed``, ``errors``, ``skipped``, ``time_s``, ``problems`` (failed or erroring
        tests: ``{"test", "kind", "message"}``) and ``skip_reasons`` (distinct reasons, with counts).
    """
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    problems: list[dict[str, str]] = []
    reasons: dict[str, int] = {}
    time_s = 0.0
    for case in root.iter("testcase"):
        counts["tests"] += 1
        time_s += float(case.get("time") or 0.0)
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind, key in (("failure", "failed"), ("error", "errors")):
            for node in case.findall(kind):
                counts[key] += 1
                message = (node.get("message") or node.text or "").strip().splitlines()
                problems.append({"test": name, "kind": kind, "message": message[0][:300] if message else ""})
        for node in case.findall("skipped"):
            counts["skipped"] += 1
            reason = (node.get("message") or "").strip()[:200]
            reasons[reason] = reasons.get(reason, 0) + 1
    for suite in root.iter("testsuite"):  # collection errors are counted on the suite, not as test cases
        extra = int(suite.get("errors") or 0) - sum(1 for p in problems if p["kind"] == "error")
        counts["errors"] += max(0, extra)
    # A test that fails in setup or teardown after passing gets both a result and an error: count it once.
    broken = {p["test"] for p in problems}
    skipped_names = {
        f"{c.get('classname', '')}::{c.get('name', '')}" for c in root.iter("testcase") if c.find("skipped") is not None
    }
    counts["passed"] = counts["tests"] - len(broken | skipped_names)
    return {**counts, "time_s": time_s, "problems": problems, "skip_reasons": reasons}


def parse_test_log(path: Path) -> dict[str, Any]:
    """Counts of a partial run from the JSON lines of ``benchmarks.gpu_check_env.ResultLog`` (a killed pytest).

    Returns:
        The keys of :func:`parse_junit` (``time_s`` is 0), plus ``partial: True``.
    """
    outcome: dict[str, str] = {}
    problems: list[dict[str, str]] = []
    reasons: dict[str, int] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        test, result = entry["test"], entry["outcome"]
        if result == "failed":
            kind = "failure" if entry["when"] == "call" else "error"
            problems.append({"test": test, "kind": kind, "message": entry["message"]})
            outcome[test] = kind
        elif result == "skipped":
            reasons[entry["message"]] = reasons.get(entry["message"], 0) + 1
            outcome[test] = "skipped"
        else:
            outcome.setdefault(test, "passed")
    kinds = list(outcome.values())
    return {
        "tests": len(kinds),
        "passed": kinds.count("passed"),
        "failed": kinds.count("failure"),
        "errors": kinds.count("error"),
        "skipped": kinds.count("skipped"),
        "time_s": 0.0,
        "problems": problems,
        "skip_reasons": reasons,
        "partial": True,
    }


def _size(nbytes: int) -> str:
    return (
        f"{nbytes / 2**30:g} GiB"
        if nbytes >= 2**30
        else f"{nbytes / 2**20:g} MiB"
        if nbytes >= 2**20
        else f"{nbytes / 2**10:g} KiB"
    )


def _gb(gbps: float) -> str:
    return f"{gbps:.1f}" if gbps >= 1 else f"{gbps:.3f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _f(value: Any, fmt: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, fmt)


def _summary(stage: dict[str, Any]) -> str:
    """One line of what a stage found, for the overview table."""
    r = stage.get("result") or {}
    name = stage["name"]
    if stage["status"] == "skipped":
        return stage.get("error", "")
    if name == "env":
        dev = (r.get("device") or {}).get("name", "no CUDA device")
        return f"{dev}; torch {r.get('torch')} (CUDA {r.get('torch_cuda')}); driver {r.get('driver')}"
    if name == "pytest" and "tests" in r:
        partial = " (before it was stopped)" if r.get("partial") else ""
        return f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped{partial}"
    if name == "codec" and r.get("rows"):
        best = max(r["rows"], key=lambda row: row["bytes"])
        return (
            f"{len(r['rows'])} points; largest ({best['dtype']}, {_size(best['bytes'])}): decode "
            f"{_gb(best['decode_gbps'])}, encode {_gb(best['encode_gbps'])}, copy {_gb(best['copy_gbps'])} GB/s"
        )
    if name == "train" and r.get("rows"):
        parts = []
        for row in r["rows"]:
            done = "error" if "error" in row else f"{_f(row.get('peak_gib'))} GiB, {row['step_s']:.3f} s"
            parts.append(f"{row['method']}: {done}")
        return "; ".join(parts)
    if name == "llama3_8b" and "params" in r:
        peak, step = _f(r.get("step_peak_gib")), _f(r.get("measured_s"))
        return f"{_count(r['params'])} params; step peak {peak} GiB; step {step} s"
    return stage.get("error", "")


def render(report: dict[str, Any]) -> str:
    """The markdown report of a run: overview of the stages, then one table per stage that measured something."""
    env = next((s.get("result") or {} for s in report["stages"] if s["name"] == "env"), {})
    dev = (env.get("device") or {}).get("name", "no CUDA device")
    title = "GPU check (dry run on the CPU)" if report["dry_run"] else "GPU check"
    lines = [
        f"## {title}",
        "",
        f"Generated by `{report['command']}` on {report['started']} in {report['total_s']:.0f} s "
        f"(budget {report['budget_s']:.0f} s).",
        f"Device: {dev}; driver {env.get('driver')} (CUDA {env.get('driver_cuda')}); torch {env.get('torch')} "
        f"(CUDA {env.get('torch_cuda')}); triton {(env.get('versions') or {}).get('triton')}; Python "
        f"{env.get('python')}.",
        "",
        "| stage | status | time s / budget s | result |",
        "|---|---|--:|---|",
    ]
    for s in report["stages"]:
        result = _summary(s).replace("|", "\\|")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} / {s['budget_s']:.0f} | {result} |")
    for line in env.get("missing") or []:
        lines.append(f"\n**Missing:** {line}")
    for s in report["stages"]:
        r = s.get("result") or {}
        section = {"pytest": _pytest_md, "codec": _codec_md, "train": _train_md, "llama3_8b": _llama_md}.get(s["name"])
        if section is not None and r:
            lines += ["", *section(r)]
    return "\n".join(lines) + "\n"


def _pytest_md(r: dict[str, Any]) -> list[str]:
    if "tests" not in r:
        return []
    out = ["### GPU test suite (`pytest -m gpu`)", ""]
    out.append(f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped.")
    for p in r["problems"]:
        out.append(f"- {p['kind']}: `{p['test']}`: {p['message']}")
    for reason, n in r["skip_reasons"].items():
        out.append(f"- skipped ({n}): {reason}")
    return out


def _codec_md(r: dict[str, Any]) -> list[str]:
    out = [
        f"### Codec throughput ({r.get('device_name', r.get('device'))}, Triton backend)",
        "",
        "| dtype | size | bit/weight | lossless | encode GB/s | decode GB/s | copy GB/s | decode / copy |",
        "|---|--:|--:|---|--:|--:|--:|--:|",
    ]
    for row in r.get("rows", []):
        out.append(
            f"| {row['dtype']} | {_size(row['bytes'])} | {row['bpw']:.2f} | {row['lossless']} | "
            f"{_gb(row['encode_gbps'])} | {_gb(row['decode_gbps'])} | {_gb(row['copy_gbps'])} | "
            f"{row['decode_vs_copy']:.2f} |"
        )
    out.append("")
    out.append("GB/s count the tensor's bytes once (a copy's memory traffic, read plus write, is twice its figure).")
    if r.get("training"):
        out += [
            "",
            "Decodes as training makes them (a bf16 weight in a `WeightStore`, `decode_block` per row block):",
            "",
            "| case | weight | blocks | lanes per block | bit/weight | lossless | decode GB/s | host us per decode |",
            "|---|--:|--:|--:|--:|---|--:|--:|",
        ]
        out += [
            f"| {t['case']} | {_size(t['bytes'])} | {t['blocks']} | {t['lanes_per_block']} | {t['bpw']:.2f} | "
            f"{t['lossless']} | {_gb(t['decode_gbps'])} | {t['issue_us_per_block']:.0f} |"
            for t in r["training"]
        ]
    out += [f"- skipped {s['point']}: {s['why']}" for s in r.get("skipped", [])]
    out += [f"- FAILED {f['point']}: {f['error']}" for f in r.get("failures", [])]
    return out


def _train_md(r: dict[str, Any]) -> list[str]:
    shape = r.get("shape", {})
    out = [
        f"### Training step on {r.get('device')}: hidden {shape.get('hidden')}, {shape.get('layers')} layers, vocab "
        f"{shape.get('vocab')}, bf16, act. ckpt, batch 1 x {r.get('seq')} tokens",
        "",
        "| method | params | weights GiB | peak alloc GiB | peak reserved GiB | step s | tokens/s | loss |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in r.get("rows", []):
        if "error" in row:
            out.append(f"| {row['method']} | error: {row['error'][:200]} |||||||")
            continue
        out.append(
            f"| {row['method']} | {_count(row['params'])} | {_f(row.get('weights_gib'))} | "
            f"{_f(row.get('peak_gib'))} | {_f(row.get('reserved_gib'))} | {row['step_s']:.3f} | "
            f"{row['tokens_per_s']:.0f} | {row['loss']:.4f} |"
        )
    for row in r.get("rows", []):
        if "step_s_row_block_reuse" in row:
            out += [
                "",
                f"NeuZip step with deferred re-encodes (the default on CUDA) {row['step_s']:.3f} s, with synchronous "
                f"ones {row['step_s_sync_encode']:.3f} s (same model, next steps); deferred encodes that made the host "
                f"wait: {row['encodes_waited']} of {row['encodes_deferred']}. With `REUSE.row_blocks` (multi-block "
                f"weights' updates reuse the backward decode): step {row['step_s_row_block_reuse']:.3f} s, peak "
                f"{_f(row.get('peak_gib_row_block_reuse'))} GiB.",
            ]
    return out


def _llama_md(r: dict[str, Any]) -> list[str]:
    if "params" not in r:
        return []
    peak = r.get("step_peak_gib")
    verdict = "n/a" if peak is None else ("met" if r.get("target_met") else "not met")
    return [
        f"### Llama-3 8B architecture, one fused-SGD step on {r.get('device')} (batch 1 x {r.get('seq')}, act. ckpt)",
        "",
        "| quantity | value |",
        "|---|--:|",
        f"| parameters | {_count(r['params'])} ({r['params']}) |",
        f"| compressed weights held | {_f(r.get('weights_gib'))} GiB (dense bf16: {r['dense_bf16_gib']:.2f} GiB) |",
        f"| setup (meta build, compress on device) | {r['setup_s']:.1f} s, peak {_f(r.get('setup_peak_gib'))} GiB |",
        f"| warm-up step | {_f(r.get('warmup_s'))} s, peak {_f(r.get('warmup_peak_gib'))} GiB |",
        f"| measured step | {_f(r.get('measured_s'))} s, peak {_f(r.get('measured_peak_gib'))} GiB, reserved "
        f"{_f(r.get('measured_reserved_gib'))} GiB, {_f(r.get('tokens_per_s'), '.0f')} tokens/s |",
        f"| **peak of both steps vs targets** | **{_f(peak)} GiB**: < 16 GB {verdict}; paper {PAPER_GIB} GiB "
        f"(ratio {_f(r.get('vs_paper'))}) |",
        f"| vanilla bf16 weights + grads alone | {r['vanilla_weights_grads_gib']:.1f} GiB (computed) |",
    ]
