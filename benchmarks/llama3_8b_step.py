"""One full-parameter training step of the Llama-3 8B architecture on CPU, with every weight compressed.

Run: ``python benchmarks/llama3_8b_step.py [--seq 128] [--optimizer sgd|adalomo] [--layers N] [--plain-head]``.
Writes JSON (``benchmarks/out/llama3_8b_step.json``, or ``--out``) and a block in ``docs/BENCHMARKS.md`` (``--md``).
The fused optimizer uses the blocked head and embedding unless ``--plain-head``; the step's peak is also given per
phase (:mod:`benchmarks.train_memory_trace`).

The model (transformers ``LlamaConfig`` with the published 8B sizes, random init N(0, 0.02), bf16, untied
embeddings) is built on ``meta`` and each tensor is generated, compressed and installed one at a time, so
the dense model never exists. One step: batch 1, activation checkpointing, fused update in backward.
Peak memory is the process VmHWM (setup included), with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers
return to the OS. bf16 GEMMs run in fp32 (benchmarks/cpu_matmul.py) because AVX2 CPUs lack fast bf16 GEMMs, unless
``--native-bf16-gemm`` (CPUs with AVX-512 BF16).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import nz_lightning as nz  # noqa: E402
from benchmarks.common import machine_info, machine_line, rss_kib, write_results  # noqa: E402
from benchmarks.cpu_matmul import Bf16MatmulInFp32  # noqa: E402
from benchmarks.llama_model import LLAMA3_8B, build_compressed_from_meta, llama_config  # noqa: E402
from benchmarks.train_memory_trace import PHASES, PhaseTrace  # noqa: E402
from nz_lightning.tensor.sizes import weight_sizes  # noqa: E402

MD_BEGIN, MD_END = "<!-- llama3_8b:begin -->", "<!-- llama3_8b:end -->"
GIB = 2**30


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, compress and train one step; return timings and peaks."""
    torch.set_num_threads(args.threads)
    dims = {**LLAMA3_8B, "layers": args.layers}
    config = llama_config(**dims)
    base = rss_kib() * 1024
    t0 = time.perf_counter()
    model = build_compressed_from_meta(config, seed=0)
    setup_s = time.perf_counter() - t0
    setup_peak = rss_kib("VmHWM") * 1024
    from nz_lightning.lm.checkpointing import enable_activation_checkpointing

    enable_activation_checkpointing(model)
    sizes = weight_sizes(model)
    params = sizes.numel
    compressed = weight_sizes(model, include=[n for n, _ in nz.compressed_parameters(model)]).held_bytes
    dense_left = sizes.dense_bytes - sizes.compressed_dense_bytes  # the parameters left uncompressed
    opt = nz.fused_optimizer(model, args.optimizer, lr=1e-4, blocked_head=not args.plain_head)
    batch = torch.randint(0, dims["vocab"], (1, args.seq), generator=torch.Generator().manual_seed(0))
    nz.CODEC_STATS.reset()
    before_step = rss_kib()
    trace = PhaseTrace(0)
    trace.mark("setup")  # the setup peak is recorded above; phases below are the step's own
    t0 = time.perf_counter()
    gemm = contextlib.nullcontext() if args.native_bf16_gemm else Bf16MatmulInFp32()
    with gemm, trace.tracing(model):
        loss = model(input_ids=batch, labels=batch).loss
        forward_s = time.perf_counter() - t0
        trace.mark(PHASES[0])
        opt.backward(loss)
        trace.mark(PHASES[3])
    step_s = time.perf_counter() - t0
    trace.peaks.pop("setup")
    peak = max(setup_peak, max(trace.peaks.values()) * 2**20)
    return {
        "machine": machine_info(),
        "layers": args.layers,
        "seq": args.seq,
        "optimizer": args.optimizer,
        "threads": args.threads,
        "params": params,
        "dense_bf16_gib": params * 2 / GIB,
        "compressed_weight_gib": compressed / GIB,
        "dense_params_gib": dense_left / GIB,
        "imports_gib": base / GIB,
        "setup_s": setup_s,
        "setup_peak_gib": setup_peak / GIB,
        "forward_s": forward_s,
        "step_s": step_s,
        "peak_gib": peak / GIB,
        "step_peak_gib": max(trace.peaks.values()) / 1024,
        "before_step_gib": before_step / 2**20,
        "phases_gib": {k: v / 1024 for k, v in trace.peaks.items()},
        "peak_phase": trace.phase_of_peak(),
        "blocked_head": not args.plain_head,
        "native_bf16_gemm": args.native_bf16_gemm,
        "loss": float(loss.detach()),
        "decode_s": nz.CODEC_STATS.decode_seconds,
        "encode_s": nz.CODEC_STATS.encode_seconds,
        "decodes": nz.CODEC_STATS.decodes,
        "encodes": nz.CODEC_STATS.encodes,
    }


def render(r: dict[str, Any]) -> str:
    """Markdown block for docs/BENCHMARKS.md."""
    vanilla_need = r["params"] * 4 / GIB  # bf16 weights + bf16 gradients, before activations and optimizer state
    layers_flag = ("" if r["layers"] == 32 else f" --layers {r['layers']}") + (
        "" if r["blocked_head"] else " --plain-head"
    )
    layers_flag += " --native-bf16-gemm" if r.get("native_bf16_gemm") else ""
    lines = [
        MD_BEGIN,
        "## Llama-3 8B architecture: one full-parameter training step on CPU",
        "",
        f"Generated by `python benchmarks/llama3_8b_step.py --seq {r['seq']} "
        f"--optimizer {r['optimizer']}{layers_flag}` on {r['machine']['date']} at `{r['machine']['git']}`.",
        machine_line(r["machine"]),
        "",
        "| quantity | value |",
        "|---|--:|",
        f"| parameters | {r['params'] / 1e9:.3f} B ({r['layers']} layers) |",
        f"| dense bf16 weights (not built) | {r['dense_bf16_gib']:.2f} GiB |",
        f"| compressed weights held | {r['compressed_weight_gib']:.2f} GiB |",
        f"| weights kept dense (norms) | {r['dense_params_gib'] * 1024:.2f} MiB |",
        f"| setup (meta build, generate + compress tensor by tensor) | {r['setup_s']:.0f} s, "
        f"peak {r['setup_peak_gib']:.2f} GiB |",
        f"| training step (batch 1, seq {r['seq']}, act. ckpt, fused {r['optimizer']}, "
        f"{'blocked' if r['blocked_head'] else 'plain'} head) | {r['step_s']:.0f} s (forward {r['forward_s']:.0f} s) |",
        "| step peak by phase (GiB) | "
        + ", ".join(
            f"{k} {'**' if k == r['peak_phase'] else ''}{v:.2f}{'**' if k == r['peak_phase'] else ''}"
            for k, v in r["phases_gib"].items()
        )
        + " |",
        f"| codec time in the step | decode {r['decode_s']:.0f} s ({r['decodes']} decodes), "
        f"encode {r['encode_s']:.0f} s ({r['encodes']} encodes) |",
        f"| **peak RSS of the whole process** | **{r['peak_gib']:.2f} GiB** (target < 16 GB = 14.9 GiB: "
        f"{'met' if r['peak_gib'] * GIB < 16e9 else 'not met'}) |",
        f"| loss | {r['loss']:.4f} |",
        "",
        f"Vanilla training cannot run here: its bf16 weights plus bf16 gradients alone need {vanilla_need:.1f} GiB "
        f"(computed, not run) on a {r['machine']['memory_gib']} GiB machine.",
        MD_END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse options, run, write JSON and markdown."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adalomo"])
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick check (default: the real 32)")
    ap.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    ap.add_argument("--plain-head", action="store_true", help="the plain lm_head (logits of the whole vocabulary)")
    ap.add_argument("--native-bf16-gemm", action="store_true", help="torch's bf16 GEMMs (fast on AVX-512 BF16 CPUs)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/llama3_8b_step.json"))
    ap.add_argument("--md", type=Path, default=Path("docs/BENCHMARKS.md"))
    args = ap.parse_args(argv)
    result = run(args)
    write_results(result, args.out, args.md, render(result), MD_BEGIN, MD_END)
    return result


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # glibc reads it at process start: re-exec once
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()
