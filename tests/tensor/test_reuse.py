"""The fused update reuses the decode of its weight's backward op (``nz_lightning.tensor.reuse``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from nz_lightning.lm.checkpointing import enable_activation_checkpointing
from nz_lightning.optim import fused_optimizer
from nz_lightning.tensor.convert import compress_model
from nz_lightning.tensor.parameter import NZParameter, WeightStore
from nz_lightning.tensor.reuse import REUSE
from nz_lightning.tensor.sync_count import count_host_syncs
from nz_lightning.tensor.workspace import CODEC_STATS, DECODE_POOL
from tests.helpers.models import assert_same_state, batches, build, llama, train


@pytest.fixture(autouse=True)
def _reuse_on() -> Iterator[None]:
    was = REUSE.enabled
    REUSE.enabled = True
    REUSE.drop()
    yield
    REUSE.enabled = was
    REUSE.drop()


def _run(kind: str, rule: str, lr: float, reuse: bool, **options: object) -> tuple[list[float], torch.nn.Module, int]:
    REUSE.enabled = reuse
    model = build(kind, compressed=True)
    opt = fused_optimizer(model, rule, lr=lr, **options)  # type: ignore[arg-type]
    CODEC_STATS.reset()
    losses = train(model, opt, batches(3))
    return losses, model, CODEC_STATS.decodes


@pytest.mark.parametrize(
    ("kind", "rule", "lr", "options"),
    [
        ("llama-bf16", "sgd", 0.5, {}),
        ("llama-tied-bf16", "adamw", 1e-2, {"max_grad_norm": 1.0}),
        ("mlp-bf16", "adalomo", 1e-2, {}),
    ],
)
def test_reuse_is_bit_identical_and_saves_decodes(kind: str, rule: str, lr: float, options: dict[str, object]) -> None:
    off_losses, off_model, off_decodes = _run(kind, rule, lr, False, **options)
    hits = REUSE.hits
    on_losses, on_model, on_decodes = _run(kind, rule, lr, True, **options)
    hits = REUSE.hits - hits
    assert on_losses == off_losses
    assert_same_state(on_model, off_model)
    # each decoder projection's update is served on every step (the embedding's backward decodes nothing; a blocked
    # head is updated block by block); the norm pass of clipping decodes in backward but takes nothing
    names = [n for n, p in on_model.named_parameters() if isinstance(p, NZParameter) and len(p.store.blocks) == 1]
    projections = sum(1 for n in names if ".layers." in n)
    assert hits >= 3 * projections and hits % 3 == 0 and hits > 0, (hits, names)
    assert on_decodes == off_decodes - hits
    assert REUSE.held == 0  # dropped at the end of every backward


@pytest.mark.parametrize(("rule", "options"), [("adamw", {"max_grad_norm": 1.0}), ("adalomo", {})])
def test_weights_held_as_row_blocks_are_served_block_by_block(
    rule: str, options: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nz_lightning.tensor import workspace

    monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", 1500)  # every projection of the tiny Llama in 2-6 blocks
    monkeypatch.setattr(REUSE, "row_blocks", False)
    hits = REUSE.hits
    default_losses, _, default_decodes = _run("llama-bf16", rule, 1e-2, True, **options)
    assert REUSE.hits == hits  # off by default: no multi-block weight is held
    monkeypatch.setattr(REUSE, "row_blocks", True)
    off_losses, off_model, off_decodes = _run("llama-bf16", rule, 1e-2, False, **options)
    assert default_losses == off_losses and default_decodes == off_decodes
    hits = REUSE.hits
    on_losses, on_model, on_decodes = _run("llama-bf16", rule, 1e-2, True, **options)
    hits = REUSE.hits - hits
    assert on_losses == off_losses
    assert_same_state(on_model, off_model)
    blocks = {n: len(p.store.blocks) for n, p in on_model.named_parameters() if isinstance(p, NZParameter)}
    assert min(blocks[n] for n in blocks if ".layers." in n) >= 2
    assert hits > 0 and off_decodes - on_decodes > hits  # each hit saves every block's decode
    assert REUSE.held == 0


def _offer_in_backward(store: WeightStore, keep: bool = True) -> None:
    """Decode ``store`` into a pooled buffer and offer it from inside a backward pass (as an op there would)."""
    x = torch.ones(2, requires_grad=True)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        view, base = DECODE_POOL.acquire(store.shape, store.dtype, store.device)
        REUSE.offer(store, store.decode_into(view), base, keep=keep)
        return grad

    x.register_hook(hook)
    (x * 2).sum().backward()


def test_only_the_current_value_of_the_same_store_is_served() -> None:
    value = torch.randn(16, 8).to(torch.bfloat16)
    store, other = WeightStore(value), WeightStore(value.clone())
    with REUSE.holding():
        _offer_in_backward(store)
        assert REUSE.take(other) is None  # another store: not served (and the held value stays)
        got = REUSE.take(store)
        assert got is not None and torch.equal(got[0], value)
        DECODE_POOL.release(got[1])
        assert REUSE.take(store) is None  # taken once

        _offer_in_backward(store)
        store.write(value * 2)  # re-encoded since the decode: stale
        assert REUSE.take(store) is None

        _offer_in_backward(store)
        assert REUSE.held == 1
    assert REUSE.held == 0  # dropped when the holding block ends


def test_what_is_not_held() -> None:
    store = WeightStore(torch.randn(16, 8).to(torch.bfloat16))
    with REUSE.holding():
        view, base = DECODE_POOL.acquire(store.shape, store.dtype, store.device)
        REUSE.offer(store, store.decode_into(view), base)  # not in backward
        assert REUSE.held == 0 and REUSE.take(store) is None

        blocked = WeightStore(torch.randn(64, 8).to(torch.bfloat16), row_block_bytes=64)
        assert len(blocked.blocks) > 1
        _offer_in_backward(blocked)  # several row blocks: not held by default
        assert REUSE.held == 0
        REUSE.row_blocks = True
        try:
            _offer_in_backward(blocked)  # held when asked (the update reads it block by block)
            taken = REUSE.take(blocked)
            assert taken is not None and torch.equal(taken[0], blocked.read())
            DECODE_POOL.release(taken[1])
        finally:
            REUSE.row_blocks = False
        _offer_in_backward(store, keep=False)  # an op wrote into the buffer
        assert REUSE.held == 0
        REUSE.enabled = False
        _offer_in_backward(store)
        assert REUSE.held == 0
    REUSE.enabled = True
    _offer_in_backward(store)  # a backward outside any fused optimizer's (nothing would drop it)
    assert REUSE.held == 0


def test_reuse_adds_no_host_sync() -> None:
    torch.manual_seed(0)
    model = compress_model(llama().to(torch.bfloat16), backend="torch")  # a device-like backend (not numba)
    opt = fused_optimizer(model, "sgd", lr=0.5)
    data = batches(2)
    train(model, opt, data[:1])
    hits = REUSE.hits
    with count_host_syncs() as syncs:
        opt.backward(model(input_ids=data[1], labels=data[1]).loss)
    assert REUSE.hits > hits
    assert syncs.count("decode") == syncs.count("update") == 0, syncs.summary()


def _run_checkpointed(reuse: bool, capacity: int) -> tuple[list[float], torch.nn.Module, int]:
    REUSE.enabled = reuse
    was = REUSE.capacity
    REUSE.capacity = capacity
    try:
        model = build("llama-bf16", compressed=True)
        enable_activation_checkpointing(model)
        model.train()
        opt = fused_optimizer(model, "sgd", lr=0.5)
        CODEC_STATS.reset()
        losses = train(model, opt, batches(3))
        return losses, model, CODEC_STATS.decodes
    finally:
        REUSE.capacity = was


def test_checkpointed_blocks_serve_backward_ops_from_their_recompute() -> None:
    """Under activation checkpointing the recomputed forward decodes each weight again in backward: a held decode
    serves the backward op (and then the update) instead of a third decode, bit-identically."""
    with torch.utils.checkpoint.set_checkpoint_early_stop(True):  # the default, pinned: the counts below depend on it
        off_losses, off_model, off_decodes = _run_checkpointed(False, 1)
        hits = REUSE.hits
        one_losses, one_model, one_decodes = _run_checkpointed(True, 1)
        one_hits, hits = REUSE.hits - hits, REUSE.hits
        many_losses, many_model, many_decodes = _run_checkpointed(True, 8)
        many_hits = REUSE.hits - hits
    assert off_losses == one_losses == many_losses
    assert_same_state(one_model, off_model)
    assert_same_state(many_model, off_model)
    projections = [n for n, p in off_model.named_parameters() if isinstance(p, NZParameter) and ".layers." in n]
    blocks, steps = len(off_model.model.layers), 3
    # capacity 1 (default): every update is served, no backward op (its own decode evicts the recomputed one; with
    # early stop the recompute ends before down_proj, whose backward op decodes it)
    assert one_hits == steps * len(projections), (one_hits, len(projections))
    # capacity 8 (a block's 7 projections fit): the backward op of every recomputed projection is served too
    assert many_hits == one_hits + steps * (len(projections) - blocks), (many_hits, len(projections))
    assert one_decodes == off_decodes - one_hits and many_decodes == off_decodes - many_hits
    assert REUSE.held == 0
    # with decode-ahead on too: the same bits, and still fewer decodes than without reuse (a backward op's held
    # decode is preferred to a prefetch, and a weight REUSE holds is not prefetched in backward; some prefetches of
    # the recompute are still made and then not needed)
    from nz_lightning.tensor.prefetch import prefetch_decodes

    with torch.utils.checkpoint.set_checkpoint_early_stop(True), prefetch_decodes():
        ahead_losses, _, ahead_decodes = _run_checkpointed(True, 8)
    assert ahead_losses == off_losses and ahead_decodes < off_decodes, (ahead_decodes, off_decodes)
