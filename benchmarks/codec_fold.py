"""Folded mantissa bits on trained weights: size against zipnn and the folded entropy bound, speed A/B against a
baseline build of the codec, in one run.

``.venv/bin/python benchmarks/codec_fold.py --file benchmarks/out/trained_bf16.safetensors --file ... [--base REV]``

For every float tensor of each file: our serialized bits/weight (header included), the fold the encoder chose,
zipnn's bits/weight (one thread), the exponent-only bound ``sm_bits + H(exponent)`` and the folded bound
``sm_bits - F + H(exponent, top F mantissa bits)`` for the chosen ``F`` (ideal coding of the symbol, fields raw).
With ``--base REV`` (default ``HEAD``) the codec of that git revision is copied out (``git show``, nothing in the
work tree changes) and imported as a second package: its size, and the encode / decode GB/s of both builds
(``cpu`` backend, best of N, one thread for torch and numba), alternating base and new per repeat. Results go to
``benchmarks/out/codec_fold.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numba
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.codec_inputs import DTYPE_NAME, file_tensors  # noqa: E402
from benchmarks.codec_measure import gbps, same_bits, zipnn_codec  # noqa: E402
from benchmarks.common import machine_info, machine_line  # noqa: E402
from nz_lightning import kernels as new  # noqa: E402
from nz_lightning.kernels import entropy_bits, spec_for  # noqa: E402


def base_package(rev: str, where: Path) -> ModuleType:
    """The codec (``kernels/``) of git revision ``rev``, written under ``where`` and imported as its own package."""
    pkg = where / f"nzbase_{rev.replace('/', '_')}"
    pkg.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "kernels/"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, capture_output=True, check=True).stdout
            target = pkg / Path(name).name
            if not target.exists() or target.read_bytes() != text:
                target.write_bytes(text)
    sys.path.insert(0, str(where))
    return importlib.import_module(pkg.name)


def folded_bound(x: torch.Tensor, fold: int) -> tuple[float, float]:
    """(exponent-only bound, folded bound for ``fold``) in bits/weight, from plain torch histograms."""
    spec = spec_for(x.dtype)
    bits = x.reshape(-1).view(spec.int_dtype).to(torch.int64) & ((1 << spec.total_bits) - 1)
    exp = (bits >> spec.man_bits) & (spec.alphabet - 1)
    h_exp = entropy_bits(torch.bincount(exp, minlength=spec.alphabet).tolist()) + 0.0
    width = spec.exp_bits + fold
    sym = (bits >> (spec.man_bits - fold)) & ((1 << width) - 1)
    h_sym = entropy_bits(torch.bincount(sym, minlength=1 << width).tolist()) + 0.0
    return spec.sm_bits + h_exp, spec.sm_bits - fold + h_sym


def _best(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(name: str, x: torch.Tensor, base: ModuleType | None, repeats: int, timed: bool) -> dict[str, Any]:
    """One tensor's row (see the module docstring)."""
    x = x.contiguous()
    n, nbytes = x.numel(), x.numel() * x.element_size()
    c = new.compress(x, backend="cpu")
    out = torch.empty_like(x)
    assert same_bits(c.decompress(out=out, backend="cpu"), x), name
    exp_bound, fold_bound = folded_bound(x, c.fold_bits)
    z = zipnn_codec(x.dtype)
    zc = z.compress(x.clone())
    row: dict[str, Any] = {"name": name, "dtype": DTYPE_NAME[x.dtype], "numel": n, "mode": c.mode}
    row |= {"fold": c.fold_bits, "ours_bpw": 8 * len(c.to_bytes()) / n, "zipnn_bpw": 8 * len(zc) / n}
    row |= {"exp_bound": exp_bound, "fold_bound": fold_bound}
    if base is not None:
        b = base.compress(x, backend="cpu")
        row["base_bpw"] = 8 * len(b.to_bytes()) / n
        if timed:
            t = {"new_enc": [], "base_enc": [], "new_dec": [], "base_dec": []}
            for _ in range(repeats):  # alternate, so both see the same machine load
                t["base_enc"].append(_best(lambda: base.compress(x, backend="cpu"), 1))
                t["new_enc"].append(_best(lambda: new.compress(x, backend="cpu"), 1))
                t["base_dec"].append(_best(lambda: b.decompress(out=out, backend="cpu"), 1))
                t["new_dec"].append(_best(lambda: c.decompress(out=out, backend="cpu"), 1))
            row["gbps"] = {k: gbps(nbytes, min(v)) for k, v in t.items()}
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows plus a total per dtype."""
    head = "| tensor | dtype | numel | F | exp bound | folded bound | ours | gap to folded | zipnn | ours - zipnn "
    head += "| base |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['numel']} | {r['fold']} | {r['exp_bound']:.3f} | {r['fold_bound']:.3f}"
            f" | {r['ours_bpw']:.3f} | {r['ours_bpw'] - r['fold_bound']:+.3f} | {r['zipnn_bpw']:.3f}"
            f" | {r['ours_bpw'] - r['zipnn_bpw']:+.3f} | {r.get('base_bpw', float('nan')):.3f} |"
        )
    for dtype in sorted({r["dtype"] for r in rows}):
        sel = [r for r in rows if r["dtype"] == dtype]
        n = sum(r["numel"] for r in sel)

        def w(key: str, sel: list[dict[str, Any]] = sel, n: int = n) -> float:
            return sum(r[key] * r["numel"] for r in sel) / n

        lines.append(
            f"| **total {dtype}** | {dtype} | {n} | | {w('exp_bound'):.3f} | {w('fold_bound'):.3f}"
            f" | {w('ours_bpw'):.3f} | {w('ours_bpw') - w('fold_bound'):+.3f} | {w('zipnn_bpw'):.3f}"
            f" | {w('ours_bpw') - w('zipnn_bpw'):+.3f}"
            f" | {w('base_bpw') if all('base_bpw' in r for r in sel) else float('nan'):.3f} |"
        )
    timed = [r for r in rows if "gbps" in r]
    if timed:
        lines += ["", "| tensor | dtype | numel | enc base | enc new | dec base | dec new |", "|" + "---|" * 7]
        for r in timed:
            g = r["gbps"]
            lines.append(
                f"| {r['name']} | {r['dtype']} | {r['numel']} | {g['base_enc']:.3f} | {g['new_enc']:.3f}"
                f" | {g['base_dec']:.3f} | {g['new_dec']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns the JSON result."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--file", type=Path, action="append", required=True, help="a .safetensors file (repeatable)")
    p.add_argument("--base", default="HEAD", help="git revision of the baseline codec ('' for none)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--time-min-numel", type=int, default=1 << 16, help="time only tensors this large")
    p.add_argument("--slices", default="1024,4096,16384", help="also measure the first N elements of each tensor")
    p.add_argument("--only", default="", help="only tensors whose name contains this")
    p.add_argument("--tile-to", type=int, default=0, help="repeat each tensor to at least this many elements (speed)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/codec_fold.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    base = base_package(args.base, ROOT / "benchmarks/out/base_codec") if args.base else None
    rows: list[dict[str, Any]] = []
    small: list[dict[str, Any]] = []  # slices of trained tensors: tiny-tensor sizes with trained statistics
    for path in args.file:
        for name, _, load in file_tensors(path):
            x = load()
            if x.dtype not in DTYPE_NAME or x.numel() < 2 or args.only not in name:
                continue
            if args.tile_to > x.numel():
                times = -(-args.tile_to // x.numel())
                name, x = f"{name} x{times}", x.reshape(-1).repeat(times)
            rows.append(measure(name, x, base, args.repeats, x.numel() >= args.time_min_numel))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "gbps"}), file=sys.stderr, flush=True)
            for size in [int(v) for v in args.slices.split(",") if v] if x.numel() >= 1 << 16 else []:
                small.append(measure(f"{name}[:{size}]", x.reshape(-1)[:size], base, args.repeats, False))
    machine = machine_info()
    result = {"machine": machine, "base": args.base, "repeats": args.repeats, "rows": rows, "slices": small}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(machine_line(machine))
    print(table(rows))
    for size in sorted({r["numel"] for r in small}):
        print()
        print(table([r for r in small if r["numel"] == size]).split("\n\n")[0])
    return result


if __name__ == "__main__":
    main()
