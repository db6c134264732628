"""Decode-ahead (``prefetch_decodes``): on CPU the prefetch runs synchronously, so results must be bit-identical."""

from __future__ import annotations

import torch

from nz_lightning.optim import fused_optimizer
from nz_lightning.tensor.convert import compress_model
from nz_lightning.tensor.prefetch import PREFETCH, prefetch_decodes
from nz_lightning.tensor.sync_count import count_host_syncs
from tests.helpers.models import assert_same_state, batches, build, llama, train


def _run(prefetch: bool) -> tuple[list[float], torch.nn.Module, int, int]:
    model = build("llama-tied-bf16", compressed=True)
    opt = fused_optimizer(model, "adamw", lr=1e-2, max_grad_norm=1.0)
    with prefetch_decodes(prefetch) as prefetcher:
        hits, misses = prefetcher.hits, prefetcher.misses
        losses = train(model, opt, batches(3))
        return losses, model, prefetcher.hits - hits, prefetcher.misses - misses


def test_prefetch_is_bit_identical_and_used() -> None:
    off_losses, off_model, off_hits, _ = _run(False)
    on_losses, on_model, hits, _ = _run(True)
    assert on_losses == off_losses
    assert_same_state(on_model, off_model)
    assert off_hits == 0 and hits > 0
    assert not PREFETCH.enabled


def test_prefetch_adds_no_host_sync() -> None:
    torch.manual_seed(0)
    model = compress_model(llama().to(torch.bfloat16), backend="torch")  # a device-like backend (not numba)
    opt = fused_optimizer(model, "sgd", lr=0.5)
    data = batches(2)
    with prefetch_decodes():
        train(model, opt, data[:1])
        with count_host_syncs() as syncs:
            opt.backward(model(input_ids=data[1], labels=data[1]).loss)
    assert syncs.count("decode") == syncs.count("update") == 0, syncs.summary()
