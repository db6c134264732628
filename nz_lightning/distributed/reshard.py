"""Fused-optimizer state of a sharded model, carried to another world size.

:class:`~nz_lightning.distributed.ShardedFusedOptimizer` keeps, per rank, the rule state of that rank's rows (the
momentum or moments of its shard of each weight). For elementwise rules (SGD, AdamW) the state of the whole weight is
the ranks' pieces concatenated along dim 0 in rank order (``torch.chunk``'s split, as FSDP2 shards), so a checkpoint
written at ``N`` ranks can give every rank of an ``M``-rank run exactly the state of its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nz_lightning.distributed.fsdp import shard_rows

__all__ = ["reshard_optimizer_state"]


def _same(values: Sequence[Any]) -> bool:
    first = values[0]
    if isinstance(first, Tensor):
        return all(isinstance(v, Tensor) and v.shape == first.shape and torch.equal(v, first) for v in values)
    return all(v == first for v in values)


def reshard_optimizer_state(
    parts: Sequence[dict[str, Any]], shapes: Sequence[torch.Size], world: int, rank: int
) -> dict[str, Any]:
    """``rank``'s fused-optimizer state at ``world`` ranks from the state dicts of every rank of another run.

    Args:
        parts: ``FusedOptimizer.state_dict()`` of every rank of the saving run, in rank order.
        shapes: The whole shape of each trainable parameter, by index.
        world: Ranks of this run.
        rank: This rank.

    Returns:
        A state dict for this rank's ``load_state_dict``: per-row state sliced to its rows, the rest as saved.

    Raises:
        ValueError: Pending accumulation buffers (save at an update boundary), or state that is neither split by rows
            nor the same on every rank.
    """
    if any(part["fused"]["accum"] for part in parts):
        raise ValueError(
            "the checkpoint holds a pending gradient accumulation: it resumes at its own world size only (save at an "
            "update boundary to change the world size)"
        )
    state: dict[int, dict[str, Any]] = {}
    for index, first in parts[0]["state"].items():
        shape = shapes[int(index)]
        entry: dict[str, Any] = {}
        for key in first:
            pieces = [part["state"][index][key] for part in parts]
            rows = [p.shape[0] for p in pieces if isinstance(p, Tensor) and p.dim() >= 1]
            split = len(rows) == len(pieces) and len(shape) >= 1 and sum(rows) == shape[0] and len(pieces) > 1
            if split and all(p.shape[1:] == shape[1:] for p in pieces):
                start, stop = shard_rows(shape[0], world, rank)
                entry[key] = torch.cat(pieces)[start:stop].clone()
            elif _same(pieces):
                whole = first[key]
                if isinstance(whole, Tensor) and whole.dim() >= 1 and whole.shape == shape and world > 1:
                    start, stop = shard_rows(shape[0], world, rank)  # a one-rank run's state: the whole weight
                    whole = whole[start:stop].clone()
                entry[key] = whole
            else:
                raise ValueError(f"optimizer state {key!r} of parameter {index} differs across ranks and is not split")
        state[int(index)] = entry
    return {"state": state, "param_groups": parts[0]["param_groups"], "fused": parts[0]["fused"]}
