"""Measurements of the codec benchmark on the CPU: sizes against the entropy bound and zipnn, single-thread speeds.

Also the per-group aggregation of measured tensors and the verdict on the project's size and speed targets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.codec_inputs import DTYPE_NAME, normal_tensor
from nz_lightning import CompressedTensor, compress
from nz_lightning.kernels import MODE_CONST, MODE_RANS, FloatSpec, entropy_bits, spec_for

LANE_OVERHEAD_BITS = 48
"""Per-lane bytes outside the payload: a 4-byte final state and a 2-byte word count."""
GAP_TARGET_BITS = 0.05
GAP_TARGET_MIN_NUMEL = 1_000_000
ENCODE_TARGET_GBPS = 0.5
HIST_CHUNK = 1 << 24
ZIPNN_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def exponent_counts(x: torch.Tensor, spec: FloatSpec) -> list[int]:
    """Histogram of the exponent field, computed independently of the codec (plain torch, chunked).

    Args:
        x: The float tensor.
        spec: Bit layout of ``x``'s dtype.

    Returns:
        ``spec.alphabet`` counts, one per exponent value.
    """
    bits = x.detach().contiguous().reshape(-1).view(spec.int_dtype)
    counts = torch.zeros(spec.alphabet, dtype=torch.int64)
    for start in range(0, bits.numel(), HIST_CHUNK):
        chunk = bits[start : start + HIST_CHUNK].to(torch.int64)
        exp = (chunk >> spec.man_bits) & (spec.alphabet - 1)
        counts += torch.bincount(exp, minlength=spec.alphabet)
    return [int(c) for c in counts.tolist()]


def best_of(fn: Callable[[], object], repeats: int, prepare: Callable[[], object] | None = None) -> float:
    """Best wall time in seconds of ``fn()`` over ``repeats`` runs; ``prepare()`` runs untimed before each.

    Args:
        fn: What to time.
        repeats: Number of timed runs.
        prepare: Optional untimed set-up run before each timed run.

    Returns:
        The smallest ``time.perf_counter`` difference, in seconds.
    """
    best = math.inf
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (1e9 bytes) of ``nbytes`` in ``seconds`` (infinite for a zero time)."""
    return nbytes / seconds / 1e9 if seconds > 0 else math.inf


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality of two tensors of the same dtype and size."""
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def lanes_of(c: CompressedTensor) -> int:
    """Number of rANS lanes stored (0 for a raw-mode tensor)."""
    return 0 if c.streams is None else int(c.streams.states.numel())


def zipnn_codec(dtype: torch.dtype) -> Any:
    """A single-threaded zipnn codec for torch tensors of ``dtype`` (zipnn is imported here: GPU machines lack it)."""
    import zipnn

    return zipnn.ZipNN(input_format="torch", bytearray_dtype=ZIPNN_DTYPE[dtype], threads=1)


def warm_up(dtype: torch.dtype, steps_per_lane: int, backend: str) -> None:
    """Compile our kernels for ``dtype`` (numba JITs on first call) and touch zipnn, all untimed.

    Args:
        dtype: Floating-point dtype to compile for.
        steps_per_lane: rANS steps per lane passed to ``compress``.
        backend: Our CPU backend (``cpu`` or ``torch``).
    """
    x = normal_tensor((3 * 32 * 64 + 5,), 0.02, dtype, torch.Generator().manual_seed(1))
    c = compress(x, backend=backend, steps_per_lane=steps_per_lane)
    c.decompress(out=torch.empty_like(x), backend=backend)
    z = zipnn_codec(dtype)
    z.decompress(z.compress(x.clone()))


def measure_tensor(
    name: str, source: str, x: torch.Tensor, repeats: int, steps_per_lane: int, backend: str
) -> dict[str, Any]:
    """Size and single-thread speed of our codec, zipnn and memcpy on one tensor.

    Args:
        name: Tensor name reported in the row.
        source: Where the tensor came from (``synthetic`` or a file name).
        x: The float tensor (bf16, fp16 or fp32).
        repeats: Best-of-N timing repeats.
        steps_per_lane: rANS steps per lane passed to ``compress``.
        backend: Our CPU backend (``cpu`` or ``torch``).

    Returns:
        One JSON-ready row: entropy, bound, sizes, lane overhead, losslessness, times (``time_s``) and
        throughputs (``gbps``) of our encode/decode, zipnn's encode/decode and memcpy.
    """
    spec = spec_for(x.dtype)
    x = x.detach().contiguous()
    n = x.numel()
    nbytes = n * spec.itemsize
    counts = exponent_counts(x, spec)
    h = entropy_bits(counts) + 0.0  # + 0.0 turns the -0.0 of a one-symbol histogram into 0.0
    bound = spec.sm_bits + h

    # Ours: size, correctness, then timing (the first decode also builds and caches the decoder table).
    c = compress(x, backend=backend, steps_per_lane=steps_per_lane)
    out = torch.empty_like(x)
    c.decompress(out=out, backend=backend)
    ours_ok = same_bits(out, x)
    serialized = len(c.to_bytes())
    t_enc = best_of(lambda: compress(x, backend=backend, steps_per_lane=steps_per_lane), repeats)
    t_dec = best_of(lambda: c.decompress(out=out, backend=backend), repeats)
    lanes = lanes_of(c)

    # zipnn: it mutates its input, so every compress gets a fresh copy (made untimed).
    z = zipnn_codec(x.dtype)
    scratch = torch.empty_like(x)
    zc = z.compress(x.clone())
    zd = z.decompress(zc)
    zipnn_ok = isinstance(zd, torch.Tensor) and same_bits(zd, x)
    del zd
    t_zenc = best_of(lambda: z.compress(scratch), repeats, prepare=lambda: scratch.copy_(x))
    t_zdec = best_of(lambda: z.decompress(zc), repeats)

    # memcpy baseline into the preallocated (already touched) buffer.
    t_copy = best_of(lambda: out.copy_(x), repeats)

    ours_bits = 8 * serialized / n
    zipnn_bits = 8 * len(zc) / n
    return {
        "name": name,
        "source": source,
        "dtype": DTYPE_NAME[x.dtype],
        "shape": list(x.shape),
        "numel": n,
        "bytes": nbytes,
        "exp_entropy": h,
        "sm_bits": spec.sm_bits,
        "bound_bpw": bound,
        "ours_bpw": ours_bits,
        "ours_bytes": serialized,
        "ours_bpw_api": c.bits_per_weight,
        "gap_bpw": ours_bits - bound,
        "ours_mode": {MODE_RANS: "rans", MODE_CONST: "const"}.get(c.mode, "raw"),
        "lanes": lanes,
        "lane_overhead_bpw": LANE_OVERHEAD_BITS * lanes / n,
        "zipnn_bpw": zipnn_bits,
        "zipnn_bytes": len(zc),
        "ours_ratio": spec.total_bits / ours_bits,
        "zipnn_ratio": spec.total_bits / zipnn_bits,
        "ours_lossless": ours_ok,
        "zipnn_lossless": zipnn_ok,
        "time_s": {
            "ours_encode": t_enc,
            "ours_decode": t_dec,
            "zipnn_encode": t_zenc,
            "zipnn_decode": t_zdec,
            "memcpy": t_copy,
        },
        "gbps": {
            "ours_encode": gbps(nbytes, t_enc),
            "ours_decode": gbps(nbytes, t_dec),
            "zipnn_encode": gbps(nbytes, t_zenc),
            "zipnn_decode": gbps(nbytes, t_zdec),
            "memcpy": gbps(nbytes, t_copy),
        },
    }


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Element-weighted sizes and summed-time throughputs of a group of measured tensors.

    Args:
        rows: Non-empty list of :func:`measure_tensor` rows.

    Returns:
        Totals of the group: sizes in bits/weight, ratios, throughputs and our speed relative to zipnn's.
    """
    n = sum(r["numel"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)

    def weighted(key: str) -> float:
        return sum(r[key] * r["numel"] for r in rows) / n

    speeds = {k: gbps(nbytes, sum(r["time_s"][k] for r in rows)) for k in rows[0]["time_s"]}
    bound, ours, zip_bits = weighted("bound_bpw"), weighted("ours_bpw"), weighted("zipnn_bpw")
    return {
        "tensors": len(rows),
        "numel": n,
        "bytes": nbytes,
        "bound_bpw": bound,
        "ours_bpw": ours,
        "gap_bpw": ours - bound,
        "lane_overhead_bpw": weighted("lane_overhead_bpw"),
        "zipnn_bpw": zip_bits,
        "ours_ratio": 8 * nbytes / (ours * n),
        "zipnn_ratio": 8 * nbytes / (zip_bits * n),
        "gbps": speeds,
        "decode_vs_zipnn": speeds["ours_decode"] / speeds["zipnn_decode"],
        "encode_vs_zipnn": speeds["ours_encode"] / speeds["zipnn_encode"],
    }


def reference_decode(numel: int, repeats: int, steps_per_lane: int) -> dict[str, Any]:
    """Decode speed of the pure-torch reference backend on one bf16 tensor (context for the numba path).

    Args:
        numel: Elements of the bf16 N(0, 0.02) tensor.
        repeats: Best-of-N timing repeats.
        steps_per_lane: rANS steps per lane passed to ``compress``.

    Returns:
        ``dtype``, ``numel``, ``decode_s``, ``decode_gbps`` and ``lossless``.
    """
    x = normal_tensor((numel,), 0.02, torch.bfloat16, torch.Generator().manual_seed(2))
    c = compress(x, backend="cpu", steps_per_lane=steps_per_lane)
    out = torch.empty_like(x)
    c.decompress(out=out, backend="torch")
    ok = same_bits(out, x)
    t = best_of(lambda: c.decompress(out=out, backend="torch"), repeats)
    return {"dtype": "bf16", "numel": numel, "decode_s": t, "decode_gbps": gbps(x.nbytes, t), "lossless": ok}


def evaluate_targets(rows: list[dict[str, Any]], total: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Whether each project target was met in this run, with the numbers behind the verdict.

    Args:
        rows: The :func:`measure_tensor` rows.
        total: Their :func:`aggregate`.

    Returns:
        For each target key, ``met`` (``None`` when it does not apply), ``detail`` and, for the per-tensor size
        targets, ``missed_by`` (names of the tensors that miss it).
    """
    n = len(rows)
    ratio_ok = [r for r in rows if r["ours_bpw"] <= r["zipnn_bpw"]]
    big = [r for r in rows if r["numel"] >= GAP_TARGET_MIN_NUMEL]
    gap_ok = [r for r in big if r["gap_bpw"] <= GAP_TARGET_BITS]
    dec_ok = [r for r in rows if r["gbps"]["ours_decode"] >= r["gbps"]["zipnn_decode"]]
    worst_gap = max((r["gap_bpw"] for r in big), default=None)
    g = total["gbps"]
    ratio_miss = [r["name"] for r in rows if r["ours_bpw"] > r["zipnn_bpw"]]
    gap_miss = [r["name"] for r in big if r["gap_bpw"] > GAP_TARGET_BITS]
    total_ratio_met = total["ours_bpw"] <= total["zipnn_bpw"]
    return {
        "ratio_ge_zipnn": {
            "met": len(ratio_ok) == n,
            "total_met": total_ratio_met,
            "missed_by": ratio_miss,
            "detail": (
                f"{len(ratio_ok)}/{n} tensors"
                + (f"; smaller with zipnn: {', '.join(ratio_miss)}" if ratio_miss else "")
                + f"; total {total['ours_bpw']:.3f} vs zipnn {total['zipnn_bpw']:.3f} bits/weight "
                + ("(met in total)" if total_ratio_met else "(not met in total either)")
            ),
        },
        "gap_le_0.05_for_ge_1M": {
            "met": None if not big else len(gap_ok) == len(big),
            "missed_by": gap_miss,
            "detail": (
                "no tensor has >= 1M elements"
                if not big
                else f"{len(gap_ok)}/{len(big)} tensors >= 1M elements; worst gap {worst_gap:.4f} bits/weight"
                + (f"; over: {', '.join(gap_miss)}" if gap_miss else "")
            ),
        },
        "decode_ge_zipnn": {
            "met": g["ours_decode"] >= g["zipnn_decode"],
            "detail": (
                f"total {g['ours_decode']:.3f} vs zipnn {g['zipnn_decode']:.3f} GB/s "
                f"({total['decode_vs_zipnn']:.2f}x); {len(dec_ok)}/{n} tensors"
            ),
        },
        "encode_ge_0.5_GBps": {
            "met": g["ours_encode"] >= ENCODE_TARGET_GBPS,
            "detail": f"total {g['ours_encode']:.3f} GB/s",
        },
    }
