"""Peak memory and step time of one training step: vanilla vs LOMO vs NeuZip, one fresh process per configuration.

Run: ``python benchmarks/train_memory.py [--quick] [--seq 64 512 --batch 1] [--hidden 1024 --layers 8 ...]``.
Writes JSON (``benchmarks/out/train_memory.json``) and a table in ``docs/BENCHMARKS.md`` (``--name`` picks other
markers and files, e.g. for the long-context rows).

Methods: ``vanilla`` (torch SGD, plain head), ``lomo`` (dense fused SGD, plain head: the LOMO baseline),
``lomo-blocked`` (the same with the blocked head), ``neuzip-sgd-plain`` (compressed, plain head) and
``neuzip-sgd`` / ``neuzip-adalomo`` / ``neuzip-adamw`` (compressed, blocked head and embedding). The measured step is
cut into phases (:mod:`benchmarks.train_memory_trace`) and the peak of each is reported.

Each configuration runs in its own process with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed large blocks go
back to the OS, so RSS tracks live memory). After setup and one warm-up step, VmHWM is reset to the
current RSS and one measured step runs; "peak" is VmHWM after it. "Over baseline" subtracts the RSS after
the same method ran on a tiny model (interpreter, imports, numba JIT), which no GPU figure would contain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import machine_info, machine_line, reset_peak_rss, rss_kib, write_results  # noqa: E402
from benchmarks.cpu_matmul import Bf16MatmulInFp32  # noqa: E402
from benchmarks.llama_model import add_model_args, default_threads  # noqa: E402
from benchmarks.train_memory_trace import PHASES, PhaseTrace  # noqa: E402

METHODS = ("vanilla", "lomo", "lomo-blocked", "neuzip-sgd-plain", "neuzip-sgd", "neuzip-adalomo", "neuzip-adamw")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def _make_step(model: torch.nn.Module, method: str) -> Any:
    """The training step of ``method`` for ``model``: ``step(batch, trace=None)`` returns the loss."""
    import nz_lightning as nz

    def mark(trace: PhaseTrace | None, phase: str) -> None:
        if trace is not None:
            trace.mark(phase)

    if method == "vanilla":
        sgd = torch.optim.SGD(model.parameters(), lr=1e-4)

        def vanilla_step(batch: torch.Tensor, trace: PhaseTrace | None = None) -> float:
            loss = model(input_ids=batch, labels=batch).loss
            mark(trace, PHASES[0])
            loss.backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)
            mark(trace, PHASES[3])
            return float(loss.detach())

        return vanilla_step
    rule = "sgd" if method.startswith(("lomo", "neuzip-sgd")) else method.split("-")[1]
    opt = nz.fused_optimizer(model, rule, lr=1e-4, blocked_head=method not in ("lomo", "neuzip-sgd-plain"))

    def fused_step(batch: torch.Tensor, trace: PhaseTrace | None = None) -> float:
        loss = model(input_ids=batch, labels=batch).loss
        mark(trace, PHASES[0])
        opt.backward(loss)
        mark(trace, PHASES[3])
        return float(loss.detach())

    return fused_step


def _build(cfg: dict[str, Any], dims: dict[str, int]) -> torch.nn.Module:
    from benchmarks.llama_model import build_compressed_from_meta, build_dense, llama_config

    config = llama_config(**dims)
    model = build_compressed_from_meta(config) if cfg["method"].startswith("neuzip") else build_dense(config)
    if cfg["checkpointing"]:
        from nz_lightning.lm.checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    return model


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build the model for ``cfg``, run a warm-up and a measured step, return peak RSS and timings.

    The baseline RSS is taken after the same method has run one step on a tiny model (imports, numba JIT,
    kernel initialisation), so "over baseline" counts what the model itself costs.
    """
    import gc

    import nz_lightning as nz
    from nz_lightning.tensor.sizes import weight_sizes
    from nz_lightning.tensor.workspace import DECODE_POOL

    torch.set_num_threads(cfg["threads"])
    gemm_mode = contextlib.nullcontext() if cfg["native_bf16_gemm"] else Bf16MatmulInFp32()
    tiny = {"hidden": 64, "layers": 1, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 256}
    with gemm_mode:
        warm = _build(cfg, tiny)
        _make_step(warm, cfg["method"])(torch.randint(0, 256, (1, 16)))
    del warm
    gc.collect()
    base_kib = rss_kib()
    dims = {k: cfg[k] for k in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab")}
    t0 = time.perf_counter()
    model = _build(cfg, dims)
    setup_s = time.perf_counter() - t0
    params = weight_sizes(model).numel
    trace = PhaseTrace(base_kib)
    step = _make_step(model, cfg["method"])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen) for _ in range(3)]
    with gemm_mode:
        step(batches[0])  # warm-up: pooled buffers, optimizer state
        settled_kib = rss_kib()
        reset_peak_rss()
        nz.CODEC_STATS.reset()
        t0 = time.perf_counter()
        loss = step(batches[1])
        step_s = time.perf_counter() - t0
        peak_kib = rss_kib("VmHWM")
        decode_s, encode_s = nz.CODEC_STATS.decode_seconds, nz.CODEC_STATS.encode_seconds
        reset_peak_rss()
        with trace.tracing(model):  # the same step again, cut into phases (each cut resets the peak)
            step(batches[2], trace)
    compressed = weight_sizes(model, include=[n for n, _ in nz.compressed_parameters(model)]).held_bytes
    return {
        **cfg,
        "params": params,
        "loss": loss,
        "setup_s": setup_s,
        "step_s": step_s,
        "tokens": cfg["batch"] * cfg["seq"],
        "baseline_mib": base_kib / 1024,
        "settled_mib": settled_kib / 1024,
        "peak_mib": peak_kib / 1024,
        "peak_over_baseline_mib": (peak_kib - base_kib) / 1024,
        "compressed_weight_mib": compressed / 2**20,
        "dense_weight_mib": params * 2 / 2**20,
        "decode_s": decode_s,
        "encode_s": encode_s,
        "phases_mib": trace.peaks,
        "peak_phase": trace.phase_of_peak(),
        "pool_mib": DECODE_POOL.nbytes() / 2**20,
    }


def spawn(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter and parse its JSON result."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        return {**cfg, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _ratio_line(label: str, num: float, den: float, target: float) -> str:
    ratio = num / den
    return f"{label} = {ratio:.3f} (target <= {target}: {'met' if ratio <= target else 'not met'})"


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Check the issue's targets on the rows of one run, per (checkpointing, sequence length)."""
    out = []
    keys = sorted({(r["checkpointing"], r["seq"]) for r in rows})
    for ck, seq in keys:
        by = {r["method"]: r for r in rows if (r["checkpointing"], r["seq"]) == (ck, seq) and "error" not in r}
        key, parts = "peak_over_baseline_mib", []
        nz_ = by.get("neuzip-sgd")
        if nz_ is not None and "vanilla" in by:
            parts.append(_ratio_line("NeuZip-SGD peak / vanilla", nz_[key], by["vanilla"][key], 0.45))
        if nz_ is not None and "lomo" in by:
            parts.append(_ratio_line("/ LOMO (plain head)", nz_[key], by["lomo"][key], 0.75))
        for blocked, plain in (("neuzip-sgd", "neuzip-sgd-plain"), ("lomo-blocked", "lomo")):
            if blocked in by and plain in by:
                parts.append(
                    _ratio_line(f"step time {blocked} / {plain}", by[blocked]["step_s"], by[plain]["step_s"], 1.1)
                )
        if parts:
            out.append(f"- {seq} tokens, checkpointing {'on' if ck else 'off'}: " + "; ".join(parts))
    return out


def render(result: dict[str, Any]) -> str:
    """Markdown block for docs/BENCHMARKS.md."""
    m, rows, shape = result["machine"], result["rows"], result["shape"]
    begin, end = _markers(result["name"])
    flags = " ".join(result["argv"])
    lines = [
        begin,
        f"## Training step: peak memory and time (vanilla / LOMO / NeuZip){result['title']}",
        "",
        f"Generated by `python benchmarks/train_memory.py {flags}` on {m['date']} at `{m['git']}`.",
        machine_line(m),
        "",
        f"Model: Llama-style, hidden {shape['hidden']}, {shape['layers']} layers, "
        f"intermediate {shape['intermediate']}, vocab {shape['vocab']}, bf16, untied embeddings; "
        f"batch {shape['batch']}; {shape['threads']} threads; bf16 GEMMs "
        + ("native. " if shape["native_bf16_gemm"] else "computed in fp32 (benchmarks/cpu_matmul.py). ")
        + "One fresh process per row; peak = VmHWM of one measured step after a warm-up step; "
        "'over baseline' subtracts the RSS of the same process after it ran the same method on a tiny model "
        "(imports, numba JIT, kernel init) and before the measured model was built. Phase columns: peak over "
        "baseline in each phase of a third, traced step (benchmarks/train_memory_trace.py).",
        "",
        "| method | seq | act. ckpt | params | weights held MiB | peak RSS MiB | peak over baseline MiB | "
        + " | ".join(PHASES)
        + " | step s | decode s | encode s | loss |",
        "|---|--:|---|--:|--:|--:|--:|" + "--:|" * len(PHASES) + "--:|--:|--:|--:|",
    ]
    for r in rows:
        ck = "on" if r["checkpointing"] else "off"
        if "error" in r:
            lines.append(f"| {r['method']} | {r['seq']} | {ck} | error: {r['error']} |")
            continue
        held = r["compressed_weight_mib"] if r["method"].startswith("neuzip") else r["dense_weight_mib"]
        phases = " | ".join(
            f"**{r['phases_mib'][p]:.0f}**" if p == r["peak_phase"] else f"{r['phases_mib'].get(p, float('nan')):.0f}"
            for p in PHASES
        )
        lines.append(
            f"| {r['method']} | {r['seq']} | {ck} | {r['params'] / 1e6:.1f}M | {held:.0f} | {r['peak_mib']:.0f} | "
            f"{r['peak_over_baseline_mib']:.0f} | {phases} | {r['step_s']:.2f} | {r['decode_s']:.2f} | "
            f"{r['encode_s']:.2f} | {r['loss']:.4f} |"
        )
    lines += ["", "Targets in this run:", "", *targets(rows), end]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run every configuration (or, with ``--child``, one of them) and write the results."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small model (~20M params) for a fast check")
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument(
        "--native-bf16-gemm", action="store_true", help="use torch's bf16 GEMMs (very slow on AVX2-only CPUs)"
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--checkpointing", nargs="+", default=["on"], choices=["off", "on"])
    ap.add_argument("--name", default="train_memory", help="markdown markers and JSON name")
    ap.add_argument("--title", default="", help="suffix of the markdown section title")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/out/<name>.json)")
    ap.add_argument("--md", type=Path, default=Path("docs/BENCHMARKS.md"))
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return None
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.vocab = 256, 4, 704, 8, 4, 8000
        args.seq, args.batch = [256], 2
    shape = {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab")}
    shape |= {"batch": args.batch, "threads": args.threads, "native_bf16_gemm": args.native_bf16_gemm}
    rows = []
    for ck in args.checkpointing:
        for seq in args.seq:
            for method in args.methods:
                row = spawn({**shape, "seq": seq, "method": method, "checkpointing": ck == "on"})
                keys = ("method", "seq", "peak_over_baseline_mib", "peak_phase", "step_s", "error")
                print(json.dumps({k: row.get(k) for k in keys}), flush=True)
                rows.append(row)
    shown, skip = [], False
    for a in raw:  # the command line, without where the outputs went
        if not skip and not a.startswith(("--md", "--out")):
            shown.append(a)
        skip = a in ("--md", "--out")
    result = {
        "machine": machine_info(),
        "shape": shape,
        "name": args.name,
        "title": args.title,
        "argv": shown,
        "rows": rows,
    }
    out = args.out or Path(f"benchmarks/out/{args.name}.json")
    begin, end = _markers(args.name)
    write_results(result, out, args.md, render(result), begin, end)
    return result


if __name__ == "__main__":
    main()
