"""The decode pool: best-fit reuse of several buffers of different sizes, never handing out inference tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nz_lightning.tensor.convert as convert
import nz_lightning.tensor.workspace as workspace
from nz_lightning.tensor.convert import compress_model
from nz_lightning.tensor.workspace import WorkspacePool

CPU = torch.device("cpu")


def test_pool_reuses_best_fit_among_buffers_of_different_sizes() -> None:
    """With two pooled buffers of different sizes (as decode-ahead keeps), each request takes the smallest that fits."""
    pool = WorkspacePool(keep=2)
    _, small = pool.acquire((100,), torch.float32, CPU)
    _, large = pool.acquire((300,), torch.float32, CPU)
    pool.release(small)
    pool.release(large)
    view, got = pool.acquire((250,), torch.float32, CPU)
    assert got is large and view.shape == (250,)
    _, got_small = pool.acquire((50,), torch.float32, CPU)
    assert got_small is small
    pool.release(large)
    pool.release(small)
    _, bigger = pool.acquire((1000,), torch.float32, CPU)  # nothing fits: the largest too-small buffer is dropped
    assert bigger is not large and bigger.numel() == 1000
    assert [b.numel() for b in pool._free[(torch.float32, CPU)]] == [100]


def test_buffers_made_under_inference_mode_are_normal_tensors() -> None:
    pool = WorkspacePool()
    with torch.inference_mode():
        _, buf = pool.acquire((8,), torch.bfloat16, CPU)
    assert not buf.is_inference()
    buf.add_(1)  # writable outside inference mode


def test_pool_limit_is_sized_to_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small model keeps at most its largest single-block weight pooled, not a fixed 64 MiB; the limit only grows."""
    monkeypatch.setattr(workspace, "DECODE_POOL", pool := WorkspacePool())
    monkeypatch.setattr(convert, "DECODE_POOL", pool)
    assert pool.limit == workspace.ROW_BLOCK_BYTES  # before any model
    model = compress_model(nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 8)))
    assert pool.limit == 64 * 16 * 4 == convert.pool_bytes(model)
    _, big = pool.acquire((64 * 16 + 1,), torch.float32, CPU)
    _, fits = pool.acquire((64 * 16,), torch.float32, CPU)
    pool.release(big)
    pool.release(fits)
    assert pool.nbytes() == 64 * 16 * 4  # the larger buffer was freed, not pooled
    _, transient = pool.acquire((64 * 16 * 2,), torch.float32, CPU)  # too large to keep: evicts nothing
    pool.release(transient)
    assert pool.nbytes() == 64 * 16 * 4
    pool.fit(10)
    assert pool.limit == 64 * 16 * 4
    assert WorkspacePool(max_bytes=100).limit == 100
    monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", 1000)  # 15 rows of 64 bytes: several blocks
    blocked = compress_model(nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 8)))
    assert convert.pool_bytes(blocked) == 8 * 16 * 4  # the single-block weight, not the embedding's blocks
    assert convert.pool_bytes(compress_model(nn.Sequential(nn.Embedding(100, 16)))) == 15 * 64  # only blocks
    assert pool.limit == 64 * 16 * 4  # grows only
    pool.fit(2**40)
    assert pool.limit == workspace.MAX_POOLED_BYTES and pool.nbytes() == 64 * 16 * 4
