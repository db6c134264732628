"""Heads and embeddings split into row parts (``nz_lightning.distributed.row_split``): exact modules, checkpoint names,
and FSDP2 training with each part a unit of its own (2 gloo processes)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from nz_lightning.distributed.fsdp_units import select_units
from nz_lightning.distributed.row_split import (
    ROW_ALIGN,
    RowSplitEmbedding,
    RowSplitLinear,
    UnitSplitter,
    merge_split_state,
    split_rows,
    split_split_state,
)
from nz_lightning.tensor.convert import compress_model
from tests.helpers.distributed import check_ranks, run_ranks
from tests.helpers.models import llama


def test_embedding_parts_are_exactly_the_embedding_forward_and_backward() -> None:
    torch.manual_seed(0)
    whole = nn.Embedding(300, 16, padding_idx=200)
    split = split_rows(whole, cap=64 * 16 * 4)  # 64 rows per part
    assert isinstance(split, RowSplitEmbedding)
    assert [p.num_embeddings for p in split.parts] == [64, 64, 64, 64, 44]
    assert [p.padding_idx for p in split.parts] == [None, None, None, 8, None]
    ids = torch.tensor([[0, 63, 64, 200, 299], [128, 5, 255, 256, 1]])
    torch.testing.assert_close(split(ids), whole(ids), rtol=0, atol=0)
    grad = torch.randn(2, 5, 16)
    whole(ids).backward(grad)
    split(ids).backward(grad)
    merged = torch.cat([p.weight.grad for p in split.parts])
    assert torch.equal(merged, whole.weight.grad)  # the padding row gets no gradient in either
    with pytest.raises(RuntimeError, match="out of range"):
        split(torch.tensor([300]))


def test_linear_parts_give_the_linear_output_and_gradients() -> None:
    torch.manual_seed(0)
    whole = nn.Linear(16, 256)
    split = split_rows(whole, cap=128 * 16 * 4)
    assert isinstance(split, RowSplitLinear) and len(split.parts) == 2 and split.out_features == 256
    x = torch.randn(3, 16, requires_grad=True)
    torch.testing.assert_close(split(x), whole(x))
    g = torch.randn(3, 256)
    (gx_whole,) = torch.autograd.grad(whole(x), x, g)
    (gx_split,) = torch.autograd.grad(split(x), x, g)
    torch.testing.assert_close(gx_split, gx_whole)
    assert torch.equal(torch.cat([p.bias for p in split.parts]), whole.bias)


def test_a_split_heads_bf16_input_gradient_is_summed_in_fp32() -> None:
    torch.manual_seed(0)
    whole = nn.Linear(256, 4096, bias=False).to(torch.bfloat16)
    split = split_rows(whole, cap=256 * 256 * 2)  # 16 parts
    assert isinstance(split, RowSplitLinear) and len(split.parts) == 16
    x = torch.randn(64, 256).to(torch.bfloat16).requires_grad_()
    g = torch.randn(64, 4096).to(torch.bfloat16)
    exact = g.double() @ whole.weight.double()
    (gx_split,) = torch.autograd.grad(split(x), x, g)
    (gx_whole,) = torch.autograd.grad(whole(x), x, g)
    partial = sum(gi @ p.weight for gi, p in zip(g.split(256, dim=-1), split.parts, strict=True))  # bf16 sums
    assert gx_split.dtype == torch.bfloat16 and torch.equal(split(x), whole(x))
    err = {k: (v.double() - exact).norm().item() for k, v in {"split": gx_split, "whole": gx_whole}.items()}
    err["bf16 sum"] = (partial.double() - exact).norm().item()
    assert err["split"] < 0.6 * err["bf16 sum"] and err["split"] < 1.6 * err["whole"], err
    xf = x.detach().float().requires_grad_()  # fp32 input: summed by autograd as before
    (gx_fp32,) = torch.autograd.grad(split.float()(xf), xf, g.float())
    torch.testing.assert_close(gx_fp32, g.float() @ whole.weight.float())


def test_compressed_weights_are_decoded_into_the_parts() -> None:
    model = nn.Sequential(nn.Linear(8, 256, bias=False)).to(torch.bfloat16)
    dense = model[0].weight.detach().clone()
    compress_model(model, include=["*"])
    split = split_rows(model[0], cap=64 * 8 * 2)
    assert isinstance(split, RowSplitLinear)
    assert torch.equal(torch.cat([p.weight.detach() for p in split.parts]), dense)


def test_what_is_not_split() -> None:
    small = nn.Linear(8, 256)
    assert split_rows(small, cap=256 * 8 * 4) is small  # fits the cap
    assert split_rows(small, cap=0) is small
    narrow = nn.Linear(8, 2 * ROW_ALIGN - 1)
    assert split_rows(narrow, cap=1) is narrow  # fewer rows than two aligned parts
    assert isinstance(split_rows(nn.Linear(8, 2 * ROW_ALIGN), cap=1), RowSplitLinear)

    class Adapter(nn.Linear):
        pass

    adapter = Adapter(8, 256)
    assert split_rows(adapter, cap=1) is adapter  # a subclass may compute something else
    with pytest.raises(ValueError, match="max_norm"):
        split_rows(nn.Embedding(256, 8, max_norm=1.0), cap=1)
    with pytest.raises(ValueError, match="meta"):
        split_rows(nn.Linear(8, 256, device="meta"), cap=1)
    with pytest.raises(ValueError, match="world size 3"):
        split_rows(nn.Linear(8, 1000), cap=1, world=3)


def test_parts_are_aligned_rows_and_the_same_for_power_of_two_world_sizes() -> None:
    rows = [
        [p.out_features for p in split_rows(nn.Linear(4, 1024), cap=300 * 4 * 4, world=w).parts]  # type: ignore[union-attr]
        for w in (1, 2, 8)
    ]
    assert rows[0] == rows[1] == rows[2] == [256, 256, 256, 256]
    assert all(r % ROW_ALIGN == 0 for r in rows[0])


def test_state_dict_names_merge_and_split_back() -> None:
    root = nn.Module()
    root.head = split_rows(nn.Linear(4, 256), cap=128 * 4 * 4)
    state = {k: v.detach() for k, v in root.state_dict().items()}
    assert list(state) == ["head.parts.0.weight", "head.parts.0.bias", "head.parts.1.weight", "head.parts.1.bias"]
    merged = dict(state)
    merge_split_state(root, merged)
    assert list(merged) == ["head.weight", "head.bias"] and merged["head.weight"].shape == (256, 4)
    again = split_split_state(root, merged)
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="rows"):
        split_split_state(root, {"head.weight": torch.zeros(255, 4)})


@pytest.mark.parametrize("units", ["layer", "weight"])
def test_auto_cap_is_the_largest_unit_in_the_blocks(units: str) -> None:
    model = llama()  # vocab 128 x hidden 64: embedding and head 32 KiB in fp32; a layer ~164 KiB; a projection 32
    per_weight = units == "weight"

    def pick(name: str, module: nn.Module) -> bool:
        inner = per_weight and name.endswith("_proj")
        return name in ("model.embed_tokens", "lm_head") or name.count(".") == 2 and "layers" in name or inner

    chosen = select_units(model, pick)
    splitter = UnitSplitter(model, chosen, "auto", world=2)
    projections = [m for n, m in model.named_modules() if n.endswith("_proj")]
    expected = {id(model.model.embed_tokens), id(model.lm_head)} | (
        {id(m) for m in projections} if per_weight else set()
    )
    assert splitter.candidates == expected
    layer_own = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    largest_proj = 64 * 128 * 4  # gate/up/down
    assert splitter.cap == (largest_proj if per_weight else layer_own)
    for m in projections:  # "auto" never splits a projection: the cap is the largest of them
        assert splitter.split("x", m) == [("x", m)]
    with pytest.raises(ValueError, match="split_bytes"):
        UnitSplitter(model, chosen, -1, world=2)
    assert UnitSplitter(model, chosen, None, world=2).cap == 0


def test_an_explicit_cap_splits_projections_that_are_units() -> None:
    model = llama()
    pick = [n for n, _ in model.named_modules() if n.endswith("mlp.up_proj")]
    chosen = select_units(model, pick)
    splitter = UnitSplitter(model, chosen, 64 * 64 * 4, world=2)  # 64 rows of 64 fp32: up_proj has 128 rows
    ids = torch.randint(0, 128, (2, 5))
    before = model(ids).logits
    name = "model.layers.0.mlp.up_proj"
    parts = splitter.split(name, model.get_submodule(name))
    assert [n for n, _ in parts] == [f"{name}.parts.0", f"{name}.parts.1"]
    assert isinstance(model.get_submodule(name), RowSplitLinear)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_tied_weights_are_never_split() -> None:
    model = llama(tied=True)
    splitter = UnitSplitter(model, [model.model.embed_tokens, model.lm_head], 1, world=1)
    assert splitter.candidates == set()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("row_split")
    results = run_ranks(
        "tests.distributed.worker_row_split", ["--out", str(out)], timeout=150, env={"NUMBA_NUM_THREADS": "1"}
    )
    check_ranks(results)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_fsdp_units_are_parts_and_training_matches(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        for key in ("dense-split", "nz-split"):
            assert rank[key]["head_parts"] == 4 and rank[key]["emb_parts"] == 4
            assert rank[key]["widest"] == {"embedding": 256, "linear": 256}  # never the whole 1024 rows
        for key in ("dense-whole", "nz-whole"):
            assert rank[key]["head_parts"] == 0 and rank[key]["widest"]["linear"] == 1024
        # compressed shards == plain FSDP2, bit for bit, split or not
        assert rank["nz-split"]["losses"] == rank["dense-split"]["losses"]
        assert rank["nz-whole"]["losses"] == rank["dense-whole"]["losses"]
        # split == whole (the head's logits are the parts' logits; embedding rows are exact)
        assert rank["nz-split"]["losses"] == pytest.approx(rank["nz-whole"]["losses"], rel=1e-3)
    zero = ranks[0]
    assert zero["nz-split"]["checksum"] == zero["dense-split"]["checksum"]
    assert zero["nz-split"]["keys"] == zero["nz-whole"]["keys"]  # checkpoints keep the unsplit names
    assert "head.weight" in zero["nz-split"]["keys"] and "emb.weight" in zero["nz-split"]["keys"]
    assert zero["reloaded"] == zero["nz-whole"]["checksum"]  # an unsplit state dict loads into a split model


def test_embedding_gradient_without_regathering_the_weight(ranks: list[dict[str, Any]]) -> None:
    # shard_model tells FSDP2 not to gather an embedding's weight for backward: its gradient must still be exact
    assert all(rank["embedding_grad_error"] < 1e-6 for rank in ranks)
