"""Multi-process training benchmark: data-parallel LOMO / NeuZip, FSDP2 dense, NeuZip-FSDP (dense / compressed gather).

Run: ``python benchmarks/distributed.py [--dry-run] [--worlds 1 2] [--methods ...] [--units {layer,weight}]
[--no-backward-prefetch] [--out-dir benchmarks/out] [--name distributed]``. Writes ``<out-dir>/<name>.json`` and the
markdown block ``<out-dir>/<name>.md``. ``--units`` sets the FSDP units of every FSDP method: ``layer`` (default) =
each decoder layer, the embedding and the head; ``weight`` = those and each linear projection of a decoder layer on
its own. ``--no-backward-prefetch``: every FSDP method gathers a unit only when its own backward starts;
``--split-bytes N``: every FSDP method splits a unit larger than N dense bytes into row parts; ``--grad-overlap N``:
the data-parallel methods keep N gradient all-reduces in flight (default 1, as ``NeuZipStrategy``; 0: none).

Every (method, world size) runs as a fresh gloo job on the CPU: ``world_size`` processes started with a
torchrun-style environment (``benchmarks/distributed_worker.py``), one torch and one numba thread per rank
(``NUMBA_NUM_THREADS=1``, ``OMP_NUM_THREADS=1``), ``MALLOC_MMAP_THRESHOLD_=65536`` (freed large blocks go back to the
OS, so RSS tracks live memory). Before the jobs, one process encodes and decodes a full-size trained weight, so
that numba's on-disk cache holds every codec path the jobs take (compiled inside a measured job, LLVM's memory
inflated its peak by 20-45 MiB). Each rank first runs the same method on a tiny model (imports, numba JIT, process
group, FSDP set-up); its RSS then is the baseline. After building the measured model and one warm-up step, VmHWM is
reset and ``--steps`` steps run; "peak over baseline" = VmHWM - baseline, per rank (the table shows the largest rank).
Step time = mean over the measured steps (largest rank); tokens/s = world x batch x seq / step time (each rank
trains its own micro-batch). Bytes per step: FSDP all-gather output and reduce-scatter input bytes
(``nz_lightning.distributed.comm_stats``); data parallel: the bytes of the gradients passed to all-reduce.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import machine_info, machine_line  # noqa: E402
from benchmarks.distributed_worker import DEFAULT_METHODS, METHODS, TINY, UNITS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = {"hidden": 512, "layers": 32, "intermediate": 1408, "heads": 8, "kv_heads": 2, "vocab": 8000}
LABELS = {
    "dp-lomo": "data parallel LOMO (dense replica)",
    "dp-neuzip": "data parallel NeuZip (compressed replica)",
    "fsdp-dense": "FSDP2 dense + fused update",
    "fsdp-nz-dgather": "NeuZip-FSDP, dense all-gather",
    "fsdp-nz-cgather": "NeuZip-FSDP, compressed all-gather",
    "fsdp-nz-xgather": "NeuZip-FSDP, compressed all-gather, GPU path (device pack, exchanged heads)",
}


UNIT_TEXT = {
    "layer": "each decoder layer, the embedding and the LM head (final norm in the root).",
    "weight": "each decoder layer (holding its norms), each of its seven linear projections nested in it (q/k/v/o,"
    " gate/up/down), the embedding and the LM head (final norm in the root).",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(cfg: dict[str, Any], world: int, timeout: float) -> list[dict[str, Any]] | str:
    """Run one configuration as ``world`` gloo ranks; return every rank's result, or an error text."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": str(cfg["threads"]),
            "NUMBA_NUM_THREADS": str(cfg["threads"]),
            "MALLOC_MMAP_THRESHOLD_": "65536",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        cmd = [sys.executable, "-m", "benchmarks.distributed_worker", json.dumps(cfg)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    deadline, outputs, failed = time.monotonic() + timeout, [], False
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, _ = proc.communicate()
            failed = True
        outputs.append(out.decode(errors="replace"))
        failed |= proc.returncode != 0
    files = [Path(cfg["out_dir"]) / f"{cfg['tag']}.rank{r}.json" for r in range(world)]
    if failed or not all(f.exists() for f in files):
        tail = next((o for o in outputs if "Error" in o or "error" in o), outputs[0])
        return "failed or timed out: " + " | ".join(tail.strip().splitlines()[-3:])
    results = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    return results


def summarize(cfg: dict[str, Any], world: int, ranks: list[dict[str, Any]] | str) -> dict[str, Any]:
    """One table row: the largest rank's peak and step time, per-step bytes, every rank's losses."""
    row: dict[str, Any] = {"method": cfg["method"], "world_size": world, "seq": cfg["seq"], "units": cfg["units"]}
    if isinstance(ranks, str):
        return {**row, "error": ranks}
    r0 = ranks[0]
    step_s = max(r["step_s"] for r in ranks)
    return {
        **row,
        "params": r0["params"],
        "weights_source": r0["weights_source"],
        "peak_over_baseline_mib": max(r["peak_over_baseline_mib"] for r in ranks),
        "peak_mib": max(r["peak_mib"] for r in ranks),
        "baseline_mib": max(r["baseline_mib"] for r in ranks),
        "step_s": step_s,
        "tokens_per_s": world * cfg["batch"] * cfg["seq"] / step_s,
        "setup_s": max(r["setup_s"] for r in ranks),
        "weights_held_bytes": max(r["weights_bytes"]["held"] for r in ranks),
        "weights_dense_bytes": r0["weights_bytes"]["dense_equivalent"],
        "comm_per_step": r0["comm_per_step"],
        "fsdp_units": len(r0["fsdp_modules"]),  # the root included; 0 for data parallel
        "losses": [r["losses"] for r in ranks],
        "ranks": ranks,
    }


def targets(all_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, checked on this run's rows for each sequence length (missing rows: not evaluated)."""
    out: list[dict[str, Any]] = []
    for seq in sorted({r["seq"] for r in all_rows}):
        rows = [r for r in all_rows if r["seq"] == seq]
        out += [{**t, "seq": seq} for t in _targets(rows)]
    return out


def _find(rows: list[dict[str, Any]], method: str, world: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == method and r["world_size"] == world and "error" not in r), None)


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def ratio(name: str, num: dict[str, Any] | None, den: dict[str, Any] | None, key: str, limit: float) -> None:
        if num is None or den is None:
            out.append({"target": name, "limit": limit, "ratio": None, "met": None})
            return
        value = num[key] / den[key]
        out.append({"target": name, "limit": limit, "ratio": value, "met": value <= limit})

    key = "peak_over_baseline_mib"
    nzf = _find(rows, "fsdp-nz-cgather", 2)
    ratio(
        "NeuZip-FSDP (2 ranks, compressed gather) per-rank peak / single-process NeuZip",
        nzf,
        _find(rows, "dp-neuzip", 1),
        key,
        0.55,
    )
    ratio(
        "NeuZip-FSDP (2 ranks, compressed gather) per-rank peak / FSDP2 dense (2 ranks)",
        nzf,
        _find(rows, "fsdp-dense", 2),
        key,
        0.75,
    )
    nzd = _find(rows, "fsdp-nz-dgather", 2)
    ratio(
        "NeuZip-FSDP (2 ranks, dense gather) per-rank peak / single-process NeuZip",
        nzd,
        _find(rows, "dp-neuzip", 1),
        key,
        0.55,
    )
    ratio(
        "NeuZip-FSDP (2 ranks, dense gather) per-rank peak / FSDP2 dense (2 ranks)",
        nzd,
        _find(rows, "fsdp-dense", 2),
        key,
        0.75,
    )
    if nzf is not None:
        c = nzf["comm_per_step"]
        value = c["all_gather_bytes"] / c["all_gather_dense_bytes"] if c["all_gather_dense_bytes"] else None
        same = None if nzd is None else nzd["losses"] == nzf["losses"]
        out.append(
            {
                "target": "compressed all-gather bytes / bf16 bytes, NeuZip matrices (2 ranks)",
                "limit": 0.72,
                "ratio": value,
                "met": value is not None and value <= 0.72,
                "same_losses_as_dense_gather": same,
            }
        )
        if nzd is not None:
            wire = c["wire_all_gather_bytes"] / nzd["comm_per_step"]["wire_all_gather_bytes"]
            out.append(
                {
                    "target": "all-gather wire bytes, compressed / dense gather, all parameters (2 ranks)",
                    "limit": 0.72,
                    "ratio": wire,
                    "met": wire <= 0.72,
                    "same_losses_as_dense_gather": same,
                }
            )
    ratio(
        "data-parallel NeuZip step time / data-parallel LOMO (2 ranks)",
        _find(rows, "dp-neuzip", 2),
        _find(rows, "dp-lomo", 2),
        "step_s",
        1.3,
    )
    return out


def loss_checks(rows: list[dict[str, Any]]) -> list[str]:
    """Which configurations produced bit-identical losses (every rank, every step) at each world size."""
    lines = []
    for seq, world in sorted({(r["seq"], r["world_size"]) for r in rows}):
        groups: dict[str, list[str]] = {}
        for r in rows:
            if (r["seq"], r["world_size"]) == (seq, world) and "error" not in r:
                groups.setdefault(json.dumps(r["losses"]), []).append(r["method"])
        parts = [" = ".join(ms) for ms in groups.values()] or ["no successful run"]
        text = " | ".join(parts) if len(parts) > 1 else f"all equal ({parts[0]})"
        lines.append(f"{seq} tokens, {world} rank(s): {text}")
    return lines


def _split_text(rows: list[dict[str, Any]], split_bytes: int | str = "auto") -> str:
    """Which units ``shard_model`` split into row parts (``<name>.parts.<k>``; layer indices folded to ``*``)."""
    seen: dict[str, set[str]] = {}
    for r in rows:
        for name in r["ranks"][0].get("fsdp_modules", []) if "ranks" in r else []:
            if ".parts." in name:
                pattern = re.sub(r"\.\d+\.", ".*.", name.split(".parts.")[0])
                seen.setdefault(pattern, set()).add(f"{r['method']}/{r['world_size']}")
    cap = "" if split_bytes == "auto" else f" Row-part cap {int(split_bytes) / 2**20:.2f} MiB (dense bytes)."
    return cap + "".join(f" `{n}` split into row-part units ({', '.join(sorted(w))})." for n, w in sorted(seen.items()))


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def render(result: dict[str, Any]) -> str:
    """The markdown block (``benchmarks/out/distributed.md``; merged into docs/BENCHMARKS.md by hand)."""
    m, shape, rows = result["machine"], result["shape"], result["rows"]
    lines = [
        "## Multi-process training: data parallel and FSDP2, dense and NeuZip (CPU, gloo)",
        "",
        f"Generated by `{' '.join(['python benchmarks/distributed.py', *result['argv']])}` from {m['date']} to "
        f"{result['finished']} (started at `{m['git']}`).",
        machine_line(m)
        + f" Load average at start: {', '.join(f'{x:.1f}' for x in m['load_avg_start'])}."
        + (f" ({result['machine_note']})" if result.get("machine_note") else ""),
        "",
        f"Model: Llama-style, hidden {shape['hidden']}, {shape['layers']} layers, intermediate {shape['intermediate']},"
        f" {shape['heads']} heads / {shape['kv_heads']} KV heads, vocab {shape['vocab']}, untied embeddings, bf16; "
        f"weights: {result['weights_source']}. Per rank: batch {shape['batch']} x seq tokens (its own "
        f"micro-batch), {shape['threads']} torch + numba thread(s), activation checkpointing, plain LM head, fused "
        f"SGD (lr {shape['lr']}) in backward; bf16 GEMMs "
        + ("native." if shape["native_bf16_gemm"] else "in fp32 (benchmarks/cpu_matmul.py).")
        + f" {shape['steps']} measured step(s) after one warm-up step. FSDP units: "
        + UNIT_TEXT[shape.get("units", "layer")]
        + (
            ""
            if shape.get("backward_prefetch", True)
            else " No backward prefetch (each unit gathered when its backward starts)."
        )
        + _split_text(rows, shape.get("split_bytes", "auto"))
        + f" Data parallel: {shape.get('grad_overlap', 1)} gradient all-reduce(s) kept in flight while earlier weights"
        " are updated (`GradientAverager`, as `NeuZipStrategy`; 0 = each awaited in its hook)."
        + (
            ""
            if shape.get("reuse_capacity") is None
            else f" Backward decodes held for reuse: {shape['reuse_capacity']} (`REUSE.capacity`)."
        )
        + " One fresh gloo job per row; peak over baseline ="
        " VmHWM of the measured steps - RSS after the same method ran on a tiny model (largest rank). Bytes per step:"
        " data parallel = gradient bytes passed to all-reduce (a ring moves 2(n-1)/n of that per rank); FSDP ="
        " every all-gather's output bytes and every reduce-scatter's input bytes (all parameters, counted at"
        " `torch.distributed.all_gather_single` / `reduce_scatter_single`: forward, checkpoint recompute and"
        " backward); 'matrices gathered / bf16' = the NeuZip-eligible matrices' share of the all-gathers against the"
        " same gathers in bf16 (`nz_lightning.distributed.comm_stats`; the norm vectors are gathered dense).",
        "",
        "| method | tokens/rank | ranks | params | weights held/rank MiB | peak over baseline MiB | step s | tokens/s |"
        " all-reduce MiB/step | all-gather MiB/step | matrices gathered / bf16 | reduce-scatter MiB/step |"
        " final loss (rank 0) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {LABELS[r['method']]} | {r['seq']} | {r['world_size']} | error: {r['error']} |")
            continue
        c = r["comm_per_step"]
        ar = _mib(c["all_reduce_bytes"]) if "all_reduce_bytes" in c else "-"
        ag = _mib(c["wire_all_gather_bytes"]) if "wire_all_gather_bytes" in c else "-"
        agd = "-"
        if c.get("all_gather_dense_bytes"):
            agd = f"{_mib(c['all_gather_bytes'])} / {_mib(c['all_gather_dense_bytes'])}"
        rs = _mib(c["wire_reduce_scatter_bytes"]) if "wire_reduce_scatter_bytes" in c else "-"
        lines.append(
            f"| {LABELS[r['method']]} | {r['seq']} | {r['world_size']} | {r['params'] / 1e6:.1f}M |"
            f" {_mib(r['weights_held_bytes'])} |"
            f" {r['peak_over_baseline_mib']:.0f} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {ar} | {ag} | {agd} |"
            f" {rs} | {r['losses'][0][-1]:.4f} |"
        )
    lines += ["", "Targets (issue 13) in this run:", ""]
    for t in result["targets"]:
        verdict = "not evaluated" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
        value = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f}"
        extra = ""
        if "same_losses_as_dense_gather" in t:
            same = t["same_losses_as_dense_gather"]
            extra = "; losses identical to dense gather: " + {True: "yes", False: "NO", None: "not compared"}[same]
        lines.append(f"- {t['seq']} tokens: {t['target']} = {value} (target <= {t['limit']}: {verdict}){extra}")
    lines += ["", "Bit-identical losses (every rank, every step):", ""]
    lines += [f"- {line}" for line in result["loss_checks"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (method, world size), write JSON and markdown, return the result."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="every configuration on a tiny model, 1 step")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    ap.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    for k, v in FULL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, nargs="+", default=[64, 1024], help="tokens per rank (one row set each)")
    ap.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads per rank")
    ap.add_argument("--fp32-gemm", action="store_true", help="bf16 GEMMs in fp32 (CPUs without AVX-512 BF16)")
    ap.add_argument("--random-init", action="store_true", help="N(0, 0.02) weights instead of tiled trained ones")
    ap.add_argument("--units", default="layer", choices=UNITS, help="FSDP units (every FSDP method): layer / weight")
    ap.add_argument(
        "--no-backward-prefetch", action="store_true", help="FSDP: gather a unit only when its own backward starts"
    )
    ap.add_argument(
        "--split-bytes", type=int, default=None, help="FSDP: row-part cap in bytes (default: shard_model's 'auto')"
    )
    ap.add_argument(
        "--grad-overlap", type=int, default=1, help="data parallel: gradient all-reduces kept in flight (0: none)"
    )
    ap.add_argument(
        "--reuse-capacity",
        type=int,
        default=None,
        help="compressed methods: backward decodes held for reuse (REUSE.capacity; >= a layer's weights: each weight"
        " decoded twice per step under checkpointing)",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument("--name", default="distributed")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if any(w < 1 for w in args.worlds):
        ap.error("--worlds: world sizes must be >= 1")
    dims = dict(TINY) if args.dry_run else {k: getattr(args, k) for k in FULL}
    if args.dry_run:
        args.seq, args.batch, args.steps = [16], 1, 1
    shape = {
        **dims,
        "batch": args.batch,
        "seqs": args.seq,
        "steps": args.steps,
        "lr": args.lr,
        "threads": args.threads,
        "native_bf16_gemm": not args.fp32_gemm,
        "trained": not args.random_init,
        "units": args.units,
        "backward_prefetch": not args.no_backward_prefetch,
        "grad_overlap": args.grad_overlap,
        "split_bytes": "auto" if args.split_bytes is None else args.split_bytes,
        "reuse_capacity": args.reuse_capacity,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()  # date, commit and load when the run starts
    prime = subprocess.run(
        [sys.executable, "-m", "benchmarks.distributed_worker", "--prime"],
        cwd=ROOT,
        env={**os.environ, "NUMBA_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)},
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    if prime.returncode != 0:
        raise SystemExit(
            f"priming the codec's compiled-code cache failed:\n{prime.stdout[-2000:]}{prime.stderr[-2000:]}"
        )
    rows = []
    for seq in args.seq:
        for world in args.worlds:
            for method in args.methods:
                tag = f"{args.name}.{method}.s{seq}.w{world}.{os.getpid()}"
                cfg = {**shape, "seq": seq, "method": method, "tag": tag, "out_dir": str(args.out_dir)}
                row = summarize(cfg, world, launch(cfg, world, args.timeout))
                keys = ("method", "seq", "world_size", "fsdp_units", "peak_over_baseline_mib", "step_s", "error")
                print(json.dumps({k: row.get(k) for k in keys}), flush=True)
                rows.append(row)
    shown = [a for i, a in enumerate(raw) if a != "--out-dir" and (i == 0 or raw[i - 1] != "--out-dir")]
    ok = next((r for r in rows if "error" not in r), None)
    result = {
        "units": args.units,
        "machine": machine,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "shape": shape,
        "argv": shown,
        "dry_run": args.dry_run,
        "weights_source": ok["weights_source"] if ok else "unknown",
        "rows": rows,
    }
    result["targets"] = targets(rows)
    result["loss_checks"] = loss_checks(rows)
    block = render(result)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (args.out_dir / f"{args.name}.md").write_text(block + "\n")
    print(block)
    return result


if __name__ == "__main__":
    main()
