"""Building fused optimizers by rule name: :func:`fused_optimizer` and :func:`build_rule`."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from nz_lightning.optim.fused import FusedOptimizer
from nz_lightning.optim.rules import SGD, AdaLomo, AdamW, UpdateRule

__all__ = ["RULES", "build_rule", "fused_optimizer"]

RULES: dict[str, type[UpdateRule]] = {"sgd": SGD, "adamw": AdamW, "adalomo": AdaLomo}
"""The rules :func:`fused_optimizer` knows, by name."""

_OPTIMIZER_OPTIONS = (
    "max_grad_norm",
    "accumulate_grad_batches",
    "stochastic_rounding",
    "seed",
    "accum_dtype",
    "grad_reducer",
    "blocked_head",
)


def _is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds DTensor (FSDP2-sharded) parameters."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def fused_optimizer(model: nn.Module, name: str, lr: float, **options: Any) -> FusedOptimizer:
    """Build a :class:`FusedOptimizer` for ``model`` by rule name.

    Args:
        model: The (possibly compressed) model to train.
        name: ``"sgd"``, ``"adamw"`` or ``"adalomo"``.
        lr: Learning rate.
        **options: The rule's hyperparameters (see :mod:`nz_lightning.optim.rules`) and the optimizer's
            options: ``max_grad_norm``, ``accumulate_grad_batches``, ``stochastic_rounding``, ``seed``,
            ``accum_dtype``.

    Returns:
        The optimizer, its hooks installed on the model (for a model sharded by
        :func:`~nz_lightning.distributed.shard_model`: a :class:`~nz_lightning.distributed.ShardedFusedOptimizer`).

    Raises:
        ValueError: Unknown rule name or option (the message lists the valid ones), or bad values.
    """
    if _is_sharded(model):
        from nz_lightning.distributed.fsdp_optim import sharded_fused_optimizer  # the layer above: lazily

        if options.pop("grad_reducer", None) is not None:
            raise ValueError("grad_reducer: a sharded model's gradients are reduce-scattered by FSDP2 already")
        options.pop("blocked_head", None)  # shards keep the plain head
        return sharded_fused_optimizer(model, name, lr, **options)
    rule, rest = build_rule(name, options, _OPTIMIZER_OPTIONS)
    return FusedOptimizer(model, rule, lr, **rest)


def build_rule(
    name: str, options: dict[str, Any], optimizer_options: tuple[str, ...], what: str = "fused optimizer"
) -> tuple[UpdateRule, dict[str, Any]]:
    """The update rule called ``name`` built from its hyperparameters in ``options``, and the optimizer's options.

    Args:
        name: ``"sgd"``, ``"adamw"`` or ``"adalomo"``.
        options: The rule's hyperparameters mixed with the optimizer's options.
        optimizer_options: The names the optimizer takes.
        what: The optimizer, in error messages.

    Returns:
        The rule and the options in ``optimizer_options``.

    Raises:
        ValueError: Unknown rule name or option (the message lists the valid ones).
    """
    rule_cls = RULES.get(name.lower()) if isinstance(name, str) else None
    if rule_cls is None:
        raise ValueError(f"unknown fused optimizer {name!r}; choose one of {', '.join(RULES)}")
    rule_options = [k for k in inspect.signature(rule_cls.__init__).parameters if k != "self"]
    unknown = sorted(set(options) - set(rule_options) - set(optimizer_options))
    if unknown:
        valid = ", ".join(rule_options + list(optimizer_options))
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {what} {name!r}; valid: {valid}")
    rule = rule_cls(**{k: v for k, v in options.items() if k in rule_options})
    return rule, {k: v for k, v in options.items() if k in optimizer_options}
