"""Peak memory of the Llama-3 8B step versus sequence length: measured where it ran, modelled up to 8192 tokens.

Run: ``python benchmarks/llama3_8b_model.py --anchor full.json --small s1.json s2.json [...] [--md FILE]`` on JSON
files written by ``benchmarks/llama3_8b_step.py``: one full-depth run (``--anchor``, 32 layers) and runs with fewer
layers (same widths and vocabulary, ``--layers 2``) at several sequence lengths, all with the same head setting.

Model: with activation checkpointing the step's peak is the compressed weights, plus every layer's checkpointed input
(``seq x hidden`` bf16 per layer), plus the largest transient of one phase (a layer's recomputed activations and
backward, or the blocked head's chunks and fp32 input gradient). The transient does not depend on the depth, so the
shallow runs measure how it grows with the sequence; the depth adds ``(layers - shallow layers) x seq x hidden x 2``
bytes of checkpoints. Peak(32 layers, S) = anchor peak + [shallow peak(S) - shallow peak(anchor S)] + (32 - shallow
layers) x hidden x 2 x (S - anchor S). Shallow peaks between measured lengths are interpolated linearly, beyond them
extrapolated from the last two (transients grow linearly in S with SDPA attention and chunked logits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.llama_model import LLAMA3_8B  # noqa: E402

GIB = 2**30
HIDDEN = LLAMA3_8B["hidden"]


def _peak(r: dict[str, Any]) -> float:
    return float(r.get("step_peak_gib", r["peak_gib"]))


def shallow_at(points: list[tuple[int, float]], seq: int) -> float:
    """The shallow runs' step peak at ``seq`` (GiB): linear between measured lengths, extrapolated beyond."""
    pts = sorted(points)
    if len(pts) == 1:
        return pts[0][1]
    (s0, p0), (s1, p1) = pts[0], pts[1]
    for (s0, p0), (s1, p1) in zip(pts, pts[1:], strict=False):  # noqa: B007 - the segment holding seq, or the last
        if seq <= s1:
            break
    return p0 + (p1 - p0) * (seq - s0) / (s1 - s0)


def model_rows(anchor: dict[str, Any], small: list[dict[str, Any]], lengths: list[int]) -> list[dict[str, Any]]:
    """Measured and modelled peaks (GiB) of the full-depth step at each length."""
    depth, shallow_depth = anchor["layers"], small[0]["layers"]
    points = [(r["seq"], _peak(r)) for r in small]
    base = _peak(anchor) - shallow_at(points, anchor["seq"])
    rows = []
    for seq in lengths:
        ckpt = (depth - shallow_depth) * HIDDEN * 2 * (seq - anchor["seq"]) / GIB
        modelled = _peak(anchor) + shallow_at(points, seq) - shallow_at(points, anchor["seq"]) + ckpt
        measured = _peak(anchor) if seq == anchor["seq"] else None
        rows.append({"seq": seq, "modelled_gib": modelled, "measured_gib": measured, "depth_offset_gib": base})
    return rows


def render(anchor: dict[str, Any], small: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows and the runs they come from."""
    head = "plain" if not anchor.get("blocked_head", False) else "blocked"
    lines = [
        f"Step peak (GiB, process RSS during the step) of the Llama-3 8B architecture, {head} head, fused "
        f"{anchor['optimizer']}, batch 1, activation checkpointing. Measured: {anchor['layers']} layers at "
        f"{anchor['seq']} tokens ({_peak(anchor):.2f} GiB); {small[0]['layers']} layers at "
        + ", ".join(f"{r['seq']} ({_peak(r):.2f} GiB)" for r in sorted(small, key=lambda r: r["seq"]))
        + " tokens. Modelled: see benchmarks/llama3_8b_model.py.",
        "",
        "| tokens | measured GiB | modelled GiB | target |",
        "|--:|--:|--:|---|",
    ]
    for r in rows:
        measured = f"{r['measured_gib']:.2f}" if r["measured_gib"] is not None else "-"
        target = "<= 12 GiB measured" if r["measured_gib"] is not None else "< 16 GiB modelled"
        ok = (r["measured_gib"] or 0) <= 12 and r["modelled_gib"] < 16
        lines.append(f"| {r['seq']} | {measured} | {r['modelled_gib']:.2f} | {target}: {'met' if ok else 'not met'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Read the runs, print (and optionally write) the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--small", type=Path, nargs="+", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    anchor = json.loads(args.anchor.read_text())
    small = [json.loads(p.read_text()) for p in args.small]
    if len({r["layers"] for r in small}) != 1 or any(
        r.get("blocked_head") != anchor.get("blocked_head") for r in small
    ):
        raise ValueError("the shallow runs need one depth and the anchor's head setting")
    text = render(anchor, small, model_rows(anchor, small, sorted(set(args.lengths) | {anchor["seq"]})))
    if args.md is not None:
        args.md.write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
