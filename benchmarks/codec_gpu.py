"""CUDA part of the codec benchmark: Triton decode/encode throughput over tensor sizes and ``steps_per_lane``.

Only called when a CUDA device is present; timings use CUDA events.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.codec_measure import LANE_OVERHEAD_BITS, gbps, lanes_of, same_bits
from nz_lightning import compress


def cuda_best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best device time in seconds of ``fn()`` measured with CUDA events (one untimed warm-up run first).

    Args:
        fn: What to time (it launches work on the current CUDA stream).
        repeats: Number of timed runs.

    Returns:
        The smallest event-to-event time, in seconds.
    """
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def gpu_sweep(repeats: int, default_steps: int, steps_list: list[int], device: torch.device) -> dict[str, Any]:
    """Triton decode throughput of bf16 tensors of 1e5..1e9 bytes vs device copy, and a steps_per_lane sweep.

    Sizes that would not fit in free device memory (about 6x the tensor's bytes, encoder scratch included)
    are skipped. The steps sweep runs at 1e8 bytes (the largest measured size if 1e8 does not fit).

    Args:
        repeats: Best-of-N timing repeats.
        default_steps: ``steps_per_lane`` of the size sweep.
        steps_list: ``steps_per_lane`` values of the steps sweep.
        device: The CUDA device.

    Returns:
        ``device`` (its name), ``steps_per_lane``, ``sizes`` (one row per measured size), ``skipped_bytes``,
        ``steps_sweep_bytes`` (``None`` when no size was measured) and ``steps_sweep`` (one row per value).
    """
    free, _total = torch.cuda.mem_get_info(device)
    gen = torch.Generator(device=device).manual_seed(3)
    sizes: list[dict[str, Any]] = []
    skipped: list[int] = []
    sweep_size = None
    for exp10 in range(5, 10):
        size = 10**exp10
        if 6 * size > free:
            skipped.append(size)
            continue
        n = size // 2
        x = (torch.randn(n, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        sizes.append(_gpu_point(x, repeats, default_steps, with_copy=True))
        if size <= 10**8:
            sweep_size = size
        del x
        torch.cuda.empty_cache()
    steps_rows: list[dict[str, Any]] = []
    if sweep_size is not None:
        x = (torch.randn(sweep_size // 2, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        steps_rows = [_gpu_point(x, repeats, k, with_copy=False) for k in steps_list]
        del x
        torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(device),
        "steps_per_lane": default_steps,
        "sizes": sizes,
        "skipped_bytes": skipped,
        "steps_sweep_bytes": sweep_size,
        "steps_sweep": steps_rows,
    }


def _gpu_point(x: torch.Tensor, repeats: int, steps: int, *, with_copy: bool) -> dict[str, Any]:
    """Encode/decode (and optionally copy) throughput of one device tensor with the Triton backend."""
    n = x.numel()
    nbytes = n * x.element_size()
    c = compress(x, backend="triton", steps_per_lane=steps)
    out = torch.empty_like(x)
    c.decompress(out=out, backend="triton")
    ok = same_bits(out, x)
    t_dec = cuda_best_of(lambda: c.decompress(out=out, backend="triton"), repeats)
    t_enc = cuda_best_of(lambda: compress(x, backend="triton", steps_per_lane=steps), repeats)
    row: dict[str, Any] = {
        "bytes": nbytes,
        "numel": n,
        "steps_per_lane": steps,
        "lanes": lanes_of(c),
        "lane_overhead_bpw": LANE_OVERHEAD_BITS * lanes_of(c) / n,
        "bpw": c.bits_per_weight,
        "lossless": ok,
        "decode_gbps": gbps(nbytes, t_dec),
        "encode_gbps": gbps(nbytes, t_enc),
    }
    if with_copy:
        t_copy = cuda_best_of(lambda: out.copy_(x), repeats)
        row["copy_gbps"] = gbps(nbytes, t_copy)
        row["decode_vs_copy"] = row["decode_gbps"] / row["copy_gbps"]
    return row
