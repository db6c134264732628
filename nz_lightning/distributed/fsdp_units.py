"""Which submodules become FSDP2 units and how each is sharded (:func:`~nz_lightning.distributed.shard_model`)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from nz_lightning.distributed.row_split import EmbeddingRows

__all__ = ["ModuleSelector", "select_units", "shard_unit"]

ModuleSelector = Callable[[str, nn.Module], bool] | Iterable[type[nn.Module] | str]
"""Which submodules get their own ``fully_shard``: a predicate ``fn(name, module)``, module classes, or fnmatch
patterns of module names."""


def _default_blocks(model: nn.Module, per_weight: bool = False) -> list[str]:
    """The default FSDP2 units: every element of every ``nn.ModuleList`` (transformer blocks) that holds parameters,
    and every ``nn.Embedding`` / ``nn.Linear`` outside them (embeddings, the output head) whose weight is not tied to
    another module's. FSDP2 keeps the root's own parameters unsharded from forward to backward, so an embedding or
    head left in the root would be held whole on every rank for the whole step. ``per_weight``: also every
    ``nn.Linear`` / ``nn.Embedding`` inside the blocks (each projection a unit; the block keeps its norms)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for child_name, child in module.named_children():
                if any(True for _ in child.parameters()):
                    names.append(f"{name}.{child_name}" if name else child_name)
    if per_weight:
        blocks = list(names)
        names += [
            n
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and any(n.startswith(f"{b}.") for b in blocks)
        ]
    uses: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    for name, module in model.named_modules():
        inside = any(name == b or name.startswith(f"{b}.") for b in names)
        if name and not inside and isinstance(module, (nn.Embedding, nn.Linear)):
            if all(uses[id(p)] == 1 for p in module.parameters(recurse=False)):
                names.append(name)
    return names


def select_units(model: nn.Module, modules: ModuleSelector | str | None) -> list[nn.Module]:
    """The submodules to shard on their own, children before parents (the root excluded)."""
    if modules in (None, "layers", "weights"):
        wanted = set(_default_blocks(model, per_weight=modules == "weights"))
        picked = [(n, m) for n, m in model.named_modules() if n in wanted]
    elif isinstance(modules, str):
        raise ValueError(f"modules={modules!r}: give 'layers', 'weights', a predicate, classes or a list of patterns")
    elif callable(modules):
        picked = [(n, m) for n, m in model.named_modules() if n and modules(n, m)]
    else:
        items = list(modules)
        bad = [x for x in items if not (isinstance(x, str) or (isinstance(x, type) and issubclass(x, nn.Module)))]
        if bad:
            raise TypeError(f"modules must be a predicate, module classes or name patterns; got {bad[:3]}")
        classes = tuple(x for x in items if isinstance(x, type))
        patterns = [x for x in items if isinstance(x, str)]
        picked = [
            (n, m)
            for n, m in model.named_modules()
            if n and (isinstance(m, classes) or any(fnmatch.fnmatchcase(n, p) for p in patterns))
        ]
    return [m for _, m in reversed(picked)]  # named_modules is pre-order: reversed, children come first


def shard_unit(module: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool, backward_prefetch: bool) -> None:
    """``fully_shard`` one unit; an embedding's weight is not gathered again for backward (its gradient does not read
    it), so a large embedding is never dense on a rank after its forward."""
    kind = type(module)  # fully_shard changes the class (FSDPLinear, FSDPEmbedding)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if kind in (nn.Embedding, EmbeddingRows):
        module.set_unshard_in_backward(False)  # type: ignore[operator]
    if not backward_prefetch:  # an explicit prefetch list replaces the implicit one; the unit itself is a no-op
        module.set_modules_to_backward_prefetch([module])  # type: ignore[operator]
    if kind in (nn.Linear, nn.Embedding, EmbeddingRows) and reshard_after_forward:
        module.register_forward_hook(_reshard_if_recomputing)


def _reshard_if_recomputing(module: nn.Module, args: Any, output: Any) -> None:
    """Free a single-weight unit's gathered weight after a forward that activation checkpointing re-runs inside
    backward. FSDP2 keeps it gathered until the unit's backward, so a recomputed block would hold all its weights
    dense at once; resharded, each is gathered again just before its own backward (one more all-gather per weight)."""
    if torch._C._current_graph_task_id() != -1:
        module.reshard()  # type: ignore[operator]
