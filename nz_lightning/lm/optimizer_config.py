"""Optimizers and LR schedules from plain config mappings (what Hydra passes in)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
"""Optimizer names a config may use. Both map onto ``nz_lightning``'s fused rules of the same name."""

SCHEDULES = ("constant", "linear", "cosine")
"""LR schedule names: warmup (linear from 0) then constant, linear decay or cosine decay to ``min_lr_ratio``."""


def build_optimizer(params: Iterable[torch.nn.Parameter], config: Mapping[str, Any] | None) -> torch.optim.Optimizer:
    """A ``torch.optim.SGD`` or ``AdamW`` from ``{"name": ..., "lr": ..., **options}``.

    Args:
        params: Parameters to optimize.
        config: ``name`` (``"sgd"``/``"adamw"``, default ``"sgd"``), ``lr`` (default 1e-3), and the optimizer's
            keyword options (``momentum``, ``weight_decay``, ``betas``, ``eps``, ...). ``None``: SGD, lr 1e-3.

    Raises:
        ValueError: Unknown optimizer name.
    """
    options = dict(config or {})
    name = str(options.pop("name", "sgd")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    options["lr"] = float(options.get("lr", 1e-3))
    optimizer_cls: Any = OPTIMIZERS[name]
    return optimizer_cls(params, **options)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base LR at ``step`` (0-based) for the given schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Mapping[str, Any], total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``: linear warmup, then the named schedule.

    Args:
        optimizer: The optimizer to drive.
        config: ``name`` (``"constant"``/``"linear"``/``"cosine"``, default cosine), ``warmup_steps`` (default 0),
            ``min_lr_ratio`` (final LR over base LR, default 0.0), ``total_steps`` (default: ``total_steps``).
        total_steps: Steps of the run (the trainer's estimate) when the config does not fix them.

    Raises:
        ValueError: Unknown schedule name or negative warmup.
    """
    name = str(config.get("name", "cosine")).lower()
    if name not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    warmup = int(config.get("warmup_steps", 0))
    if warmup < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup}")
    total = int(config.get("total_steps") or total_steps)
    floor = float(config.get("min_lr_ratio", 0.0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, name, floor))
