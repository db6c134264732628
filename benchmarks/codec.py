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
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import torch
import zipnn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import machine_info, write_markdown_block  # noqa: E402
from kernels import MODE_CONST, MODE_RANS, FloatSpec, entropy_bits, spec_for  # noqa: E402
from nz_lightning import CompressedTensor, compress  # noqa: E402

MD_BEGIN = "<!-- codec:begin -->"
MD_END = "<!-- codec:end -->"
LANE_OVERHEAD_BITS = 48
"""Per-lane bytes outside the payload: a 4-byte final state and a 2-byte word count."""
GAP_TARGET_BITS = 0.05
GAP_TARGET_MIN_NUMEL = 1_000_000
ENCODE_TARGET_GBPS = 0.5
HIST_CHUNK = 1 << 24
ZIPNN_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

TensorSource = Iterator[tuple[str, str, Callable[[], torch.Tensor]]]
"""Lazily produced inputs: ``(name, source, make_tensor)``; tensors are built one at a time to bound memory."""


@dataclass(frozen=True)
class Config:
    """Shapes of the in-process synthetic inputs and the number of timing repeats.

    Attributes:
        name: ``full``, ``quick`` or ``tiny``.
        hidden: Model width (Llama ``hidden_size``).
        intermediate: MLP width (``intermediate_size``).
        vocab: Vocabulary size (rows of ``embed_tokens``).
        kv_dim: Width of the k/v projections (``num_key_value_heads * head_dim``).
        extra_numel: Elements of the extra fp16 and fp32 tensors.
        repeats: Best-of-N timing repeats.
        tiny: Use the smoke configuration (two bf16 tensors, so only one dtype is JIT-compiled).
    """

    name: str
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int
    extra_numel: int
    repeats: int
    tiny: bool = False


FULL = Config("full", 2048, 5632, 32000, 256, 4 * 1024 * 1024, 5)
QUICK = Config("quick", 512, 1408, 2048, 64, 512 * 1024, 3)
TINY = Config("tiny", 256, 256, 256, 256, 64 * 1024, 1, tiny=True)


# ----------------------------------------------------------------------------------------------------- inputs


def _normal(shape: tuple[int, ...], std: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal(0, std) drawn in float32 and cast to ``dtype`` (how random init usually reaches bf16/fp16)."""
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def synthetic_tensors(cfg: Config, seed: int = 0) -> TensorSource:
    """Random-init Llama-style weights (one decoder layer, embeddings, norms) plus one fp16 and one fp32 tensor.

    Linear and embedding weights are N(0, 0.02), norm weights are ones (as in Hugging Face's Llama init).
    """
    gen = torch.Generator().manual_seed(seed)
    h, m, v, kv = cfg.hidden, cfg.intermediate, cfg.vocab, cfg.kv_dim
    bf = torch.bfloat16
    if cfg.tiny:
        shapes_bf16: list[tuple[str, tuple[int, ...], float | None]] = [
            ("layers.0.self_attn.q_proj.weight", (h, h), 0.02),
            ("layers.0.self_attn.o_proj.weight", (h, h), 0.02),
        ]
    else:
        shapes_bf16 = [
            ("embed_tokens.weight", (v, h), 0.02),
            ("layers.0.self_attn.q_proj.weight", (h, h), 0.02),
            ("layers.0.self_attn.k_proj.weight", (kv, h), 0.02),
            ("layers.0.self_attn.v_proj.weight", (kv, h), 0.02),
            ("layers.0.self_attn.o_proj.weight", (h, h), 0.02),
            ("layers.0.mlp.gate_proj.weight", (m, h), 0.02),
            ("layers.0.mlp.up_proj.weight", (m, h), 0.02),
            ("layers.0.mlp.down_proj.weight", (h, m), 0.02),
            ("layers.0.input_layernorm.weight", (h,), None),
            ("layers.0.post_attention_layernorm.weight", (h,), None),
            ("norm.weight", (h,), None),
        ]
    for name, shape, std in shapes_bf16:
        if std is None:
            yield name, "synthetic", functools.partial(torch.ones, shape, dtype=bf)
        else:
            yield name, "synthetic", functools.partial(_normal, shape, std, bf, gen)
    extra_dtypes = [] if cfg.tiny else [torch.float16, torch.float32]
    for dtype in extra_dtypes:
        name = f"extra.{DTYPE_NAME[dtype]}.weight"
        yield name, "synthetic", functools.partial(_normal, (cfg.extra_numel,), 0.02, dtype, gen)


def file_tensors(path: Path) -> TensorSource:
    """Every tensor of a safetensors file, loaded one at a time."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    for key in keys:

        def load(key: str = key) -> torch.Tensor:
            with safe_open(str(path), framework="pt") as g:
                t: torch.Tensor = g.get_tensor(key)
            return t

        yield key, path.name, load


# ----------------------------------------------------------------------------------------------------- measuring


def exponent_counts(x: torch.Tensor, spec: FloatSpec) -> list[int]:
    """Histogram of the exponent field, computed independently of the codec (plain torch, chunked)."""
    bits = x.detach().contiguous().reshape(-1).view(spec.int_dtype)
    counts = torch.zeros(spec.alphabet, dtype=torch.int64)
    for start in range(0, bits.numel(), HIST_CHUNK):
        chunk = bits[start : start + HIST_CHUNK].to(torch.int64)
        exp = (chunk >> spec.man_bits) & (spec.alphabet - 1)
        counts += torch.bincount(exp, minlength=spec.alphabet)
    return [int(c) for c in counts.tolist()]


def best_of(fn: Callable[[], object], repeats: int, prepare: Callable[[], object] | None = None) -> float:
    """Best wall time in seconds of ``fn()`` over ``repeats`` runs; ``prepare()`` runs untimed before each."""
    best = math.inf
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cuda_best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best device time in seconds of ``fn()`` measured with CUDA events (one untimed warm-up run first)."""
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


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (1e9 bytes) of ``nbytes`` in ``seconds``."""
    return nbytes / seconds / 1e9 if seconds > 0 else math.inf


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality of two tensors of the same dtype and size."""
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def lanes_of(c: CompressedTensor) -> int:
    """Number of rANS lanes stored (0 for a raw-mode tensor)."""
    return 0 if c.streams is None else int(c.streams.states.numel())


def zipnn_codec(dtype: torch.dtype) -> zipnn.ZipNN:
    """A single-threaded zipnn codec for torch tensors of ``dtype``."""
    return zipnn.ZipNN(input_format="torch", bytearray_dtype=ZIPNN_DTYPE[dtype], threads=1)


def warm_up(dtype: torch.dtype, steps_per_lane: int, backend: str) -> None:
    """Compile our kernels for ``dtype`` (numba JITs on first call) and touch zipnn, all untimed."""
    x = _normal((3 * 32 * 64 + 5,), 0.02, dtype, torch.Generator().manual_seed(1))
    c = compress(x, backend=backend, steps_per_lane=steps_per_lane)
    c.decompress(out=torch.empty_like(x), backend=backend)
    z = zipnn_codec(dtype)
    z.decompress(z.compress(x.clone()))


def measure_tensor(
    name: str, source: str, x: torch.Tensor, repeats: int, steps_per_lane: int, backend: str
) -> dict[str, Any]:
    """Size and single-thread speed of our codec, zipnn and memcpy on one tensor."""
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
    """Element-weighted sizes and summed-time throughputs of a group of measured tensors."""
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
    """Decode speed of the pure-torch reference backend on one bf16 tensor (context for the numba path)."""
    x = _normal((numel,), 0.02, torch.bfloat16, torch.Generator().manual_seed(2))
    c = compress(x, backend="cpu", steps_per_lane=steps_per_lane)
    out = torch.empty_like(x)
    c.decompress(out=out, backend="torch")
    ok = same_bits(out, x)
    t = best_of(lambda: c.decompress(out=out, backend="torch"), repeats)
    return {"dtype": "bf16", "numel": numel, "decode_s": t, "decode_gbps": gbps(x.nbytes, t), "lossless": ok}


def evaluate_targets(rows: list[dict[str, Any]], total: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Whether each project target was met in this run, with the numbers behind the verdict."""
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


# ----------------------------------------------------------------------------------------------------- GPU


def gpu_sweep(repeats: int, default_steps: int, steps_list: list[int], device: torch.device) -> dict[str, Any]:
    """Triton decode throughput of bf16 tensors of 1e5..1e9 bytes vs device copy, and a steps_per_lane sweep.

    Sizes that would not fit in free device memory (about 6x the tensor's bytes, encoder scratch included)
    are skipped. The steps sweep runs at 1e8 bytes (the largest measured size if 1e8 does not fit).
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


# ----------------------------------------------------------------------------------------------------- machine


# ----------------------------------------------------------------------------------------------------- markdown


def _yes(flag: bool | None) -> str:
    return "n/a" if flag is None else ("**met**" if flag else "**not met**")


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown block (markers included) for docs/BENCHMARKS.md."""
    m, cfg = result["machine"], result["config"]
    load = "/".join(f"{v:.2f}" for v in m["load_avg_start"])
    load_end = "/".join(f"{v:.2f}" for v in m["load_avg_end"])
    lines = [
        MD_BEGIN,
        "## Codec: size vs entropy bound and zipnn, single-thread CPU speed",
        "",
        f"Generated by `python benchmarks/codec.py` ({cfg['name']} config) on {m['date']} at `{m['git']}`.",
        f"Machine: {m['cpu_model']} (family/model {m['cpu_family_model']}, "
        f"{m['usable_cores']} usable of {m['logical_cores']} logical cores; "
        f"{', '.join(m['cpu_flags']) or 'no AVX flags seen'}), Python {m['python']}, torch {m['torch']}, "
        f"numba {m['numba']}, zipnn {m['zipnn']}, GPU: {m['gpu'] or 'none'}. "
        f"Load average (1/5/15 min) {load} at start, {load_end} at end.",
        "",
        f"All CPU timings on one thread (torch, numba and zipnn threads = 1), best of {cfg['repeats']}, "
        f"`steps_per_lane={cfg['steps_per_lane']}`, backend `{cfg['backend']}`. GB = bytes of the original "
        "float tensor / 1e9. Sizes in bits/weight (b/w) are serialized sizes, headers included; bound = "
        "sign+mantissa bits + exponent entropy H; lanes = 48 bits x lanes / numel. Our decode writes into a "
        "preallocated buffer; zipnn's `decompress` allocates its output (its API has no `out=`). The bound "
        "counts sign+mantissa as raw bits, so a coder that also compresses mantissa bytes (zipnn on constant "
        "norm vectors) can go below it.",
        "",
        "| tensor | dtype | numel | H | bound | ours | gap | lanes | zipnn | enc GB/s | dec GB/s | zipnn enc | "
        "zipnn dec | memcpy |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["tensors"]:
        g = r["gbps"]
        flag = "" if r["ours_lossless"] and r["zipnn_lossless"] else " (NOT LOSSLESS)"
        lines.append(
            f"| {r['name']}{flag} | {r['dtype']} | {r['numel']:,} | {r['exp_entropy']:.3f} | {r['bound_bpw']:.3f} | "
            f"{r['ours_bpw']:.3f} | {r['gap_bpw']:+.4f} | {r['lane_overhead_bpw']:.4f} | {r['zipnn_bpw']:.3f} | "
            f"{g['ours_encode']:.3f} | {g['ours_decode']:.3f} | {g['zipnn_encode']:.3f} | {g['zipnn_decode']:.3f} | "
            f"{g['memcpy']:.2f} |"
        )
    lines += [
        "",
        "| group | tensors | numel | bound | ours | gap | zipnn | ratio ours / zipnn | enc GB/s | dec GB/s | "
        "zipnn enc | zipnn dec | memcpy | dec / zipnn dec | enc / zipnn enc |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for group, t in result["totals"].items():
        g = t["gbps"]
        lines.append(
            f"| {group} | {t['tensors']} | {t['numel']:,} | {t['bound_bpw']:.3f} | {t['ours_bpw']:.3f} | "
            f"{t['gap_bpw']:+.4f} | {t['zipnn_bpw']:.3f} | {t['ours_ratio']:.3f}x / {t['zipnn_ratio']:.3f}x | "
            f"{g['ours_encode']:.3f} | {g['ours_decode']:.3f} | {g['zipnn_encode']:.3f} | {g['zipnn_decode']:.3f} | "
            f"{g['memcpy']:.2f} | {t['decode_vs_zipnn']:.2f}x | {t['encode_vs_zipnn']:.2f}x |"
        )
    ref = result["reference_torch_decode"]
    lines += [
        "",
        f"Pure-torch reference backend decode, {ref['numel']:,} bf16 elements: {ref['decode_gbps']:.4f} GB/s "
        f"({ref['decode_s'] * 1e3:.1f} ms, one thread).",
    ]
    if result["skipped"]:
        lines.append("Skipped: " + ", ".join(f"{s['name']} ({s['reason']})" for s in result["skipped"]) + ".")
    lines += ["", "Targets in this run:", ""]
    labels = {
        "ratio_ge_zipnn": "compression ratio >= zipnn's (every tensor)",
        "gap_le_0.05_for_ge_1M": "<= 0.05 bit/weight above the entropy bound for tensors >= 1M elements",
        "decode_ge_zipnn": "decode >= zipnn decode (single thread, total)",
        "encode_ge_0.5_GBps": "encode >= 0.5 GB/s (single thread, total)",
    }
    for key, label in labels.items():
        t = result["targets"][key]
        lines.append(f"- {label}: {_yes(t['met'])} ({t['detail']})")
    gpu = result.get("gpu")
    if gpu:
        lines += [
            "",
            f"### GPU decode (Triton), {gpu['device']}",
            "",
            f"bf16 N(0, 0.02), `steps_per_lane={gpu['steps_per_lane']}`, CUDA events, best of {cfg['repeats']}; "
            "copy = `out.copy_(x)` into a preallocated device buffer.",
            "",
            "| bytes | numel | lanes b/w | b/w | decode GB/s | copy GB/s | decode / copy | encode GB/s |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in gpu["sizes"]:
            lines.append(
                f"| {r['bytes']:.0e} | {r['numel']:,} | {r['lane_overhead_bpw']:.4f} | {r['bpw']:.3f} | "
                f"{r['decode_gbps']:.1f} | {r['copy_gbps']:.1f} | {r['decode_vs_copy']:.2f} | {r['encode_gbps']:.1f} |"
            )
        if gpu["skipped_bytes"]:
            lines.append("Not measured (device memory): " + ", ".join(f"{b:.0e} B" for b in gpu["skipped_bytes"]))
        if gpu["steps_sweep"]:
            lines += [
                "",
                f"steps_per_lane sweep at {gpu['steps_sweep_bytes']:.0e} bytes:",
                "",
                "| steps_per_lane | lanes | lanes b/w | b/w | decode GB/s | encode GB/s |",
                "|--:|--:|--:|--:|--:|--:|",
            ]
            for r in gpu["steps_sweep"]:
                lines.append(
                    f"| {r['steps_per_lane']} | {r['lanes']:,} | {r['lane_overhead_bpw']:.4f} | {r['bpw']:.3f} | "
                    f"{r['decode_gbps']:.1f} | {r['encode_gbps']:.1f} |"
                )
    else:
        lines += ["", "GPU: no CUDA device in this run; the Triton decode sweep was not measured."]
    lines.append(MD_END)
    return "\n".join(lines)


def write_markdown(path: Path, block: str) -> None:
    """Replace the block between the codec markers in ``path`` (creating the file or markers if absent)."""
    write_markdown_block(path, block, MD_BEGIN, MD_END)


# ----------------------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
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
    """Run the benchmark, write the JSON and markdown outputs, and return the result dictionary."""
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
