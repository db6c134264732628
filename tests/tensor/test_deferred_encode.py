"""Deferred re-encodes (``nz_lightning.tensor.deferred_encode``): the same bits, no blocking read while encoding."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from nz_lightning.optim import fused_optimizer
from nz_lightning.tensor import workspace
from nz_lightning.tensor.convert import compress_model
from nz_lightning.tensor.deferred_encode import ENCODES
from nz_lightning.tensor.parameter import NZParameter, WeightStore
from nz_lightning.tensor.sync_count import count_host_syncs
from nz_lightning.tensor.workspace import CODEC_STATS, row_block
from tests.helpers.models import MlpLM, assert_same_state, batches, build, loss_of, train


@pytest.fixture(autouse=True)
def _restore_depth() -> Iterator[None]:
    was = ENCODES.depth
    yield
    ENCODES.depth = was
    ENCODES.finish_all()


def _blobs(model: torch.nn.Module) -> list[list[bytes]]:
    return [p.store.to_blobs() for p in model.parameters() if isinstance(p, NZParameter)]


def _run(kind: str, rule: str, lr: float, depth: int, **options: object) -> tuple[list[float], torch.nn.Module]:
    ENCODES.depth = depth
    model = build(kind, compressed=True)
    opt = fused_optimizer(model, rule, lr=lr, **options)  # type: ignore[arg-type]
    losses = train(model, opt, batches(3))
    assert ENCODES.pending == 0  # every deferred encode is finished when the backward returns
    return losses, model


@pytest.mark.parametrize(
    ("kind", "rule", "lr", "options"),
    [
        ("llama-bf16", "sgd", 0.5, {}),
        ("llama-tied-bf16", "adamw", 1e-2, {"max_grad_norm": 1.0}),
        ("mlp-bf16", "adalomo", 1e-2, {"accumulate_grad_batches": 2}),
        ("mlp-fp32", "adamw", 1e-2, {"max_grad_norm": 1.0, "accumulate_grad_batches": 2}),
    ],
)
@pytest.mark.parametrize("row_block_bytes", [None, 1500])
def test_deferred_reencodes_train_bit_identically(
    kind: str,
    rule: str,
    lr: float,
    options: dict[str, object],
    row_block_bytes: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if row_block_bytes is not None:  # weights held as several row blocks: updated (and re-encoded) block by block
        monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", row_block_bytes)
    sync_losses, sync_model = _run(kind, rule, lr, 0, **options)
    deferred = ENCODES.deferred
    for depth in (1, 3):
        losses, model = _run(kind, rule, lr, depth, **options)
        assert losses == sync_losses
        assert_same_state(model, sync_model)
        assert _blobs(model) == _blobs(sync_model)  # the very same bytes, not only the same values
    assert ENCODES.deferred > deferred


def test_pending_encodes_stay_within_depth_and_finish_in_order() -> None:
    ENCODES.depth = 2
    torch.manual_seed(0)
    model = compress_model(MlpLM().to(torch.bfloat16), backend="torch")
    opt = fused_optimizer(model, "sgd", lr=0.1)
    seen: list[int] = []
    for p in model.parameters():  # runs after the fused update's hook (registered first)
        p.register_post_accumulate_grad_hook(lambda _: seen.append(ENCODES.pending))
    CODEC_STATS.reset()
    opt.backward(loss_of(model, batches(1)[0]))
    assert len(seen) == 5 and seen[-1] == 2 and max(seen) == 2, seen  # never more than depth left pending
    assert ENCODES.pending == 0
    assert CODEC_STATS.encodes == sum(len(p.store.blocks) for p in model.parameters() if isinstance(p, NZParameter))


def test_a_read_of_the_store_finishes_its_pending_encode() -> None:
    ENCODES.depth = 4
    first, second = torch.randn(32, 16).to(torch.bfloat16), torch.randn(32, 16).to(torch.bfloat16)
    store = WeightStore(first, "torch")
    with ENCODES.deferring():
        scratch = second.clone()
        store.write(scratch)
        scratch.zero_()  # the caller may reuse its buffer at once (the pending encode holds a copy)
        assert ENCODES.pending == 1 and store._pending
        assert torch.equal(store.read().view(torch.int16), second.view(torch.int16))  # finished by the read
        assert ENCODES.pending == 0 and not store._pending
        store.write(first)
        store.write(second)  # supersedes the first pending write, which is never finished into the store
        assert ENCODES.pending == 1
    assert torch.equal(store.read().view(torch.int16), second.view(torch.int16))
    assert store.to_blobs() == WeightStore(second, "torch").to_blobs()


def test_an_error_in_backward_still_finishes_started_encodes() -> None:
    ENCODES.depth = 8
    store = WeightStore(torch.randn(8, 8), "torch")
    value = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match="boom"), ENCODES.deferring():
        store.write(value)
        raise RuntimeError("boom")
    assert not store._pending and torch.equal(store.ct.decompress(), value)


def test_off_the_fused_backward_and_for_lossy_stores_encodes_are_synchronous() -> None:
    ENCODES.depth = 4
    store = WeightStore(torch.randn(8, 8).to(torch.bfloat16), "torch")
    store.write(torch.randn(8, 8).to(torch.bfloat16))  # outside a fused backward
    assert not store._pending
    lossy = WeightStore(torch.randn(8, 8).to(torch.bfloat16), "torch", mantissa_bits=3)
    with ENCODES.deferring():
        lossy.write(torch.randn(8, 8).to(torch.bfloat16))
        assert not lossy._pending


def test_depth_defaults_to_deferring_on_cuda_only() -> None:
    ENCODES.depth = None
    assert ENCODES.depth_for(torch.device("cuda", 0)) == 1
    assert ENCODES.depth_for(torch.device("cpu")) == 0
    ENCODES.depth = 0
    assert ENCODES.depth_for(torch.device("cuda", 0)) == 0


def test_triton_step_reads_the_histogram_only_through_the_deferred_copy() -> None:
    ENCODES.depth = 1
    torch.manual_seed(0)
    model = compress_model(MlpLM().to(torch.bfloat16), backend="triton")
    opt = fused_optimizer(model, "adamw", lr=1e-2, max_grad_norm=1.0)
    first, second = batches(2)
    opt.backward(loss_of(model, first))
    with count_host_syncs() as syncs:
        opt.backward(loss_of(model, second))
    assert syncs.decodes > 0 and syncs.encodes > 0
    assert syncs.count("decode") == syncs.count("update") == syncs.count("other") == 0, syncs.summary()
    assert syncs.count("encode") == 0, syncs.summary()  # no blocking read while encoding
    assert syncs.by_op("deferred") == {"Tensor.tolist": syncs.encodes}, syncs.summary()  # one pinned-buffer read each


def test_decoding_a_block_leaves_the_other_blocks_encodes_pending() -> None:
    ENCODES.depth = 8
    value = torch.randn(40, 8).to(torch.bfloat16)
    store = WeightStore(value, "torch", row_block_bytes=10 * 16)  # 4 blocks of 10 rows
    new = value * 2
    with ENCODES.deferring():
        for k in range(4):  # what a block-wise update does: decode block k, update it, write it back
            store.decode_block(k)
            store.write_block(k, row_block(new, store.bounds, k))
            assert sorted(store._pending) == list(range(k + 1))  # earlier blocks' encodes are still pending
        assert ENCODES.pending == 4
    assert not store._pending and torch.equal(store.read().view(torch.int16), new.view(torch.int16))


def test_the_oldest_encode_is_finished_first() -> None:
    ENCODES.depth = 2
    stores = [WeightStore(torch.randn(8, 8), "torch") for _ in range(3)]
    with ENCODES.deferring():
        for st in stores:
            st.write(torch.randn(8, 8))
        assert [bool(st._pending) for st in stores] == [False, True, True]


def test_a_failing_encode_does_not_hide_the_backward_error_nor_stop_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    ENCODES.depth = 8
    good, bad = WeightStore(torch.randn(8, 8), "torch"), WeightStore(torch.randn(8, 8), "torch")
    value = torch.randn(8, 8)
    with ENCODES.deferring():
        bad.write(torch.randn(8, 8))
        good.write(value)
        failing = bad._pending[0]
        monkeypatch.setattr(failing, "result", lambda: (_ for _ in ()).throw(RuntimeError("encoder failed")))
        with pytest.raises(RuntimeError, match="boom"), ENCODES.deferring():
            raise RuntimeError("boom")  # an inner pass's own error wins over the encode's
        assert bad._pending and not good._pending  # the others were finished anyway
    assert torch.equal(good.read(), value)
    with pytest.raises(RuntimeError, match="encoder failed"):  # still pending in its store: its next read retries
        bad.read()


def test_a_failing_encode_is_raised_when_the_backward_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    ENCODES.depth = 8
    store = WeightStore(torch.randn(8, 8), "torch")
    with pytest.raises(RuntimeError, match="encoder failed"), ENCODES.deferring():
        store.write(torch.randn(8, 8))
        monkeypatch.setattr(store._pending[0], "result", lambda: (_ for _ in ()).throw(RuntimeError("encoder failed")))
