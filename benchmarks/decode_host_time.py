"""Host time of one Triton decode as training makes it, with the kernel launch stubbed out (no GPU needed).

On a GPU a decode's wall time is the larger of its kernel time and the host time to launch it, and a training step
makes thousands of block decodes (Llama-3 8B: about 3,300 row blocks of 4 MiB, decoded in forward, recompute and
backward), so Python overhead per decode bounds the step. This measures that overhead on the CPU: the Triton backend
runs under ``TRITON_INTERPRET=1`` with its decode kernel replaced by a no-op, so what is timed is everything
``WeightStore.decode_block`` does on the host (checks, cached tables and offsets, argument preparation, the
deferred-check flag) but the launch itself (Triton's launcher adds its own few microseconds on a GPU).

``python benchmarks/decode_host_time.py [--sizes 262144 2097152] [--decodes 2000] [--repeats 5] [--out FILE]``
prints and writes JSON: per block size, the median over ``--repeats`` runs of the mean time per decode (one torch
thread). Compare two checkouts by running it in each, alternately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


def measure(numel: int, decodes: int, repeats: int) -> dict[str, Any]:
    """Mean host microseconds per ``decode_block`` of one ``numel``-element bf16 block (median of ``repeats``)."""
    import nz_lightning.kernels.triton_kernels as tk
    from nz_lightning.tensor.store import WeightStore

    real = tk.decode_kernel
    cols = 1024
    value = (torch.randn(numel // cols, cols, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    store = WeightStore(value, "triton", row_block_bytes=value.numel() * 2)
    out = torch.empty_like(value)
    store.decode_block(0, out)  # the real kernel once: tables and offsets cached as in training
    tk.decode_kernel = _NoLaunch()
    try:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(decodes):
                store.decode_block(0, out)
            runs.append((time.perf_counter() - t0) / decodes * 1e6)
    finally:
        tk.decode_kernel = real
    return {"numel": numel, "us_per_decode": statistics.median(runs), "runs_us": runs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[262144, 2097152], help="block sizes (elements)")
    ap.add_argument("--decodes", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(n, args.decodes, args.repeats) for n in args.sizes]
    for r in rows:
        print(f"{r['numel']:>9} elements: {r['us_per_decode']:.1f} us per decode (host, launch stubbed)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
