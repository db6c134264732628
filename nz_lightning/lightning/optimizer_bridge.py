"""Turn what ``LightningModule.configure_optimizers`` returned into a fused in-backward optimizer.

:class:`~nz_lightning.lightning.strategy.NeuZipStrategy` lets users keep writing ``torch.optim.SGD(...)`` or
``torch.optim.AdamW(...)`` (with any ``torch.optim.lr_scheduler``). :func:`to_fused` reads the hyperparameters of
that optimizer and builds the equivalent :class:`~nz_lightning.optim.FusedOptimizer`; :func:`rebind_schedulers`
points the LR schedulers at it so that they drive its learning rate.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor, nn
from torch.optim import Optimizer

from nz_lightning.optim import FusedOptimizer, fused_optimizer

__all__ = ["check_supported", "rebind_schedulers", "to_fused"]

_SUPPORTED = (
    "torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam (decoupled or zero weight decay), or a FusedOptimizer"
)
# Param-group keys that only pick a torch implementation; they do not change the math and are not copied.
_IMPL_KEYS = frozenset({"params", "foreach", "fused", "differentiable", "capturable"})


def check_supported(module: pl.LightningModule, trainer: pl.Trainer, precision: Precision) -> None:
    """Refuse Trainer/module settings that updates inside backward cannot honour; warn about ignored overrides.

    Args:
        module: The LightningModule being fitted.
        trainer: Its Trainer.
        precision: The strategy's precision plugin.

    Raises:
        ValueError: Manual optimization, fp16 AMP with a GradScaler, or ``gradient_clip_algorithm="value"``.
    """
    if not module.automatic_optimization:
        raise ValueError(
            "NeuZipStrategy updates the weights inside backward and needs automatic optimization: remove "
            "`self.automatic_optimization = False` (manual optimization is not supported)"
        )
    if isinstance(precision, MixedPrecision) and precision.scaler is not None:
        raise ValueError("NeuZipStrategy cannot unscale fp16 gradients: use precision='bf16-mixed', 'bf16-true' or 32")
    if trainer.gradient_clip_algorithm == GradClipAlgorithmType.VALUE and trainer.gradient_clip_val:
        raise ValueError(
            "NeuZipStrategy clips by global norm only: use gradient_clip_algorithm='norm' (the default) instead of "
            "'value'"
        )
    for hook in ("backward", "configure_gradient_clipping"):
        if getattr(type(module), hook) is not getattr(pl.LightningModule, hook):
            warnings.warn(
                f"{type(module).__name__}.{hook} is overridden but NeuZipStrategy does not call it: the fused "
                "optimizer runs backward and clips by Trainer(gradient_clip_val)",
                stacklevel=2,
            )


def _refuse(name: str, group: dict[str, Any], flag: str, hint: str) -> None:
    if group.get(flag):
        raise ValueError(f"NeuZipStrategy cannot translate torch.optim.{name}({flag}=True): {hint}")


def _rule_for(optimizer: Optimizer) -> tuple[str, dict[str, Any]]:
    """The fused rule name and its hyperparameters for a torch optimizer (read from its first param group)."""
    group = optimizer.param_groups[0]
    kind = type(optimizer)
    name = kind.__name__
    if kind is torch.optim.SGD:
        _refuse(name, group, "maximize", "negate the loss instead")
        return "sgd", {
            "momentum": float(group["momentum"]),
            "dampening": float(group["dampening"]),
            "weight_decay": float(group["weight_decay"]),
            "nesterov": bool(group["nesterov"]),
        }
    if kind in (torch.optim.AdamW, torch.optim.Adam):
        _refuse(name, group, "maximize", "negate the loss instead")
        _refuse(name, group, "amsgrad", "the fused AdamW has no AMSGrad variant")
        decoupled = kind is torch.optim.AdamW or bool(group.get("decoupled_weight_decay", False))
        if not decoupled and float(group["weight_decay"]) != 0:
            raise ValueError(
                "NeuZipStrategy cannot translate torch.optim.Adam with L2 (coupled) weight_decay: use "
                "torch.optim.AdamW, Adam(decoupled_weight_decay=True), or weight_decay=0"
            )
        return "adamw", {
            "betas": tuple(float(b) for b in group["betas"]),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
        }
    raise ValueError(
        f"NeuZipStrategy cannot translate the optimizer {kind.__module__}.{kind.__qualname__} returned by "
        f"configure_optimizers into a fused in-backward update; return one of: {_SUPPORTED} "
        "(e.g. nz_lightning.fused_optimizer(self, 'adalomo', lr=...))"
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    return bool(a == b)


def _check_groups(groups: list[dict[str, Any]]) -> None:
    """All param groups must share their hyperparameters: the fused optimizer applies one rule to every parameter."""
    first = groups[0]
    for i, group in enumerate(groups[1:], start=1):
        keys = (set(first) | set(group)) - {"params"}
        differ = sorted(k for k in keys if not _same(first.get(k), group.get(k)))
        if differ:
            raise ValueError(
                f"NeuZipStrategy needs one set of hyperparameters, but param group {i} differs from group 0 in "
                f"{', '.join(differ)}; use a single param group (e.g. drop the no-weight-decay group for biases)"
            )


def _check_coverage(module: nn.Module, groups: Iterable[dict[str, Any]]) -> None:
    """The optimizer must hold exactly the module's trainable parameters (the fused one updates all of them)."""
    held = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    missing = [n for i, n in trainable.items() if i not in held]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"the optimizer does not hold these trainable parameters: {shown}. NeuZipStrategy updates every "
            "trainable parameter of the LightningModule: freeze the others with requires_grad_(False)"
        )
    extra = len(held - set(trainable))
    if extra:
        raise ValueError(
            f"the optimizer holds {extra} parameter(s) that are frozen or not part of the LightningModule; "
            "pass exactly the module's trainable parameters"
        )


def _adopt(
    opt: FusedOptimizer,
    max_grad_norm: float | None,
    accumulate_grad_batches: int,
    stochastic_rounding: bool,
    seed: int,
    grad_reducer: Callable[[Tensor], Tensor] | None,
) -> FusedOptimizer:
    """Apply the Trainer's clipping/accumulation and the strategy's rounding/reduction to a user-built optimizer."""
    if grad_reducer is not None:
        if opt.grad_reducer is not None and opt.grad_reducer != grad_reducer:
            raise ValueError(
                "the FusedOptimizer already has a grad_reducer, and the data-parallel strategy needs its own "
                "(the all-reduce average): build it without grad_reducer"
            )
        opt.grad_reducer = grad_reducer
    if max_grad_norm is not None:
        if opt.max_grad_norm is not None and opt.max_grad_norm != max_grad_norm:
            raise ValueError(
                f"Trainer(gradient_clip_val={max_grad_norm}) conflicts with the FusedOptimizer's "
                f"max_grad_norm={opt.max_grad_norm}; set only one of them"
            )
        opt.max_grad_norm = max_grad_norm
    if opt.accumulate_grad_batches not in (1, accumulate_grad_batches):
        raise ValueError(
            f"Trainer(accumulate_grad_batches={accumulate_grad_batches}) conflicts with the FusedOptimizer's "
            f"accumulate_grad_batches={opt.accumulate_grad_batches}; set it on the Trainer only"
        )
    opt.accumulate_grad_batches = accumulate_grad_batches
    if stochastic_rounding:
        opt.stochastic_rounding = True
        opt.seed = int(seed)
    return opt


def to_fused(
    module: nn.Module,
    optimizer: Optimizer,
    *,
    max_grad_norm: float | None = None,
    accumulate_grad_batches: int = 1,
    stochastic_rounding: bool = False,
    seed: int = 0,
    blocked_head: bool = True,
    grad_reducer: Callable[[Tensor], Tensor] | None = None,
) -> FusedOptimizer:
    """The fused equivalent of ``optimizer`` for ``module`` (its hooks are installed on the module's parameters).

    SGD keeps ``momentum``, ``dampening``, ``weight_decay`` and ``nesterov``; AdamW (and Adam with decoupled or zero
    weight decay) keeps ``betas``, ``eps`` and ``weight_decay``. Every other param-group key (``lr``,
    ``initial_lr``, keys added by LR schedulers such as ``max_lr``) is copied into the fused optimizer's group, so
    schedulers find what they stored there. A :class:`FusedOptimizer` is used as it is.

    Args:
        module: The LightningModule (already compressed, if it is to be).
        optimizer: What ``configure_optimizers`` returned (unwrapped).
        max_grad_norm: Global gradient-norm bound (``Trainer(gradient_clip_val=...)``).
        accumulate_grad_batches: Micro-batches per update (``Trainer(accumulate_grad_batches=...)``).
        stochastic_rounding: Round bf16 results stochastically.
        seed: Seed of the stochastic rounding.
        blocked_head: Use the blocked head on Hugging Face causal LMs (ignored for a user-built FusedOptimizer).
        grad_reducer: Applied to every gradient before it is used (the data-parallel all-reduce average).

    Returns:
        The fused optimizer.

    Raises:
        ValueError: Unsupported optimizer or flag, param groups with different hyperparameters, or an optimizer that
            does not hold exactly the module's trainable parameters.
    """
    _check_coverage(module, optimizer.param_groups)
    if isinstance(optimizer, FusedOptimizer):
        return _adopt(optimizer, max_grad_norm, accumulate_grad_batches, stochastic_rounding, seed, grad_reducer)
    name, rule_options = _rule_for(optimizer)
    _check_groups(optimizer.param_groups)
    group = optimizer.param_groups[0]
    fused = fused_optimizer(
        module,
        name,
        lr=float(group["lr"]),
        **rule_options,
        max_grad_norm=max_grad_norm,
        accumulate_grad_batches=accumulate_grad_batches,
        stochastic_rounding=stochastic_rounding,
        seed=seed,
        blocked_head=blocked_head,
        grad_reducer=grad_reducer,
    )
    for key, value in group.items():
        if key not in _IMPL_KEYS:
            fused.param_groups[0][key] = float(value) if isinstance(value, Tensor) and value.numel() == 1 else value
    return fused


def _rebind(scheduler: Any, fused: FusedOptimizer) -> None:
    if getattr(scheduler, "cycle_momentum", False):
        raise ValueError(
            f"{type(scheduler).__name__}(cycle_momentum=True) changes momentum/betas every step, which the fused "
            "optimizer fixes at construction: pass cycle_momentum=False"
        )
    if not hasattr(scheduler, "optimizer"):
        raise ValueError(
            f"cannot point the LR scheduler {type(scheduler).__name__} at the fused optimizer: it has no "
            "`optimizer` attribute"
        )
    scheduler.optimizer = fused
    for inner in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _rebind(inner, fused)


def rebind_schedulers(schedulers: Iterable[Any], fused: FusedOptimizer) -> None:
    """Make LR schedulers built on the original optimizer drive ``fused`` instead.

    The schedulers keep their own state (``base_lrs``, ``last_epoch``...); the fused optimizer's param group already
    carries the ``lr`` and ``initial_lr`` they set (see :func:`to_fused`).

    Args:
        schedulers: The schedulers (``LRSchedulerConfig.scheduler`` objects).
        fused: The fused optimizer.

    Raises:
        ValueError: A scheduler cycles momentum, or has no ``optimizer`` attribute.
    """
    schedulers = list(schedulers)
    for scheduler in schedulers:
        _rebind(scheduler, fused)
    if schedulers:
        # torch's schedulers check on their first step that optimizer.step() was called before them, through a
        # marker their constructor puts on optimizer.step. An identity scheduler (lr * 1.0 at step 0) puts it on the
        # fused optimizer's (no-op) step with public API only; the strategy calls that step once per update.
        torch.optim.lr_scheduler.ConstantLR(fused, factor=1.0, total_iters=0)
