"""State of a sharded model: dense full state dicts (portable checkpoints) and per-rank shard states (exact resume).

* :func:`full_state_dict` / :func:`load_full_state_dict`: whole dense tensors, gathered to (or broadcast from) rank 0;
  loadable at any world size and without nz_lightning.
* :func:`shard_state_dict` / :func:`load_shard_state_dict`: this rank's shards as held (compressed shards as their
  portable blobs, never decoded); for resuming at the same world size, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from nz_lightning.distributed.fsdp import _INFO, local_shard, refresh_gather_capacities, shard_rows
from nz_lightning.distributed.row_split import merge_split_state, split_split_state
from nz_lightning.kernels import CompressedTensor
from nz_lightning.tensor.parameter import NZParameter, read_dense, write_dense

__all__ = ["full_state_dict", "load_full_state_dict", "load_shard_state_dict", "shard_state_dict"]


def _full_value(value: Tensor) -> Tensor:
    """The whole dense tensor of a (possibly sharded, possibly compressed) value, never memory of a live tensor (a
    state dict must not alias the model); a collective for DTensors."""
    if not isinstance(value, DTensor):
        return read_dense(value) if isinstance(value, NZParameter) else value.detach().clone()
    local = value._local_tensor
    dense = read_dense(local) if isinstance(local, NZParameter) else local.detach()
    full = DTensor.from_local(
        dense, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
    ).full_tensor()
    return full.clone() if full.data_ptr() == dense.data_ptr() else full  # world size 1: may be the live shard


def full_state_dict(model: nn.Module, *, rank0_only: bool = True, cpu: bool = True) -> dict[str, Tensor]:
    """The model's state dict with every tensor whole and dense (decoded): a portable checkpoint.

    A collective: call it on every rank. Parameters are gathered one at a time, so a rank holds at most one whole
    tensor beyond its shards.

    Args:
        model: A model sharded by :func:`~nz_lightning.distributed.fsdp.shard_model` (plain models work too).
        rank0_only: Return the tensors on rank 0 only (other ranks get ``{}``).
        cpu: Move the tensors to CPU.

    Returns:
        ``{name: tensor}`` in ``model.state_dict()`` order, plain dense tensors; a head or embedding split into row
        parts (:mod:`~nz_lightning.distributed.row_split`) under its unsplit name.
    """
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            continue
        full = _full_value(value)
        if keep:
            out[name] = full.cpu() if cpu else full
        del full
    merge_split_state(model, out)
    return out


def load_full_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, from_rank0: bool = False, strict: bool = True
) -> None:
    """Load whole dense tensors into a sharded model: each rank keeps (and re-encodes) only its own rows.

    A collective (capacities are agreed again, tensors broadcast with ``from_rank0``): call it on every rank.

    Before the model's first forward the compressed-gather capacities are agreed again for the loaded values
    (:func:`~nz_lightning.distributed.fsdp.refresh_gather_capacities`); after it they stay, and a shard that no longer
    fits is gathered dense (exact, slower).

    Args:
        model: A model sharded by :func:`~nz_lightning.distributed.fsdp.shard_model`.
        state_dict: Whole tensors by name (e.g. from :func:`full_state_dict`: unsplit names, also for a head or
            embedding split into row parts); with ``from_rank0``, read on rank 0 only and broadcast (other ranks may
            pass ``{}``).
        from_rank0: Broadcast each tensor from rank 0 (a collective: call on every rank).
        strict: Raise on missing or unexpected keys (checked on the rank(s) that read ``state_dict``).

    Raises:
        KeyError: ``strict`` and the keys do not match the model's.
        ValueError: A tensor of the wrong shape.
    """
    targets = {n: v for n, v in model.state_dict(keep_vars=True).items() if isinstance(v, Tensor)}
    reads = not from_rank0 or dist.get_rank() == 0
    state_dict = split_split_state(model, state_dict) if reads else state_dict
    if strict and reads:
        missing = sorted(set(targets) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(targets))
        if missing or unexpected:
            raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, target in targets.items():
        local = local_shard(target)
        if from_rank0:
            full = torch.empty(target.shape, dtype=target.dtype, device=local.device)
            present = torch.tensor([int(reads and name in state_dict)], dtype=torch.int64, device=local.device)
            dist.broadcast(present, src=0)
            if not int(present):
                continue
            if reads:
                full.copy_(_checked(name, state_dict[name], target))
            dist.broadcast(full, src=0)
        elif name in state_dict:
            full = _checked(name, state_dict[name], target).to(local.device)
        else:
            continue
        if isinstance(target, DTensor):
            mesh = target.device_mesh
            start, stop = shard_rows(target.shape[0], mesh.size(), mesh.get_local_rank())
            full = full[start:stop]
        value = full.to(local.dtype).contiguous()
        if isinstance(local, NZParameter):
            write_dense(local, value)
        else:
            with torch.no_grad():
                local.copy_(value)
    _refresh(model)


def _refresh(model: nn.Module) -> None:
    if hasattr(model, _INFO):
        refresh_gather_capacities(model)


def shard_state_dict(model: nn.Module) -> dict[str, Any]:
    """This rank's parameter shards and buffers as held: compressed shards as their blobs (no decode).

    Returns:
        ``{"world_size": int, "rank": int, "compressed": {name: [blob bytes per row block]}, "dense": {name: tensor}}``
        (dense: plain local shards and buffers, CPU copies). Blobs are the portable format of docs/FORMAT.md.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    compressed: dict[str, list[bytes]] = {}
    dense: dict[str, Tensor] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, Tensor):
            continue
        local = local_shard(value)
        if isinstance(local, NZParameter):
            compressed[name] = local.store.to_blobs()
        else:
            dense[name] = local.detach().to("cpu", copy=True)
    return {"world_size": world, "rank": rank, "compressed": compressed, "dense": dense}


def load_shard_state_dict(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Restore :func:`shard_state_dict` output of the same rank, world size and sharding (bit for bit).

    A collective when the model was sharded by ``shard_model`` (capacities are agreed again before its first
    forward): call it on every rank.

    Raises:
        ValueError: Another world size or rank, or shards that do not fit the model (names, shapes, dtypes, or
            compressed where the model holds dense and the reverse).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if (state["world_size"], state["rank"]) != (world, rank):
        raise ValueError(
            f"shard state of rank {state['rank']} of {state['world_size']} cannot load into rank {rank} of {world}: "
            "resume at the same world size, or go through full_state_dict / load_full_state_dict"
        )
    targets = {n: v for n, v in model.state_dict(keep_vars=True).items() if isinstance(v, Tensor)}
    saved = set(state["compressed"]) | set(state["dense"])
    if saved != set(targets):
        raise ValueError(
            f"shard state does not match the model: missing {sorted(set(targets) - saved)[:5]}, unexpected "
            f"{sorted(saved - set(targets))[:5]}"
        )
    for name, target in targets.items():
        local = local_shard(target)
        if isinstance(local, NZParameter) != (name in state["compressed"]):
            raise ValueError(
                f"{name}: saved {'compressed' if name in state['compressed'] else 'dense'}, held otherwise"
            )
        if isinstance(local, NZParameter):
            blocks = [CompressedTensor.from_bytes(b, device=local.device) for b in state["compressed"][name]]
            local.store.set_blocks(blocks)
        else:
            value = state["dense"][name]
            if value.shape != local.shape or value.dtype != local.dtype:
                raise ValueError(
                    f"{name}: saved {tuple(value.shape)} {value.dtype}, held {tuple(local.shape)} {local.dtype}"
                )
            with torch.no_grad():
                local.copy_(value)
    _refresh(model)


def _checked(name: str, value: Tensor, target: Tensor) -> Tensor:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{name}: state dict has shape {tuple(value.shape)}, the model {tuple(target.shape)}")
    return value
