"""Compressed training on CUDA is bit-identical to uncompressed training with the same fused optimizer.

A tiny Hugging Face Llama (bf16, and tied embeddings) on the GPU, compressed with the Triton backend, trained a few
steps with fused SGD / AdamW / AdaLomo (with and without activation checkpointing) next to the same dense model:
losses and state dicts must be equal (``torch.equal``), and every compressed weight must have changed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nz_lightning.kernels.backends import default_backend
from nz_lightning.lm.checkpointing import enable_activation_checkpointing
from nz_lightning.optim import fused_optimizer
from nz_lightning.tensor.convert import compress_model
from nz_lightning.tensor.parameter import is_compressed

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")


def build_on_device(kind: str, compressed: bool = False, checkpointing: bool = False) -> Any:
    """The helpers' tiny model ``kind`` (same seed, same values) moved to the GPU, then optionally compressed."""
    from tests.helpers.models import build

    model = build(kind).to(DEVICE)
    if checkpointing:
        enable_activation_checkpointing(model)
    return compress_model(model) if compressed else model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "act-ckpt"])
@pytest.mark.parametrize("kind", ["llama-bf16", "llama-tied-bf16"])
@pytest.mark.parametrize("rule", ["sgd", "adamw", "adalomo"])
def test_compressed_training_bit_identical_on_cuda(rule: str, kind: str, checkpointing: bool) -> None:
    from tests.helpers.models import RULE_LR, assert_same_state, batches, snapshot, train

    dense = build_on_device(kind, checkpointing=checkpointing)
    comp = build_on_device(kind, compressed=True, checkpointing=checkpointing)
    compressed = [(n, p) for n, p in comp.named_parameters() if is_compressed(p)]
    assert compressed and all(p.device.type == DEVICE.type for _, p in compressed)
    assert default_backend(DEVICE) == "triton"  # what the compressed weights decode and encode with
    before = snapshot(comp)
    data = [b.to(DEVICE) for b in batches(4)]
    losses = [train(m, fused_optimizer(m, rule, lr=RULE_LR[rule]), data) for m in (dense, comp)]
    assert losses[0] == losses[1]
    assert_same_state(dense, comp)
    after = comp.state_dict()
    for name, _ in compressed:
        assert not torch.equal(after[name], before[name]), f"{name} did not change"
    assert all(p.grad is None for p in comp.parameters())


def test_compressed_training_with_options_bit_identical_on_cuda() -> None:
    from tests.helpers.models import assert_same_state, batches, train

    options: dict[str, Any] = {"max_grad_norm": 0.5, "accumulate_grad_batches": 2, "stochastic_rounding": True}
    dense, comp = build_on_device("llama-bf16"), build_on_device("llama-bf16", compressed=True)
    data = [b.to(DEVICE) for b in batches(4)]
    losses = [train(m, fused_optimizer(m, "adamw", lr=1e-2, seed=3, **options), data) for m in (dense, comp)]
    assert losses[0] == losses[1]
    assert_same_state(dense, comp)


@pytest.mark.parametrize("layout", ["one-block", "row-blocks+prefetch"])
def test_deferred_reencodes_on_cuda_write_the_same_bytes(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the fused update's re-encode is deferred by default (pinned histogram copy, event, encoder on the
    starting stream): the same bytes as encoding at once, also for weights held as row blocks with decode-ahead on
    its side stream."""
    import contextlib

    from nz_lightning.tensor import workspace
    from nz_lightning.tensor.deferred_encode import ENCODES
    from nz_lightning.tensor.prefetch import prefetch_decodes
    from tests.helpers.models import batches, train

    if layout != "one-block":
        monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", 4096)  # every projection of the tiny Llama in 2+ blocks
    assert ENCODES.depth is None and ENCODES.depth_for(DEVICE) == 1
    data = [b.to(DEVICE) for b in batches(3)]
    blobs, losses, deferred = [], [], ENCODES.deferred
    try:
        for depth in (0, None):
            ENCODES.depth = depth
            comp = build_on_device("llama-bf16", compressed=True)
            opt = fused_optimizer(comp, "adamw", lr=1e-2, max_grad_norm=1.0)
            with prefetch_decodes() if layout != "one-block" else contextlib.nullcontext():
                losses.append(train(comp, opt, data))
            assert ENCODES.pending == 0
            blobs.append([p.store.to_blobs() for p in comp.parameters() if is_compressed(p)])
    finally:
        ENCODES.depth = None
    assert losses[0] == losses[1] and blobs[0] == blobs[1]
    assert ENCODES.deferred > deferred
