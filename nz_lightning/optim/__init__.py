"""Fused in-backward optimizers (LOMO-style) for compressed and dense models.

``fused_optimizer(model, "sgd" | "adamw" | "adalomo", lr=..., **options)`` installs hooks that update each
parameter (re-compressing compressed ones) as soon as its gradient is ready; drive it with
``opt.backward(loss)``.
"""

from nz_lightning.optim.factory import RULES, fused_optimizer
from nz_lightning.optim.fused import FusedOptimizer
from nz_lightning.optim.linear_ce import causal_lm_loss, linear_cross_entropy
from nz_lightning.optim.rules import SGD, AdaLomo, AdamW, UpdateRule, stochastic_round_to_bf16

__all__ = [
    "RULES",
    "SGD",
    "AdaLomo",
    "AdamW",
    "FusedOptimizer",
    "UpdateRule",
    "causal_lm_loss",
    "fused_optimizer",
    "linear_cross_entropy",
    "stochastic_round_to_bf16",
]
