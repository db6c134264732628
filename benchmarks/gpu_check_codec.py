"""Codec stage of the GPU check: Triton encode / decode GB/s for bf16, fp16, fp32 next to the device's own copy.

Run: ``python -m benchmarks.gpu_check_codec --result PATH [--dry-run]`` (``benchmarks/gpu_check.py`` does).

Each point: a N(0, 0.02) tensor of 16 MiB, 64 MiB, 256 MiB or 1 GiB generated on the device, compressed with the
``triton`` backend, decoded and checked bit for bit; then the best of a few runs (CUDA events, one untimed warm-up)
of decode into a preallocated tensor, of encode, and of ``out.copy_(x)`` (device-to-device copy; GB/s count the
tensor's bytes once, as for the codec). A point that would not fit in free device memory (about 8x its bytes) is
skipped. Timing reuses ``benchmarks/codec_gpu.py``'s ``cuda_best_of``
(``codec_measure``'s wall-clock ``best_of`` on the CPU); zipnn, absent on GPU machines, is imported only where used.

``--dry-run``: the same loop on the CPU at 16 KiB with the Triton interpreter (``TRITON_INTERPRET=1``, set by the
driver), one timed run per point and no untimed warm-up, wall-clock timing.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.gpu_check_env import ensure_importable, progress, write_result  # noqa: E402

SIZES = (16 << 20, 64 << 20, 256 << 20, 1 << 30)
DRY_SIZES = (16 << 10,)
DRY_STEPS_PER_LANE = 32
"""The interpreter runs one loop iteration per rANS step: short lanes keep the dry run to seconds."""
MEMORY_FACTOR = 8
"""Free device memory needed per tensor byte: input, output, encoder scratch and the compressed copy."""


def best_of(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Best time in seconds of ``fn()``: CUDA events after one untimed run on the GPU, wall clock on the CPU."""
    from benchmarks.codec_gpu import cuda_best_of
    from benchmarks.codec_measure import best_of as cpu_best_of

    return cuda_best_of(fn, repeats) if cuda else cpu_best_of(fn, repeats)


def _size_label(nbytes: int) -> str:
    if nbytes >= 1 << 30:
        return f"{nbytes >> 30} GiB"
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def measure_point(x: Any, repeats: int, steps: int, cuda: bool) -> dict[str, Any]:
    """Encode / decode / copy throughput of one tensor with the Triton backend, and whether it round-trips.

    Args:
        x: The contiguous tensor (CUDA, or CPU under the Triton interpreter).
        repeats: Timed runs (best of).
        steps: ``steps_per_lane``.
        cuda: Time with CUDA events.

    Returns:
        One row: sizes, bits per weight, ``lossless``, ``encode_gbps``, ``decode_gbps``, ``copy_gbps`` and
        ``decode_vs_copy``.
    """
    import torch

    from benchmarks.codec_measure import gbps
    from nz_lightning.kernels import compress, spec_for

    nbytes = x.numel() * x.element_size()
    c = compress(x, backend="triton", steps_per_lane=steps)
    out = torch.empty_like(x)
    c.decompress(out=out, backend="triton")
    ints = spec_for(x.dtype).int_dtype
    lossless = bool(torch.equal(out.view(ints), x.view(ints)))
    t_dec = best_of(lambda: c.decompress(out=out, backend="triton"), repeats, cuda)
    t_enc = best_of(lambda: compress(x, backend="triton", steps_per_lane=steps), repeats, cuda)
    t_copy = best_of(lambda: out.copy_(x), repeats, cuda)
    row = {
        "dtype": str(x.dtype).removeprefix("torch."),
        "bytes": nbytes,
        "numel": x.numel(),
        "mode": c.mode,
        "bpw": c.bits_per_weight,
        "ratio": c.bits_per_weight / (8 * x.element_size()),
        "lossless": lossless,
        "encode_gbps": gbps(nbytes, t_enc),
        "decode_gbps": gbps(nbytes, t_dec),
        "copy_gbps": gbps(nbytes, t_copy),
    }
    row["decode_vs_copy"] = row["decode_gbps"] / row["copy_gbps"]
    return row


def measure_training_decodes(device: Any, dry_run: bool) -> list[dict[str, Any]]:
    """Decode throughput as training sees it: a bf16 weight held as a ``WeightStore`` (4 MiB row blocks by
    default, each block one ``decode_block``, the unchecked hot path) against the same weight as one block, and
    against shorter lanes (more parallel lanes per block). Per row: GB/s of the whole weight (device time, best of
    a few) and the host time to issue one block decode (wall clock of the issuing loop, no sync inside, over blocks).

    On a GPU a 4 MiB bf16 block has about 1K rANS lanes at 2048 steps per lane (one thread each), far fewer than the
    device's threads, and every block decode costs Python and launch time on the host (docs/DESIGN.md).
    """
    import time

    import torch

    from benchmarks.codec_measure import gbps
    from nz_lightning.tensor import workspace
    from nz_lightning.tensor.store import WeightStore

    cuda = device.type == "cuda"
    numel = (64 << 20) // 2 if not dry_run else 8 << 10
    block = workspace.ROW_BLOCK_BYTES if not dry_run else 4 << 10
    rows = numel // 1024
    x = (torch.randn(rows, 1024, device=device) * 0.02).to(torch.bfloat16)
    out = torch.empty_like(x)
    short = 256 if not dry_run else 8
    cases = [(f"{_size_label(block)} blocks, default lanes", block, None), ("one block, default lanes", None, None)]
    cases.append((f"{_size_label(block)} blocks, {short} steps/lane", block, short))
    result = []
    for label, block_bytes, steps in cases:
        store = WeightStore(x, "triton", row_block_bytes=block_bytes or 2 * x.numel() * 2)
        if steps is not None:  # the same row blocks, re-encoded with shorter lanes
            from nz_lightning.kernels import compress

            store.set_blocks([compress(ct.decompress(), backend="triton", steps_per_lane=steps) for ct in store.blocks])
        store.decode_into(out)  # warm-up (first decodes are checked)
        lossless = bool(torch.equal(out.view(torch.int16), x.view(torch.int16)))
        seconds = best_of(lambda store=store: store.decode_into(out), 1 if dry_run else 5, cuda)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        store.decode_into(out)
        issue = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize()
        blocks = len(store.blocks)
        result.append(
            {
                "case": label,
                "bytes": x.numel() * 2,
                "blocks": blocks,
                "lanes_per_block": store.blocks[0].streams.states.numel() if store.blocks[0].streams is not None else 0,
                "bpw": 8 * store.serialized_nbytes / x.numel(),
                "lossless": lossless,
                "decode_gbps": gbps(x.numel() * 2, seconds),
                "issue_us_per_block": 1e6 * issue / blocks,
            }
        )
    return result


def run(result_path: Path, dry_run: bool) -> dict[str, Any]:
    """Measure every dtype and size; the result file is rewritten after each point (a timeout keeps the rows)."""
    ensure_importable()
    import torch

    cuda = not dry_run
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (see the env stage)")
    device = torch.device("cuda" if cuda else "cpu")
    from nz_lightning.kernels.layout import DEFAULT_STEPS_PER_LANE

    sizes = DRY_SIZES if dry_run else SIZES
    steps = DRY_STEPS_PER_LANE if dry_run else DEFAULT_STEPS_PER_LANE
    result: dict[str, Any] = {"ok": False, "device": str(device), "rows": [], "skipped": [], "failures": []}
    if cuda:
        result["device_name"] = torch.cuda.get_device_name(device)
    gen = torch.Generator(device=device).manual_seed(7)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for size in sizes:
            label = f"{str(dtype).removeprefix('torch.')} {_size_label(size)}"
            free = torch.cuda.mem_get_info(device)[0] if cuda else math.inf
            if MEMORY_FACTOR * size > free:
                result["skipped"].append({"point": label, "why": f"needs {MEMORY_FACTOR}x its bytes free"})
                continue
            try:
                numel = size // dtype.itemsize
                x = (torch.randn(numel, generator=gen, device=device) * 0.02).to(dtype)
                repeats = 1 if dry_run else (3 if size >= 1 << 30 else 5)
                row = measure_point(x, repeats, steps, cuda)
                result["rows"].append(row)
                progress(
                    "codec",
                    f"{label}: encode {row['encode_gbps']:.1f} GB/s, decode {row['decode_gbps']:.1f} GB/s, copy "
                    f"{row['copy_gbps']:.1f} GB/s, {row['bpw']:.2f} bit/weight, lossless {row['lossless']}",
                )
                del x
            except Exception as err:  # noqa: BLE001 - recorded, the next point runs
                result["failures"].append({"point": label, "error": f"{type(err).__name__}: {err}"})
                progress("codec", f"{label}: FAILED {type(err).__name__}: {err}")
            if cuda:
                torch.cuda.empty_cache()
            write_result(result_path, result)
    try:
        result["training"] = measure_training_decodes(device, dry_run)
        for row in result["training"]:
            progress(
                "codec",
                f"training decode, {row['case']}: {row['decode_gbps']:.1f} GB/s over {row['blocks']} blocks of "
                f"{row['lanes_per_block']} lanes, {row['issue_us_per_block']:.0f} us host time per block decode, "
                f"{row['bpw']:.2f} bit/weight, lossless {row['lossless']}",
            )
    except Exception as err:  # noqa: BLE001 - recorded like a point
        result["failures"].append({"point": "training decodes", "error": f"{type(err).__name__}: {err}"})
        progress("codec", f"training decodes: FAILED {type(err).__name__}: {err}")
    write_result(result_path, result)
    lossless = all(r["lossless"] for r in result["rows"] + result.get("training", []))
    result["ok"] = bool(result["rows"]) and not result["failures"] and lossless
    write_result(result_path, result)
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse ``--result PATH [--dry-run]``, run, return 0 when every point round-tripped."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    return 0 if run(args.result, args.dry_run)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
