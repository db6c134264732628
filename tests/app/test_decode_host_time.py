"""The decode host-time benchmark runs (tiny sizes) and leaves the real Triton kernel in place."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks import decode_host_time
from nz_lightning.kernels import compress
from nz_lightning.kernels import triton_kernels as tk


def test_decode_host_time_smoke(tmp_path: Path) -> None:
    kernel = tk.decode_kernel
    decode_host_time.main(["--sizes", "65536", "--decodes", "5", "--repeats", "2", "--out", str(tmp_path / "h.json")])
    rows = json.loads((tmp_path / "h.json").read_text())["rows"]
    assert rows[0]["numel"] == 65536 and rows[0]["us_per_decode"] > 0 and len(rows[0]["runs_us"]) == 2
    assert tk.decode_kernel is kernel  # restored: decodes still decode
    x = (torch.randn(4096) * 0.02).bfloat16()
    assert torch.equal(compress(x, backend="triton").decompress(backend="triton"), x)
