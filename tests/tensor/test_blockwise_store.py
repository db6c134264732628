"""Row-block WeightStore: exact decode, block-wise fused updates bit-identical to dense twins, checkpoints, errors."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

import nz_lightning.tensor.workspace as workspace
from nz_lightning.kernels import compress
from nz_lightning.lightning.checkpoint_io import compressed_state_dict, load_state_dict, pack_blobs, unpack_blobs
from nz_lightning.optim import blockwise, fused_optimizer
from nz_lightning.tensor.parameter import WeightStore, is_compressed, make_parameter
from nz_lightning.tensor.sync_count import count_host_syncs
from nz_lightning.tensor.workspace import CODEC_STATS
from tests.helpers.models import RULE_LR, assert_same_state, batches, build, check_resume, train

BLOCK_BYTES = 3000  # 23 rows of a 64-wide bf16 matrix: uneven blocks with a short last one


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", BLOCK_BYTES)


def _multi_block(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if is_compressed(p) and len(p.store.blocks) > 1}


# -- the store --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 19), (50, 3, 5), (300,), ()])
def test_decode_is_exact_and_block_wise(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    value = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    if value.numel() > 4:
        value.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40]).to(dtype)
    store = WeightStore(value, row_block_bytes=64)
    rows = shape[0] if shape else 1
    row_bytes = value[0].numel() * value.element_size() if shape else 0
    expected = max(1, -(-rows // max(1, 64 // row_bytes))) if shape and rows * row_bytes > 64 else 1
    assert len(store.blocks) == len(store.bounds) == expected
    assert store.bounds[0][0] == 0 and store.bounds[-1][1] == rows
    out = torch.empty_like(value)
    assert store.decode_into(out) is out
    assert torch.equal(out.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))  # NaN payloads too
    assert store.shape == value.shape and store.dtype == dtype
    assert store.serialized_nbytes == sum(len(b) for b in store.to_blobs())
    if len(store.blocks) > 1:
        with pytest.raises(AttributeError, match="row blocks"):
            _ = store.ct
    else:
        assert store.ct is store.blocks[0]


def test_from_blobs_round_trip_and_validation() -> None:
    value = torch.randn(40, 16).to(torch.bfloat16)
    store = WeightStore(value, row_block_bytes=256)
    again = WeightStore.from_blobs(store.to_blobs())
    assert again.bounds == store.bounds and torch.equal(again.read(), value)
    assert WeightStore.from_blobs([compress(value).to_bytes()]).bounds == [(0, 40)]  # any split is accepted
    parts = [compress(value[:8]).to_bytes(), compress(value[8:]).to_bytes()]
    assert torch.equal(WeightStore.from_blobs(parts).read(), value)
    with pytest.raises(ValueError, match="at least one block"):
        WeightStore.from_blobs([])
    with pytest.raises(ValueError, match="same dtype and trailing dims"):
        WeightStore.from_blobs([parts[0], compress(value[8:].float()).to_bytes()])
    with pytest.raises(ValueError, match="same dtype and trailing dims"):
        WeightStore.from_blobs([parts[0], compress(torch.randn(4, 15).to(torch.bfloat16)).to_bytes()])
    with pytest.raises(ValueError, match="same dtype and trailing dims"):
        WeightStore.from_blobs([parts[0], compress(torch.randn(4, 16, 1).to(torch.bfloat16)).to_bytes()])
    with pytest.raises(ValueError):
        WeightStore.from_blobs([parts[0][:-3]])  # truncated blob
    with pytest.raises(ValueError, match="blocks hold a"):
        store.set_blocks(WeightStore(value[:20], row_block_bytes=256).blocks)  # another shape
    with pytest.raises(ValueError, match="block 0 is"):
        store.write_block(0, value[:1])


def test_lossy_store_is_one_block() -> None:
    value = torch.randn(64, 64).to(torch.bfloat16)
    store = WeightStore(value, mantissa_bits=3, row_block_bytes=256)
    assert store.lossy and len(store.blocks) == 1
    with pytest.raises(ValueError, match="lossy"):
        WeightStore.from_blobs(WeightStore(value, row_block_bytes=256).to_blobs(), mantissa_bits=3)


def test_pack_unpack_blobs() -> None:
    blobs = WeightStore(torch.randn(30, 8), row_block_bytes=100).to_blobs()
    assert [bytes(b) for b in unpack_blobs(pack_blobs(blobs))] == blobs
    assert pack_blobs(blobs[:1]) == blobs[0] and [bytes(b) for b in unpack_blobs(blobs[0])] == blobs[:1]
    with pytest.raises(ValueError, match="do not add up"):
        unpack_blobs(pack_blobs(blobs)[:-1])


def test_embedding_gathers_only_the_blocks_it_needs() -> None:
    table = torch.randn(70, 8).to(torch.bfloat16)
    weight = make_parameter(table)
    weight.store.write(table)  # default split: one block
    store = WeightStore(table, row_block_bytes=10 * 16)  # 10 rows per block
    weight.store.set_blocks(store.blocks)
    ids = torch.tensor([[3, 3, 9], [0, 1, 2]])
    CODEC_STATS.reset()
    out = nn.functional.embedding(ids, weight)
    assert torch.equal(out, nn.functional.embedding(ids, table)) and CODEC_STATS.decodes == 1
    ids = torch.tensor([69, 0, 35, 12])
    assert torch.equal(nn.functional.embedding(ids, weight), table[ids])
    for bad in ([70], [3, -1]):
        with pytest.raises(IndexError, match="out of range"):
            nn.functional.embedding(torch.tensor(bad), weight)
    assert nn.functional.embedding(torch.zeros(2, 0, dtype=torch.int64), weight).shape == (2, 0, 8)


def test_embedding_lookup_reads_back_once_whatever_the_blocks() -> None:
    table = torch.randn(70, 8).to(torch.bfloat16)
    weight = make_parameter(table)
    weight.store.set_blocks(WeightStore(table, row_block_bytes=5 * 16).blocks)  # 14 blocks of 5 rows
    ids = torch.randint(0, 70, (3, 40), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    for idx in (ids, ids.to(torch.int32), ids.flip(-1)[:, ::3]):
        with count_host_syncs() as syncs:
            out = nn.functional.embedding(idx, weight)
        assert syncs.total == 1 and syncs.by_op() == {"Tensor.tolist": 1}, syncs.summary()
        assert torch.equal(out.view(torch.int16), table[idx.long()].view(torch.int16))


# -- fused training ---------------------------------------------------------------------------------------------


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "momentum": ("sgd", {"momentum": 0.9, "weight_decay": 0.1, "nesterov": True}),
    "adamw": ("adamw", {}),
    "adalomo": ("adalomo", {"weight_decay": 0.01}),
    "adalomo-noscale": ("adalomo", {"scale_parameter": False}),
    "sgd-clip": ("sgd", {"max_grad_norm": 0.05}),
    "adalomo-clip": ("adalomo", {"max_grad_norm": 0.05}),
    "accum-clip": ("adamw", {"accumulate_grad_batches": 2, "max_grad_norm": 0.5}),
    "sr": ("adamw", {"stochastic_rounding": True, "seed": 7}),
}


@pytest.mark.parametrize(
    ("kind", "case"), [*(("llama-tied-bf16", c) for c in CASES), ("gpt2-fp32", "momentum"), ("gpt2-fp32", "adalomo")]
)
@pytest.mark.usefixtures("small_blocks")
def test_block_wise_training_bit_identical(kind: str, case: str) -> None:
    rule, options = CASES[case]
    dense, comp, data = build(kind), build(kind, compressed=True), batches(3)
    assert _multi_block(comp)
    losses = [train(m, fused_optimizer(m, rule, lr=RULE_LR[rule], **options), data) for m in (dense, comp)]
    assert losses[0] == losses[1]
    assert_same_state(dense, comp)


@pytest.mark.usefixtures("small_blocks")
def test_training_after_an_inference_mode_forward() -> None:
    """Decode buffers pooled under ``torch.inference_mode`` (Lightning's validate) stay writable for the updates."""
    workspace.DECODE_POOL.clear()
    dense, comp, data = build("gpt2-fp32"), build("gpt2-fp32", compressed=True), batches(3)
    with torch.inference_mode():
        comp(input_ids=data[0], labels=data[0])
    pooled = [b for bufs in workspace.DECODE_POOL._free.values() for b in bufs]
    assert pooled and not any(b.is_inference() for b in pooled)
    rule, options = CASES["momentum"]
    losses = [train(m, fused_optimizer(m, rule, lr=RULE_LR[rule], **options), data) for m in (dense, comp)]
    assert losses[0] == losses[1]
    assert_same_state(dense, comp)


@pytest.mark.parametrize("case", ["adamw", "adalomo", "adalomo-clip", "sr"])
def test_block_wise_equals_whole_matrix_formula(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32-math rules give the same bits split or not (SGD on bf16 does not: torch's bf16 add rounds its scalar
    tail differently, which is why dense parameters take the same split); SR noise does not depend on the split."""
    rule, options = CASES[case]
    monkeypatch.setattr(blockwise, "SR_CHUNK", 100)
    whole, data = build("llama-bf16", compressed=True), batches(3)
    monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", BLOCK_BYTES)
    split = build("llama-bf16", compressed=True)
    assert _multi_block(split) and not _multi_block(whole)
    # the blocked head's sums follow the split by design: this test is about the update alone
    opts = [fused_optimizer(m, rule, lr=RULE_LR[rule], blocked_head=False, **options) for m in (whole, split)]
    losses = [train(m, opt, data) for m, opt in zip((whole, split), opts, strict=True)]
    assert losses[0] == losses[1]
    assert_same_state(whole, split)


@pytest.mark.usefixtures("small_blocks")
def test_update_never_materializes_the_whole_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("llama-bf16", compressed=True)
    opt = fused_optimizer(model, "sgd", lr=0.1, momentum=0.9)
    p = model.model.embed_tokens.weight
    store, sizes = p.store, []
    monkeypatch.setattr(store, "read", lambda: pytest.fail("full read"))
    monkeypatch.setattr(store, "decode_into", lambda out: pytest.fail("full decode"))
    monkeypatch.setattr(store, "write", lambda value: pytest.fail("full write"))
    real = store.decode_block
    monkeypatch.setattr(store, "decode_block", lambda k, out=None: sizes.append(out.numel()) or real(k, out))
    opt._apply(p, opt._index[id(p)], torch.randn(p.shape).to(p.dtype))
    assert len(sizes) == len(store.blocks) > 1 and max(sizes) * p.element_size() <= BLOCK_BYTES


@pytest.mark.parametrize("rule", ["sgd", "adamw", "adalomo"])
@pytest.mark.usefixtures("small_blocks")
def test_state_dict_round_trip(rule: str) -> None:
    options = {"sgd": {"momentum": 0.9}, "adamw": {"stochastic_rounding": True}, "adalomo": {}}[rule]
    check_resume(rule, options, RULE_LR[rule])


@pytest.mark.usefixtures("small_blocks")
def test_compressed_checkpoint_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = build("llama-bf16", compressed=True), batches(4)
    opt = fused_optimizer(model, "adamw", lr=1e-2)
    train(model, opt, data[:2])
    buf = io.BytesIO()
    torch.save(compressed_state_dict(model), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = build("llama-bf16", compressed=True)
    load_state_dict(fresh, saved)
    assert_same_state(model, fresh)
    for (_, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        if is_compressed(a):
            assert a.store.bounds == b.store.bounds and a.store.to_blobs() == b.store.to_blobs()
    dense = build("llama-bf16")
    load_state_dict(dense, saved)  # row-block containers decode into dense parameters
    assert_same_state(model, dense)
    fresh_opt = fused_optimizer(fresh, "adamw", lr=1e-2)
    fresh_opt.load_state_dict(opt.state_dict())
    assert train(fresh, fresh_opt, data[2:]) == train(model, opt, data[2:])

    monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", 1 << 30)
    old_format = compressed_state_dict(build("llama-bf16", compressed=True))  # one plain blob per weight
    blobs = [v for v in old_format.values() if v.dtype == torch.uint8]
    assert blobs and all(bytes(v[:4].tolist()) == b"NZCT" for v in blobs)
    monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", BLOCK_BYTES)
    target = build("llama-bf16", compressed=True)
    load_state_dict(target, old_format)
    assert_same_state(target, build("llama-bf16"))
    train(target, fused_optimizer(target, "sgd", lr=0.1), data[:1])  # keeps the saved split and trains
