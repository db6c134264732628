"""State dict of :class:`~nz_lightning.optim.fused.FusedOptimizer` (a mixin, kept apart to keep modules short)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["FusedStateMixin"]


class FusedStateMixin:
    """``state_dict`` / ``load_state_dict`` of a fused optimizer (rule state, accumulation, RNG)."""

    rule: Any
    state: Any
    param_groups: list[dict[str, Any]]
    seed: int
    _params: list[Tensor]
    _micro: int
    _accum: dict[int, Tensor]
    _generators: dict[torch.device, torch.Generator]

    def _generator(self, device: torch.device) -> torch.Generator:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically (tensors are references, as in torch).

        Returns:
            ``{"state": {index: {"step": int, **rule_state}}, "param_groups": [...], "fused": {...}}`` where
            ``index`` is the position among the trainable parameters of ``model.parameters()``; ``fused``
            holds the rule name, pending accumulation buffers and micro-step, and the RNG seed and states.
        """
        state = {i: dict(self.state[p]) for i, p in enumerate(self._params) if p in self.state and self.state[p]}
        index = {id(p): i for i, p in enumerate(self._params)}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
            for g in self.param_groups
        ]
        return {
            "state": state,
            "param_groups": groups,
            "fused": {
                "rule": self.rule.name,
                "micro_step": self._micro,
                "accum": dict(self._accum),
                "seed": self.seed,
                "generators": {str(d): g.get_state() for d, g in self._generators.items()},
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (tensors are copied to each parameter's device, dtypes kept).

        Raises:
            ValueError: The state belongs to another rule or another set of parameters.
        """
        fused = state_dict["fused"]
        if fused["rule"] != self.rule.name:
            raise ValueError(f"state_dict is for the {fused['rule']!r} rule, this optimizer uses {self.rule.name!r}")
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("state_dict has a different number of parameter groups or parameters")
        for saved, group in zip(groups, self.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state.clear()
        for i, entry in state_dict["state"].items():
            p = self._params[int(i)]
            self.state[p] = {k: _copy_to(v, p.device) for k, v in entry.items()}
        self._accum = {int(i): _copy_to(b, self._params[int(i)].device) for i, b in fused["accum"].items()}
        self._micro = int(fused["micro_step"])
        self.seed = int(fused["seed"])
        for dev, rng_state in fused["generators"].items():
            self._generator(torch.device(dev)).set_state(rng_state)


def _copy_to(value: Any, device: torch.device) -> Any:
    return value.to(device=device, copy=True) if isinstance(value, Tensor) else value
