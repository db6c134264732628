"""Peak memory and step time of one training step: vanilla vs LOMO vs NeuZip, one fresh process per configuration.

Run: ``python benchmarks/train_memory.py [--quick] [--seq 512 --batch 1] [--hidden 2048 --layers 8 ...]``.
Writes JSON (``benchmarks/out/train_memory.json``) and a table in ``docs/BENCHMARKS.md``.

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

MD_BEGIN, MD_END = "<!-- train_memory:begin -->", "<!-- train_memory:end -->"
METHODS = ("vanilla", "lomo", "neuzip-sgd", "neuzip-adalomo", "neuzip-adamw")


def _make_step(model: torch.nn.Module, method: str) -> Any:
    """The training step of ``method`` for ``model``: a function of a batch returning the loss."""
    import nz_lightning as nz

    if method == "vanilla":
        sgd = torch.optim.SGD(model.parameters(), lr=1e-4)

        def vanilla_step(batch: torch.Tensor) -> float:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)
            return float(loss.detach())

        return vanilla_step
    rule = "sgd" if method in ("lomo", "neuzip-sgd") else method.split("-")[1]
    opt = nz.fused_optimizer(model, rule, lr=1e-4)

    def fused_step(batch: torch.Tensor) -> float:
        loss = model(input_ids=batch, labels=batch).loss
        opt.backward(loss)
        return float(loss.detach())

    return fused_step


def _build(cfg: dict[str, Any], dims: dict[str, int]) -> torch.nn.Module:
    from benchmarks.llama_model import build_compressed_from_meta, build_dense, llama_config

    config = llama_config(**dims)
    model = build_compressed_from_meta(config) if cfg["method"].startswith("neuzip") else build_dense(config)
    if cfg["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build the model for ``cfg``, run a warm-up and a measured step, return peak RSS and timings.

    The baseline RSS is taken after the same method has run one step on a tiny model (imports, numba JIT,
    kernel initialisation), so "over baseline" counts what the model itself costs.
    """
    import gc

    import nz_lightning as nz
    from nz_lightning.tensor.sizes import weight_sizes

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
    step = _make_step(model, cfg["method"])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen) for _ in range(2)]
    with gemm_mode:
        step(batches[0])  # warm-up: pooled buffers, optimizer state
        settled_kib = rss_kib()
        reset_peak_rss()
        nz.CODEC_STATS.reset()
        t0 = time.perf_counter()
        loss = step(batches[1])
        step_s = time.perf_counter() - t0
    peak_kib = rss_kib("VmHWM")
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
        "decode_s": nz.CODEC_STATS.decode_seconds,
        "encode_s": nz.CODEC_STATS.encode_seconds,
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


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Check the issue's targets on the rows of one run (per checkpointing setting)."""
    out = []
    for ck in (False, True):
        by = {r["method"]: r for r in rows if r["checkpointing"] == ck and "error" not in r}
        if not {"vanilla", "lomo", "neuzip-sgd"} <= by.keys():
            continue
        nz_, van, lomo = by["neuzip-sgd"], by["vanilla"], by["lomo"]
        key = "peak_over_baseline_mib"
        r_van, r_lomo = nz_[key] / van[key], nz_[key] / lomo[key]
        r_time = nz_["step_s"] / lomo["step_s"]
        tag = "on" if ck else "off"
        out.append(
            f"- checkpointing {tag}: NeuZip-SGD peak / vanilla = {r_van:.3f} (target <= 0.45: "
            f"{'met' if r_van <= 0.45 else 'not met'}); / LOMO = {r_lomo:.3f} (target <= 0.75: "
            f"{'met' if r_lomo <= 0.75 else 'not met'}); step time / LOMO = {r_time:.2f}x at {nz_['tokens']} tokens "
            f"(target <= 1.3: {'met' if r_time <= 1.3 else 'not met'})"
        )
    return out


def render(result: dict[str, Any]) -> str:
    """Markdown block for docs/BENCHMARKS.md."""
    m, rows, shape = result["machine"], result["rows"], result["shape"]
    lines = [
        MD_BEGIN,
        "## Training step: peak memory and time (vanilla / LOMO / NeuZip)",
        "",
        f"Generated by `python benchmarks/train_memory.py{' --quick' if result['quick'] else ''}` on {m['date']} "
        f"at `{m['git']}`.",
        machine_line(m),
        "",
        f"Model: Llama-style, hidden {shape['hidden']}, {shape['layers']} layers, "
        f"intermediate {shape['intermediate']}, vocab {shape['vocab']}, bf16, untied embeddings; "
        f"batch {shape['batch']} x seq {shape['seq']}; {shape['threads']} threads; bf16 GEMMs "
        + ("native. " if shape["native_bf16_gemm"] else "computed in fp32 (benchmarks/cpu_matmul.py). ")
        + "One fresh process per row; peak = VmHWM of one measured step after a warm-up step; "
        "'over baseline' subtracts the RSS of the same process after it ran the same method on a tiny model "
        "(imports, numba JIT, kernel init) and before the measured model was built.",
        "",
        "| method | act. ckpt | params | weights held MiB | peak RSS MiB | peak over baseline MiB | step s | "
        "decode s | encode s | loss |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {'on' if r['checkpointing'] else 'off'} | error: {r['error']} |||||||| ")
            continue
        held = r["compressed_weight_mib"] if r["method"].startswith("neuzip") else r["dense_weight_mib"]
        lines.append(
            f"| {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['params'] / 1e6:.1f}M | {held:.0f} | "
            f"{r['peak_mib']:.0f} | {r['peak_over_baseline_mib']:.0f} | {r['step_s']:.2f} | {r['decode_s']:.2f} | "
            f"{r['encode_s']:.2f} | {r['loss']:.4f} |"
        )
    lines += ["", "Targets in this run:", "", *targets(rows), MD_END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run every configuration (or, with ``--child``, one of them) and write the results."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small model (~20M params) for a fast check")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    ap.add_argument(
        "--native-bf16-gemm", action="store_true", help="use torch's bf16 GEMMs (very slow on AVX2-only CPUs)"
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/train_memory.json"))
    ap.add_argument("--md", type=Path, default=Path("docs/BENCHMARKS.md"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return None
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.vocab = 256, 4, 704, 8, 4, 8000
        args.seq, args.batch = 256, 2
    shape = {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab")}
    shape |= {"seq": args.seq, "batch": args.batch, "threads": args.threads, "native_bf16_gemm": args.native_bf16_gemm}
    rows = []
    for ck in args.checkpointing:
        for method in args.methods:
            row = spawn({**shape, "method": method, "checkpointing": ck == "on"})
            print(json.dumps({k: row.get(k) for k in ("method", "checkpointing", "peak_mib", "step_s", "error")}))
            rows.append(row)
    result = {"machine": machine_info(), "shape": shape, "quick": args.quick, "rows": rows}
    write_results(result, args.out, args.md, render(result), MD_BEGIN, MD_END)
    return result


if __name__ == "__main__":
    main()
