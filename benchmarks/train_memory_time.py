"""Step time with and without the blocked head, interleaved in one process (robust to a noisy shared machine).

Run: ``python benchmarks/train_memory_time.py [--seq 64 512] [--rounds 5] [--native-bf16-gemm]``. Builds the same
Llama model four times (dense and compressed, each with the blocked head and with the plain head), then runs
``rounds`` rounds of one training step (fused SGD) per model, rotating the order each round, and reports the median
step time of each and the blocked / plain ratios (target <= 1.1). Writes ``benchmarks/out/train_memory_time.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import nz_lightning as nz  # noqa: E402
from benchmarks.common import machine_info, machine_line  # noqa: E402
from benchmarks.cpu_matmul import Bf16MatmulInFp32  # noqa: E402
from benchmarks.llama_model import (  # noqa: E402
    add_model_args,
    build_compressed_from_meta,
    build_dense,
    default_threads,
    llama_config,
)

CONFIGS = ("lomo-plain", "lomo-blocked", "neuzip-plain", "neuzip-blocked")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every configuration at every sequence length."""
    torch.set_num_threads(args.threads)
    config = llama_config(args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.vocab)
    gemm = contextlib.nullcontext() if args.native_bf16_gemm else Bf16MatmulInFp32()
    steps = {}
    for name in CONFIGS:
        model = build_compressed_from_meta(config) if name.startswith("neuzip") else build_dense(config)
        from nz_lightning.lm.checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model)
        opt = nz.fused_optimizer(model, "sgd", lr=1e-4, blocked_head=name.endswith("blocked"))
        steps[name] = (model, opt)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, dict[str, list[float]]] = {}
    for seq in args.seq:
        batch = torch.randint(0, args.vocab, (1, seq), generator=gen)
        times[str(seq)] = {name: [] for name in CONFIGS}
        with gemm:
            for model, opt in steps.values():  # warm-up
                opt.backward(model(input_ids=batch, labels=batch).loss)
            for r in range(args.rounds):
                order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
                for name in order:
                    model, opt = steps[name]
                    t0 = time.perf_counter()
                    opt.backward(model(input_ids=batch, labels=batch).loss)
                    times[str(seq)][name].append(time.perf_counter() - t0)
        print(json.dumps({seq: {k: round(statistics.median(v), 3) for k, v in times[str(seq)].items()}}), flush=True)
    return {"machine": machine_info(), "args": vars(args) | {"seq": args.seq}, "times": times}


def render(result: dict[str, Any]) -> str:
    """A markdown table of median step times and ratios."""
    a = result["args"]
    lines = [
        f"Step time, blocked vs plain head (median of {a['rounds']} interleaved steps; Llama hidden {a['hidden']}, "
        f"{a['layers']} layers, vocab {a['vocab']}, bf16, act. ckpt, fused SGD, "
        f"{'native bf16 GEMMs' if a['native_bf16_gemm'] else 'bf16 GEMMs in fp32'}).",
        machine_line(result["machine"]),
        "",
        "| tokens | LOMO plain s | LOMO blocked s | ratio | NeuZip plain s | NeuZip blocked s | ratio |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for seq, by in result["times"].items():
        med = {k: statistics.median(v) for k, v in by.items()}
        lines.append(
            f"| {seq} | {med['lomo-plain']:.2f} | {med['lomo-blocked']:.2f} | "
            f"{med['lomo-blocked'] / med['lomo-plain']:.2f} | {med['neuzip-plain']:.2f} | "
            f"{med['neuzip-blocked']:.2f} | {med['neuzip-blocked'] / med['neuzip-plain']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse options, run, write JSON (and markdown with ``--md``)."""
    ap = argparse.ArgumentParser(description=__doc__)
    add_model_args(ap)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--native-bf16-gemm", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/train_memory_time.json"))
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    text = render(result)
    if args.md is not None:
        args.md.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
