"""``Trainer(strategy="neuzip_fsdp")`` with 2 gloo processes on CPU: compressed shards, compressed all-gather."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.distributed.test_data_parallel import assert_close, job


def test_fsdp_compressed_shards_equal_dense_shards_bitwise(tmp_path: Path) -> None:
    """Compressed shards and gather vs dense shards (lomo_fsdp): the same bits; the same training as data parallel.

    (Compressed vs dense gather of compressed shards: tests/distributed/test_fsdp.py, at the torch level.)
    """
    common = ["--fsdp", "1", "--own-sampler", "1", "--opt", "adamw", "--clip", "0.5"]
    compressed = job(tmp_path / "compressed", 2, *common)
    lomo = job(tmp_path / "lomo", 2, *common, "--compress", "0")
    replicas = job(tmp_path / "dp", 2, "--own-sampler", "1", "--opt", "adamw", "--clip", "0.5")
    assert compressed[0]["checksum"] == compressed[1]["checksum"]  # every rank gathers the same whole weights
    assert compressed[0]["checksum"] == lomo[0]["checksum"] and compressed[0]["losses"] == lomo[0]["losses"]
    assert compressed[0]["all_gather_bytes"] < compressed[0]["all_gather_dense_bytes"]  # compressed on the wire
    # reduce-scatter vs all-reduce, blocked vs plain head: the same training up to summation order (AdamW: 4 steps of
    # lr 1e-2 move weights by 4e-2; they agree within 5e-5)
    assert_close(compressed[0]["weights"], replicas[0]["weights"], atol=5e-5)


def test_fsdp_resume_bit_identical_and_dense_checkpoint_at_one_rank(tmp_path: Path) -> None:
    """Compressed and dense checkpoints resume bit-identically at 2 ranks; the dense one loads at 1 rank too."""
    common = ["--fsdp", "1", "--own-sampler", "1", "--opt", "adamw", "--steps-per-epoch", "1"]
    for fmt in ("compressed", "dense"):
        full = job(tmp_path / fmt / "full", 2, *common, "--format", fmt, "--ckpt", "1")
        ckpt = tmp_path / fmt / "full" / "ckpt" / "epoch=1.ckpt"
        resumed = job(tmp_path / fmt / "resumed", 2, *common, "--format", fmt, "--resume", str(ckpt))
        assert resumed[0]["checksum"] == resumed[1]["checksum"] == full[0]["checksum"], fmt
        assert resumed[0]["losses"] == full[0]["losses"][2:], fmt
    final = torch.load(tmp_path / "dense" / "full" / "ckpt" / "epoch=3.ckpt", weights_only=True)["state_dict"]
    for name, value in full[0]["weights"].items():  # whole dense tensors, readable by plain torch
        assert torch.equal(final[name], value), name
    single = job(tmp_path / "single", 1, *common, "--resume", str(ckpt))
    assert_close(single[0]["weights"], full[0]["weights"])
