"""Per-GPU memory model: Llama-3 8B and 70B on 8 GPUs of 24 and 80 GiB, data parallel vs FSDP2 vs NeuZip-FSDP.

Run: ``python benchmarks/distributed_model.py [--codec benchmarks/out/codec_fold_final.json] [--out-dir ...]``.
Writes ``<out-dir>/distributed_model.json`` and ``<out-dir>/distributed_model.md``. Pure arithmetic (no model is
built); every assumption is listed in the output (:data:`ASSUMPTIONS`).

NeuZip sizes come from measured bits/weight per tensor kind: the codec's results on trained bf16 weights
(``benchmarks/codec_fold.py`` on ``benchmarks/codec_trained.py``'s model, ``benchmarks/out/codec_fold_final.json``),
averaged per kind (q/k/v/o, gate/up/down, embedding, head) and applied to the Llama-3 tensors of that kind.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
GPUS = 8
GPU_GIB = (24, 80)
BATCH, SEQ = 1, 2048
OVERHEAD_GIB = 2.0
OPTIMIZERS = {"sgd": 0, "adamw (fp32 moments)": 8, "adamw (bf16 moments)": 4}
METHODS = ("data parallel NeuZip", "FSDP2 dense + fused update", "NeuZip-FSDP")
TORCHTUNE = (
    "torchtune (published): Llama 3.1 70B full fine-tune, 13.9 GiB per GPU on 8x A100 with CPU offload "
    "(parameters, gradients and optimizer state live in CPU memory; quoted as issue 13 gives it, not re-measured)"
)
ASSUMPTIONS = [
    f"{GPUS} GPUs, one rank each; GPU sizes {GPU_GIB[0]} and {GPU_GIB[1]} GiB; 'fits' = total <= GPU size.",
    f"Fixed per-GPU overhead {OVERHEAD_GIB} GiB (CUDA context, NCCL buffers, allocator fragmentation): an estimate.",
    "bf16 weights; untied embedding and head (Llama-3); norm vectors stay dense bf16 (not compressed).",
    "NeuZip bits/weight per tensor kind = numel-weighted mean of the codec's measured bits/weight (headers included) "
    "on the trained bf16 model of benchmarks/codec_trained.py (tensors of 65K-180K elements); real Llama-3 weights "
    "were not measured here: their exponent statistics may differ (the codec's N(0, 0.02) and tiled-trained runs "
    "give 10.52-10.57 bits/weight). Larger tensors lose ~0.01 b/w of per-lane header cost (tiled runs), ignored.",
    "Fused update in backward for every method: no full-model gradient buffer. SGD keeps no state; AdamW keeps two "
    "moments per parameter (fp32: 8 B, bf16: 4 B), dense (not compressed), sharded over ranks in FSDP, a full copy "
    "per rank in data parallel.",
    "Data parallel NeuZip: each rank holds the whole compressed model; transients = the largest tensor decoded dense "
    "+ its gradient (bf16, all-reduced in place in the hook); plain head (the blocked head, the DP default, would "
    "cut the head's transients to one row block).",
    "FSDP2 units: each decoder layer, the embedding and the LM head. Transients: two adjacent units unsharded at "
    "once (the one computing + the prefetched next: the head and the last decoder layer at the start of backward), "
    "the largest unit's unsharded bf16 gradient (before its reduce-scatter) "
    "and its reduce-scatter output shard. NeuZip-FSDP adds the compressed all-gather payload of the largest unit and "
    "a dense copy of one unit's local shard for the fused update (an upper bound: the update decodes row blocks).",
    f"Activations: batch {BATCH} x {SEQ} tokens per GPU, bf16, activation checkpointing at every decoder layer "
    "(one h-vector per token per layer kept), plus one layer's recomputed intermediates and their gradients "
    "(2 x (6h + 2 kv_dim + 4 ffn) x 2 B per token; flash/SDPA attention, no S^2 matrix), plus the plain head's "
    "logits: bf16 logits + fp32 upcast + fp32 logit gradient = 10 B per token per vocabulary entry.",
    "Weights are not offloaded to the CPU in any of our rows (unlike torchtune's figure).",
]


@dataclass(frozen=True)
class Llama:
    """A Llama shape."""

    name: str
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int

    def tensors(self) -> dict[str, int]:
        """Elements per tensor kind, summed over layers (kind -> numel)."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        per_layer = {"q_proj": h * h, "k_proj": kv * h, "v_proj": kv * h, "o_proj": h * h}
        per_layer |= {"gate_proj": self.ffn * h, "up_proj": self.ffn * h, "down_proj": self.ffn * h, "norm": 2 * h}
        out = {k: v * self.layers for k, v in per_layer.items()}
        out["norm"] += h
        return out | {"embed_tokens": self.vocab * h, "lm_head": self.vocab * h}

    def layer_numel(self) -> int:
        """Elements of one decoder layer."""
        t = self.tensors()
        return sum(v for k, v in t.items() if k not in ("embed_tokens", "lm_head")) // self.layers

    def params(self) -> int:
        """Total parameters."""
        return sum(self.tensors().values())


MODELS = (
    Llama("Llama-3 8B", 4096, 32, 14336, 32, 8, 128256),
    Llama("Llama-3 70B", 8192, 80, 28672, 64, 8, 128256),
)
_KIND = re.compile(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|embed_tokens|lm_head)\.weight$")


def measured_bits(path: Path) -> dict[str, float]:
    """Numel-weighted mean bits/weight per tensor kind of the bf16 rows of a codec result (``codec_fold*.json``).

    Raises:
        FileNotFoundError: ``path`` does not exist (run benchmarks/codec_fold.py on the trained weights).
        ValueError: A kind has no bf16 row.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: codec results missing; run benchmarks/codec_fold.py --file <trained bf16>")
    rows = json.loads(path.read_text())["rows"]
    acc: dict[str, list[float]] = {}
    for r in rows:
        m = _KIND.search(r["name"])
        if r["dtype"] == "bf16" and m:
            a = acc.setdefault(m.group(1), [0.0, 0.0])
            a[0] += r["ours_bpw"] * r["numel"]
            a[1] += r["numel"]
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")
    missing = [k for k in kinds if k not in acc]
    if missing:
        raise ValueError(f"{path}: no bf16 rows for {missing}")
    return {k: acc[k][0] / acc[k][1] for k in kinds}


def compressed_bytes(tensors: dict[str, int], bits: dict[str, float]) -> float:
    """Bytes of these tensors with NeuZip (norms dense bf16)."""
    return sum(n * (bits[k] / 8 if k in bits else 2) for k, n in tensors.items())


def activations(m: Llama) -> dict[str, float]:
    """Activation bytes per GPU (see ASSUMPTIONS)."""
    tokens = BATCH * SEQ
    kv = m.hidden // m.heads * m.kv_heads
    return {
        "checkpoints": m.layers * tokens * m.hidden * 2,
        "layer_recompute": 2 * tokens * (6 * m.hidden + 2 * kv + 4 * m.ffn) * 2,
        "head_logits": 10 * tokens * m.vocab,
    }


def estimate(m: Llama, method: str, state_bytes: int, bits: dict[str, float]) -> dict[str, float]:
    """Per-GPU bytes of each component for one model, method and optimizer."""
    t = m.tensors()
    p = m.params()
    layer = {k: n // m.layers for k, n in t.items() if k not in ("embed_tokens", "lm_head")}
    head = {"lm_head": m.vocab * m.hidden}
    unit_t = max(layer, head, key=lambda d: sum(d.values()))  # the largest FSDP unit (the head for 8B and 70B)
    unit, unit_c = sum(unit_t.values()), compressed_bytes(unit_t, bits)
    largest = max(n // m.layers if k not in ("embed_tokens", "lm_head") else n for k, n in t.items())
    act = sum(activations(m).values())
    if method == "data parallel NeuZip":
        comp = {
            "weights": compressed_bytes(t, bits),
            "optimizer_state": p * state_bytes,
            "gradient_transient": largest * 2,
            "gather_or_decode_transient": largest * 2,
        }
    else:
        sharded = method == "NeuZip-FSDP"
        comp = {
            "weights": (compressed_bytes(t, bits) if sharded else p * 2) / GPUS,
            "optimizer_state": p * state_bytes / GPUS,
            "gradient_transient": unit * 2 + unit * 2 / GPUS,
            "gather_or_decode_transient": (unit + sum(layer.values())) * 2
            + ((unit_c + unit * 2 / GPUS) if sharded else 0),
        }
    comp["activations"] = act
    comp["overhead"] = OVERHEAD_GIB * GIB
    comp["total"] = sum(comp.values())
    return comp


def build(bits: dict[str, float]) -> dict[str, Any]:
    """Every (model, optimizer, method) row, plus the inputs."""
    rows = []
    for m in MODELS:
        for opt, state in OPTIMIZERS.items():
            for method in METHODS:
                c = estimate(m, method, state, bits)
                gib = {k: v / GIB for k, v in c.items()}
                rows.append(
                    {"model": m.name, "optimizer": opt, "method": method, "gib": gib}
                    | {f"fits_{g}": gib["total"] <= g for g in GPU_GIB}
                )
    models = [
        {
            **asdict(m),
            "params": m.params(),
            "compressed_gib": compressed_bytes(m.tensors(), bits) / GIB,
            "dense_gib": m.params() * 2 / GIB,
            "activations_gib": {k: v / GIB for k, v in activations(m).items()},
        }
        for m in MODELS
    ]
    return {
        "gpus": GPUS,
        "gpu_gib": GPU_GIB,
        "batch": BATCH,
        "seq": SEQ,
        "bits_per_weight": bits,
        "models": models,
        "rows": rows,
        "assumptions": ASSUMPTIONS,
        "reference": TORCHTUNE,
    }


def render(result: dict[str, Any], codec: str) -> str:
    """The markdown block (merged into docs/BENCHMARKS.md by hand)."""
    bits = ", ".join(f"{k} {v:.3f}" for k, v in result["bits_per_weight"].items())
    lines = [
        f"## Memory model: Llama-3 8B / 70B on {GPUS} GPUs ({' / '.join(map(str, GPU_GIB))} GiB)",
        "",
        f"Generated by `python benchmarks/distributed_model.py` from `{codec}` (arithmetic, not a measurement).",
        f"Measured NeuZip bits/weight per kind (trained bf16 weights): {bits}.",
        "",
    ]
    for m in result["models"]:
        a = m["activations_gib"]
        lines.append(
            f"- {m['name']}: {m['params'] / 1e9:.2f}B parameters, bf16 {m['dense_gib']:.1f} GiB, NeuZip "
            f"{m['compressed_gib']:.1f} GiB ({m['compressed_gib'] / m['dense_gib']:.3f}x); activations per GPU: "
            f"checkpoints {a['checkpoints']:.2f}, one layer recomputed {a['layer_recompute']:.2f}, head logits "
            f"{a['head_logits']:.2f} GiB."
        )
    lines += [
        "",
        "Per GPU, GiB:",
        "",
        "| model | optimizer | method | weights | optimizer state | gradient transient | gathered/decoded transient |"
        " activations | overhead | **total** | fits 24 GiB | fits 80 GiB |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in result["rows"]:
        g = r["gib"]
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['method']} | {g['weights']:.2f} | {g['optimizer_state']:.2f} |"
            f" {g['gradient_transient']:.2f} | {g['gather_or_decode_transient']:.2f} | {g['activations']:.2f} |"
            f" {g['overhead']:.1f} | **{g['total']:.1f}** | {'yes' if r['fits_24'] else 'no'} |"
            f" {'yes' if r['fits_80'] else 'no'} |"
        )
    lines += ["", "NeuZip-FSDP total / FSDP2 dense total (same optimizer):", ""]
    for m in MODELS:
        for opt in OPTIMIZERS:
            by = {
                r["method"]: r["gib"]["total"] for r in result["rows"] if (r["model"], r["optimizer"]) == (m.name, opt)
            }
            lines.append(f"- {m.name}, {opt}: {by['NeuZip-FSDP'] / by['FSDP2 dense + fused update']:.3f}")
    lines += ["", f"Reference: {result['reference']}.", "", "Assumptions:", ""]
    lines += [f"- {a}" for a in result["assumptions"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compute the model, write JSON and markdown, return the result."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--codec", type=Path, default=ROOT / "benchmarks" / "out" / "codec_fold_final.json")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "out")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    result = build(measured_bits(args.codec))
    shown = args.codec.relative_to(ROOT) if args.codec.is_relative_to(ROOT) else args.codec
    block = render(result, str(shown))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "distributed_model.json").write_text(json.dumps(result, indent=1))
    (args.out_dir / "distributed_model.md").write_text(block + "\n")
    print(block)
    return result


if __name__ == "__main__":
    main()
