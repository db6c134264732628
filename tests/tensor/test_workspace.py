"""The decode pool: best-fit reuse of several buffers of different sizes, never handing out inference tensors."""

from __future__ import annotations

import torch

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
