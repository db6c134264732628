"""Codec benchmark: size against the entropy bound and zipnn, single-thread CPU speed, optional GPU decode sweep.

Run from the repository root::

    .venv/bin/python benchmarks/codec.py                      # full run (~110M bf16 + 4M fp16 + 4M fp32 elements)
    .venv/bin/python benchmarks/codec.py --quick              # small run (< 5M elements)
    .venv/bin/python benchmarks/codec.py --file model.safetensors --out out.json --md docs/BENCHMARKS.md

Inputs are random-init Llama-style weights generated in-process (bf16), one fp16 and one fp32 tensor, plus every
tensor of each ``--file`` given. For each tensor it measures the exponent entropy ``H`` (empirical histogram of
the exponent field), the entropy bound ``sm_bits + H`` bits/weight, our serialized bits/weight (header included)
and its gap to the bound, zipnn's bits/weight on the same tensor, and the rANS lane overhead (48 bits per lane).
Speeds are best-of-N wall times on one thread (torch, numba and zipnn all limited to one), side by side in the
same run: our encode (``compress``) and decode (``decompress`` into a preallocated buffer), zipnn compress and
decompress, and a memcpy baseline (``out.copy_(x)`` into a preallocated buffer). GB = bytes of the original
float tensor / 1e9. With CUDA, a Triton decode sweep over bf16 sizes and ``steps_per_lane`` values is added.

Results go to a JSON file and to a markdown block between ``<!-- codec:begin -->`` and ``<!-- codec:end -->``.

The work is split across ``benchmarks/codec_inputs.py`` (configurations and tensor sources),
``benchmarks/codec_measure.py`` (CPU measurements, aggregation, targets), ``benchmarks/codec_gpu.py`` (CUDA sweep)
and ``benchmarks/codec_report.py`` (markdown block); this module parses the options and drives the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.codec_gpu import cuda_best_of, gpu_sweep  # noqa: E402
from benchmarks.codec_inputs import (  # noqa: E402
    DTYPE_NAME,
    FULL,
    QUICK,
    TINY,
    Config,
    TensorSource,
    file_tensors,
    synthetic_tensors,
)
from benchmarks.codec_measure import (  # noqa: E402
    ENCODE_TARGET_GBPS,
    GAP_TARGET_BITS,
    GAP_TARGET_MIN_NUMEL,
    HIST_CHUNK,
    LANE_OVERHEAD_BITS,
    ZIPNN_DTYPE,
    aggregate,
    best_of,
    evaluate_targets,
    exponent_counts,
    gbps,
    lanes_of,
    measure_tensor,
    reference_decode,
    same_bits,
    warm_up,
    zipnn_codec,
)
from benchmarks.codec_report import MD_BEGIN, MD_END, render_markdown, write_markdown  # noqa: E402
from benchmarks.common import machine_info  # noqa: E402

__all__ = [
    "DTYPE_NAME",
    "ENCODE_TARGET_GBPS",
    "FULL",
    "GAP_TARGET_BITS",
    "GAP_TARGET_MIN_NUMEL",
    "HIST_CHUNK",
    "LANE_OVERHEAD_BITS",
    "MD_BEGIN",
    "MD_END",
    "QUICK",
    "TINY",
    "ZIPNN_DTYPE",
    "Config",
    "TensorSource",
    "aggregate",
    "best_of",
    "cuda_best_of",
    "evaluate_targets",
    "exponent_counts",
    "file_tensors",
    "gbps",
    "gpu_sweep",
    "lanes_of",
    "main",
    "measure_tensor",
    "parse_args",
    "reference_decode",
    "render_markdown",
    "same_bits",
    "synthetic_tensors",
    "warm_up",
    "write_markdown",
    "zipnn_codec",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The parsed options.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--file", type=Path, action="append", default=[], help="safetensors file to add (repeatable)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small synthetic set (< 5M elements)")
    size.add_argument("--tiny", action="store_true", help="two 64k-element tensors, one repeat (smoke test)")
    p.add_argument("--no-synthetic", action="store_true", help="only the --file tensors")
    p.add_argument(
        "--repeats", type=int, default=None, help="best-of-N repeats (default 5; 3 with --quick; 1 with --tiny)"
    )
    p.add_argument("--steps-per-lane", type=int, default=2048)
    p.add_argument("--backend", default="cpu", choices=["cpu", "torch"], help="CPU backend timed as 'ours'")
    p.add_argument("--reference-numel", type=int, default=None, help="elements for the pure-torch decode timing")
    p.add_argument("--gpu-steps", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--no-gpu", action="store_true", help="skip the CUDA sweep even when a GPU is present")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/codec.json"))
    p.add_argument("--md", type=Path, default=Path("docs/BENCHMARKS.md"))
    return p.parse_args(argv)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON and markdown outputs, and return the result dictionary.

    Args:
        argv: Command-line arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The result dictionary (also written as JSON to ``--out``): ``machine``, ``config``, ``tensors``,
        ``skipped``, ``totals``, ``reference_torch_decode``, ``targets`` and ``gpu`` (``None`` without CUDA).
    """
    args = parse_args(argv)
    cfg = TINY if args.tiny else QUICK if args.quick else FULL
    repeats = args.repeats if args.repeats is not None else cfg.repeats
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    ref_numel = args.reference_numel or (4096 if cfg.tiny else 1 << 20)
    saved_threads = (torch.get_num_threads(), numba.get_num_threads())
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        machine = machine_info()
        _log(f"codec benchmark ({cfg.name}), {machine['cpu_model']}, load avg {machine['load_avg_start']}")
        warmed: set[torch.dtype] = set()
        sources: list[TensorSource] = [] if args.no_synthetic else [synthetic_tensors(cfg)]
        sources += [file_tensors(f) for f in args.file]
        rows: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        for source in sources:
            for name, origin, make in source:
                x = make()
                reason = None
                if not x.is_floating_point() or x.dtype not in ZIPNN_DTYPE:
                    reason = f"dtype {x.dtype} not supported"
                elif x.numel() == 0:
                    reason = "empty"
                if reason:
                    skipped.append({"name": name, "source": origin, "reason": reason})
                    continue
                if x.dtype not in warmed:
                    warm_up(x.dtype, args.steps_per_lane, args.backend)
                    warmed.add(x.dtype)
                row = measure_tensor(name, origin, x, repeats, args.steps_per_lane, args.backend)
                rows.append(row)
                g = row["gbps"]
                _log(
                    f"  {name:<45} {row['dtype']} n={row['numel']:>11,} bound={row['bound_bpw']:.3f} "
                    f"ours={row['ours_bpw']:.3f} zipnn={row['zipnn_bpw']:.3f} enc={g['ours_encode']:.3f} "
                    f"dec={g['ours_decode']:.3f} zenc={g['zipnn_encode']:.3f} zdec={g['zipnn_decode']:.3f} GB/s"
                )
                del x
        if not rows:
            raise SystemExit("no tensor to benchmark")
        totals = {"all": aggregate(rows)}
        for name in DTYPE_NAME.values():
            group = [r for r in rows if r["dtype"] == name]
            if group and len(group) < len(rows):
                totals[name] = aggregate(group)
        ref = reference_decode(ref_numel, repeats, args.steps_per_lane)
        gpu = None
        if torch.cuda.is_available() and not args.no_gpu:
            _log("  GPU sweep ...")
            gpu = gpu_sweep(repeats, args.steps_per_lane, args.gpu_steps, torch.device("cuda"))
        machine["load_avg_end"] = list(os.getloadavg())
        result: dict[str, Any] = {
            "machine": machine,
            "config": {
                "name": cfg.name,
                "repeats": repeats,
                "steps_per_lane": args.steps_per_lane,
                "backend": args.backend,
                "threads": 1,
                "files": [str(f) for f in args.file],
                "synthetic": not args.no_synthetic,
            },
            "tensors": rows,
            "skipped": skipped,
            "totals": totals,
            "reference_torch_decode": ref,
            "targets": evaluate_targets(rows, totals["all"]),
            "gpu": gpu,
        }
    finally:
        torch.set_num_threads(saved_threads[0])
        numba.set_num_threads(saved_threads[1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    block = render_markdown(result)
    write_markdown(args.md, block)
    _log(f"wrote {args.out} and {args.md}")
    print(block)
    return result


if __name__ == "__main__":
    main()
