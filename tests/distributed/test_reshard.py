"""Fused-optimizer state of FSDP shards carried to another world size (single process, no process group)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nz_lightning.distributed.reshard import reshard_optimizer_state


def part(rows: slice, full: dict[int, torch.Tensor], accum: bool = False) -> dict[str, Any]:
    """A rank's AdamW-like state dict holding ``rows`` of every parameter's moments."""
    state = {i: {"step": 3, "exp_avg": t[rows].clone(), "exp_avg_sq": t[rows].square()} for i, t in full.items()}
    fused = {"rule": "adamw", "micro_step": 0, "accum": {0: torch.ones(1)} if accum else {}, "seed": 0}
    return {"state": state, "param_groups": [{"lr": 0.1, "params": list(full)}], "fused": fused}


FULL = {0: torch.randn(7, 3), 1: torch.randn(5)}  # uneven rows: torch.chunk's split (4 + 3, 3 + 2)
SHAPES = [FULL[0].shape, FULL[1].shape]


@pytest.mark.parametrize(("world", "rank"), [(1, 0), (3, 0), (3, 1), (3, 2), (2, 1)])
def test_two_rank_state_gives_each_new_rank_its_rows(world: int, rank: int) -> None:
    saved = [part(slice(0, 4), {0: FULL[0]}), part(slice(4, 7), {0: FULL[0]})]
    for p, rows in zip(saved, (slice(0, 3), slice(3, 5)), strict=True):
        p["state"][1] = {"step": 3, "exp_avg": FULL[1][rows].clone(), "exp_avg_sq": FULL[1][rows].square()}
    out = reshard_optimizer_state(saved, SHAPES, world, rank)
    for i, full in FULL.items():
        chunk = full.chunk(world)[rank] if rank < len(full.chunk(world)) else full[:0]
        assert torch.equal(out["state"][i]["exp_avg"], chunk)
        assert torch.equal(out["state"][i]["exp_avg_sq"], chunk.square())
        assert out["state"][i]["step"] == 3


def test_one_rank_state_is_split_for_more_ranks() -> None:
    out = reshard_optimizer_state([part(slice(None), FULL)], SHAPES, 2, 1)
    assert torch.equal(out["state"][0]["exp_avg"], FULL[0][4:]) and torch.equal(out["state"][1]["exp_avg"], FULL[1][3:])


def test_pending_accumulation_or_inconsistent_state_is_refused() -> None:
    with pytest.raises(ValueError, match="pending gradient accumulation"):
        reshard_optimizer_state([part(slice(0, 4), {0: FULL[0]}, accum=True)], SHAPES, 2, 0)
    saved = [part(slice(0, 4), {0: FULL[0]}), part(slice(4, 7), {0: FULL[0]})]
    saved[1]["state"][0]["step"] = 4
    with pytest.raises(ValueError, match="'step' of parameter 0 differs"):
        reshard_optimizer_state(saved, SHAPES, 1, 0)
