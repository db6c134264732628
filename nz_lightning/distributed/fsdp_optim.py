"""The fused in-backward update on FSDP2 shards: each rank updates (and re-encodes) only its local shard.

FSDP2 runs the parameters' post-accumulate-grad hooks on the *sharded* parameter right after the gradient's
reduce-scatter, so :class:`~nz_lightning.optim.fused.FusedOptimizer`'s hook fits: here it is given the local
gradient shard and the local tensor (an :class:`~nz_lightning.distributed.fsdp_tensor.NZShard`, decoded and
re-encoded row block by row block, or a dense shard updated in place). The rule state is per shard (local
tensors). Clipping all-reduces the squared local norms across the shard group, so every rank uses the global
norm's coefficient. Stochastic rounding draws each element's bits by its position in the *full* parameter, so
the result does not depend on the world size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from nz_lightning.distributed.fsdp import local_shard, shard_rows
from nz_lightning.kernels import CompressedTensor
from nz_lightning.optim.blockwise import BlockGrad, apply_update, sr_noise
from nz_lightning.optim.factory import build_rule
from nz_lightning.optim.fused import FusedOptimizer
from nz_lightning.optim.rules import AdaLomo, UpdateRule

__all__ = ["ShardedFusedOptimizer", "sharded_fused_optimizer"]

_OPTIONS = ("max_grad_norm", "accumulate_grad_batches", "stochastic_rounding", "seed", "accum_dtype")


def _local_grad(grad: Tensor) -> Tensor:
    """The local shard of a sharded gradient (a dense gradient as it is)."""
    return grad.to_local() if isinstance(grad, DTensor) else grad


class ShardedFusedOptimizer(FusedOptimizer):
    """:class:`~nz_lightning.optim.fused.FusedOptimizer` for a model sharded by
    :func:`~nz_lightning.distributed.fsdp.shard_model`: same API (``opt.backward(loss)``), updates local shards.

    Args:
        model: The sharded model (every trainable parameter a DTensor).
        rule: An elementwise update rule (SGD, AdamW).
        lr: Learning rate.
        max_grad_norm: Global 2-norm bound (the squared local norms are all-reduced over the shard group).
        accumulate_grad_batches: Backward calls per update (each micro-batch's gradient is reduce-scattered).
        stochastic_rounding: Round bf16 results stochastically (bits by position in the full parameter).
        seed: Seed of the stochastic rounding.
        accum_dtype: Dtype of the accumulation buffers (local shards).

    Raises:
        ValueError: A trainable parameter that is not sharded (call ``shard_model`` first), or AdaLomo (its factored
            statistics span the rows of every rank; not supported on shards).
    """

    def __init__(
        self,
        model: nn.Module,
        rule: UpdateRule,
        lr: float,
        *,
        max_grad_norm: float | None = None,
        accumulate_grad_batches: int = 1,
        stochastic_rounding: bool = False,
        seed: int = 0,
        accum_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        if isinstance(rule, AdaLomo) or not rule.elementwise:
            raise ValueError(
                f"the {rule.name!r} rule is not elementwise: its statistics span the rows every rank holds, which a "
                "shard-local update cannot see. Use 'sgd' or 'adamw' with sharded weights"
            )
        plain = [n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
        if plain:
            raise ValueError(
                f"parameters {', '.join(plain[:3])} are not sharded: build the model with shard_model() before the "
                "sharded fused optimizer"
            )
        meshes = {p.device_mesh for p in model.parameters() if isinstance(p, DTensor)}
        if len(meshes) != 1:
            raise ValueError(f"the model's parameters span {len(meshes)} device meshes; expected one")
        self._mesh = next(iter(meshes))
        super().__init__(
            model,
            rule,
            lr,
            max_grad_norm=max_grad_norm,
            accumulate_grad_batches=accumulate_grad_batches,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            accum_dtype=accum_dtype,
            grad_reducer=_local_grad,
            blocked_head=False,
        )

    def backward(self, loss: Tensor) -> None:
        """:meth:`FusedOptimizer.backward`, then the deferred decode checks (one read per device and stream).

        Gathered payloads decoded without a sync (``shard_model(gather_heads="exchange")`` on a GPU) are checked
        here, so corrupt data raises at the end of the step that decoded it.

        Raises:
            ValueError: A deferred decode check failed.
        """
        super().backward(loss)
        CompressedTensor.check_deferred()

    def _offset(self, p: Tensor) -> int:
        """Flat position, in the full parameter, of this rank's first local element."""
        if not isinstance(p, DTensor) or p.dim() == 0:
            return 0
        start, _ = shard_rows(p.shape[0], self._mesh.size(), self._mesh.get_local_rank())
        return start * (p.numel() // max(p.shape[0], 1))

    def _prepare(self, p: Tensor, i: int) -> tuple[dict[str, Any], int, Callable[[int, int], Tensor] | None]:
        """The local shard's rule state (created on first use), the number of this update, and its noise."""
        state = self.state[p]
        local = local_shard(p)
        if "step" not in state:
            state.update(self.rule.init_state(local.detach()))
            state["step"] = 0
        step = int(state["step"]) + 1
        noise = None
        if self.stochastic_rounding and p.dtype == torch.bfloat16:
            gen, total, offset = self._generator(local.device), p.numel(), self._offset(p)

            def noise(start: int, stop: int) -> Tensor:
                return sr_noise(gen, (self.seed, i, step), offset + start, offset + stop, total)

        return state, step, noise

    def _apply(self, p: Tensor, i: int, grad: Tensor, coef: Tensor | None = None) -> None:
        """Update this rank's shard of ``p`` from its local gradient ``grad``."""
        state, step, noise = self._prepare(p, i)
        apply_update(local_shard(p), _local_grad(grad), state, self.rule, self.lr, step, coef=coef, noise=noise)
        state["step"] = step

    def _apply_blocked(self, p: Tensor, i: int, produce: BlockGrad) -> None:
        raise RuntimeError("block-wise gradients (blocked head) are not supported on sharded parameters")

    def _clip_coef(self, norms: dict[int, Tensor]) -> Tensor:
        """``clip_grad_norm_``'s coefficient of the global norm: local squared norms all-reduced over the shards."""
        assert self.max_grad_norm is not None
        device = next(iter(norms.values())).device if norms else torch.device("cpu")
        sharded = torch.zeros((), dtype=torch.float32, device=device)  # kept on the device: no host sync
        replicated = torch.zeros((), dtype=torch.float32, device=device)
        for i in sorted(norms):
            sq = norms[i].detach().to(device, torch.float32).square()
            if isinstance(self._params[i], DTensor):
                sharded += sq
            else:
                replicated += sq
        dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=self._mesh.get_group())
        total = (sharded + replicated).sqrt()
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)


def sharded_fused_optimizer(model: nn.Module, name: str, lr: float, **options: Any) -> ShardedFusedOptimizer:
    """Build a :class:`ShardedFusedOptimizer` for a model sharded by :func:`~nz_lightning.distributed.fsdp.shard_model`.

    Args:
        model: The sharded model.
        name: ``"sgd"`` or ``"adamw"`` (``"adalomo"`` is refused: see :class:`ShardedFusedOptimizer`).
        lr: Learning rate.
        **options: The rule's hyperparameters and ``max_grad_norm``, ``accumulate_grad_batches``,
            ``stochastic_rounding``, ``seed``, ``accum_dtype``.

    Returns:
        The optimizer, its hooks installed on the sharded parameters; drive it with ``opt.backward(loss)``.

    Raises:
        ValueError: Unknown rule or option, a non-elementwise rule, or a model that is not sharded.
    """
    rule, rest = build_rule(name, options, _OPTIONS, "sharded fused optimizer")
    return ShardedFusedOptimizer(model, rule, lr, **rest)
