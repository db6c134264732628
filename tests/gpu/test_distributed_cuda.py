"""The multi-device strategies on one CUDA GPU (NCCL, one rank): NeuZip-FSDP == dense FSDP2 shards bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.distributed import check_ranks, run_ranks

pytestmark = pytest.mark.gpu


def _job(out: Path, *args: str) -> dict:
    check_ranks(
        run_ranks("tests.distributed.worker_dp", ["--out", str(out), "--accelerator", "gpu", *args], world_size=1)
    )
    return dict(json.loads((out / "rank0.json").read_text()))


def test_fsdp_on_cuda_compressed_equals_dense_shards(tmp_path: Path) -> None:
    common = ["--fsdp", "1", "--opt", "adamw", "--clip", "0.5", "--dtype", "bfloat16"]
    compressed = _job(tmp_path / "nz", *common)
    dense = _job(tmp_path / "lomo", *common, "--compress", "0")
    assert compressed["checksum"] == dense["checksum"] and compressed["losses"] == dense["losses"]


def test_neuzip_on_cuda_through_the_process_group_path(tmp_path: Path) -> None:
    """One rank with the data-parallel plumbing on CUDA (no process group: single device)."""
    nz = _job(tmp_path / "nz", "--dtype", "bfloat16")
    lomo = _job(tmp_path / "lomo", "--dtype", "bfloat16", "--compress", "0")
    assert nz["checksum"] == lomo["checksum"]
