"""Fused in-backward optimizer (LOMO-style): each parameter is updated, and re-compressed, as soon as its
gradient is ready, and its gradient is freed at once, so no full-model gradient buffer ever exists.

Compressed (:class:`~nz_lightning.tensor.parameter.NZParameter`) and dense parameters take exactly the same
code path (read -> rule -> write, row block by row block for large weights: :mod:`.blockwise`), so a compressed
model and its uncompressed twin trained with the same fused optimizer stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from nz_lightning.optim.block_grads import BlockGradsMixin, dense_rows, run_blocked, sum_producers
from nz_lightning.optim.blockwise import BlockGrad, apply_blocked_update, apply_update, param_bounds, sr_noise
from nz_lightning.optim.fused_state import FusedStateMixin
from nz_lightning.optim.overlap import InflightReductions, is_async_reducer
from nz_lightning.optim.rules import UpdateRule
from nz_lightning.tensor.deferred_encode import ENCODES
from nz_lightning.tensor.parameter import is_compressed
from nz_lightning.tensor.reuse import REUSE

__all__ = ["FusedOptimizer"]


def _is_lossy(p: Tensor) -> bool:
    """Whether ``p`` is held in a lossy compressed format (fewer mantissa bits than its dtype has)."""
    return is_compressed(p) and bool(getattr(getattr(p, "store", None), "lossy", False))


class FusedOptimizer(BlockGradsMixin, FusedStateMixin, torch.optim.Optimizer):
    """Applies an :class:`~nz_lightning.optim.rules.UpdateRule` inside backward, parameter by parameter.

    Use :meth:`backward` instead of ``loss.backward()`` + ``step()``::

        opt = fused_optimizer(model, "adamw", lr=1e-4, max_grad_norm=1.0)
        for batch in data:
            opt.backward(model(**batch).loss)
            opt.step()       # no-op, keeps LR schedulers' bookkeeping happy
            sched.step()

    A ``register_post_accumulate_grad_hook`` on every trainable parameter (each tied parameter once) reads
    the value, applies the rule, writes it back (re-compressing compressed parameters) and drops the
    gradient. A plain ``loss.backward()`` on the model raises while the hooks are installed.

    * Clipping (``max_grad_norm``) needs the global norm before any update, so it runs two backward passes
      like LOMO: the first (``retain_graph=True``) only measures per-parameter fp32 norms and drops the
      gradients; the second applies the updates to gradients scaled by
      ``min(1, max_norm / (total_norm + 1e-6))`` (``clip_grad_norm_``'s coefficient). Cost: one extra
      backward per step, and the activations (the autograd graph) stay alive between the two passes.
    * Accumulation (``accumulate_grad_batches=k``): calls 1..k-1 add each gradient into a persistent dense
      buffer in ``accum_dtype`` (fp32 by default: one full gradient buffer, 4 bytes per trainable
      parameter); call k adds its own gradient and updates with the plain sum (what ``.grad`` accumulation
      gives: scale each micro-batch loss yourself, e.g. by 1/k), then frees the buffers. With clipping too,
      call k accumulates, computes the norm of the summed buffers and updates after backward (one pass).
    * Per-tensor norms are taken in fp32 (``clip_grad_norm_`` uses the gradient dtype: identical for fp32
      parameters, more exact for bf16 ones) and stacked in ``clip_grad_norm_``'s order.
    * With activation checkpointing, two-pass clipping recomputes the checkpointed forward in both passes.
      Reentrant checkpointing of a weight also used outside the checkpoint delivers its gradient twice;
      that raises (in the norm pass before any update when clipping, else after the first partial update).
    * Only the parameters present at construction are hooked; ``state_dict`` identifies them by position.
    * Hugging Face causal LMs get the blocked head (``blocked_head=True``, :mod:`~nz_lightning.optim.blocked_head`):
      the loss is computed one row block of ``lm_head`` at a time and each block's gradient is handed to
      :meth:`apply_blocked` inside the loss's backward; the input embedding's gradient comes by blocks too. Neither
      the logits of the whole vocabulary nor the head's or the embedding's whole gradient ever exist.

    Args:
        model: The model; its trainable parameters, in ``model.parameters()`` order, are optimized.
        rule: The update rule.
        lr: Learning rate (``param_groups[0]["lr"]``; LR schedulers drive it).
        max_grad_norm: Global 2-norm bound of the gradient (``None``: no clipping).
        accumulate_grad_batches: Number of :meth:`backward` calls per update.
        stochastic_rounding: Round bf16 parameters' fp32 results stochastically instead of to nearest.
        seed: Seed of the stochastic rounding. Each update draws from a generator re-seeded from
            ``(seed, parameter index, step)`` (and the chunk index past the first
            :data:`~nz_lightning.optim.blockwise.SR_CHUNK` elements), so results depend neither on hook order
            nor on the row-block split.
        accum_dtype: Dtype of the accumulation buffers (``None``: each parameter's dtype).
        grad_reducer: Applied to every gradient (whole or one row block) before it is used for the norm, the
            accumulation or the update, e.g. an all-reduce average for data parallelism (``None``: identity). It
            must be elementwise over the rows it gets (block results must not depend on the split) and return a
            tensor of the same shape; it may be called twice per block (AdaLomo's two sweeps).
        blocked_head: Install the blocked head and embedding on the Hugging Face causal LMs found in ``model``
            (those whose ``forward`` computes ``lm_head`` then ``self.loss_function``; others keep their plain head).

    Raises:
        ValueError: Bad option values, no trainable parameter, a lossily compressed parameter, or a fused optimizer
            already installed on the model (call its ``remove_hooks()`` first).
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
        grad_reducer: Callable[[Tensor], Tensor] | None = None,
        blocked_head: bool = True,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be an int >= 1, got {accumulate_grad_batches!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameter")
        lossy = [n for n, p in model.named_parameters() if p.requires_grad and _is_lossy(p)]
        if lossy:
            raise ValueError(f"parameters held with lossy compression cannot be trained: {', '.join(lossy)}")
        installed = [n for n, p in model.named_parameters() if p.requires_grad and _fused_hook(p) is not None]
        if installed:
            raise ValueError(
                f"a FusedOptimizer is already installed on this model (on {', '.join(installed[:3])}"
                f"{', ...' if len(installed) > 3 else ''}): one model takes one fused optimizer. Keep using it, "
                "or call its remove_hooks() first to detach it, then build the new one"
            )
        super().__init__(params, {"lr": lr})
        self.rule = rule
        self.max_grad_norm = max_grad_norm
        self.accumulate_grad_batches = accumulate_grad_batches
        self.stochastic_rounding = stochastic_rounding
        self.seed = int(seed)
        self.accum_dtype = accum_dtype
        self._params: list[Tensor] = list(params)
        self._index = {id(p): i for i, p in enumerate(params)}
        self._mode: str | None = None
        self._seen: set[int] = set()
        self._micro = 0
        self._accum: dict[int, Tensor] = {}
        self._norms: dict[int, Tensor] = {}
        self._coef: Tensor | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self.grad_reducer = grad_reducer
        self._inflight: InflightReductions | None = None
        self._deferred: dict[int, BlockGrad] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]
        from nz_lightning.optim.blocked_head import install_blocked_head  # imports this module

        self.blocked_modules: list[str] = install_blocked_head(model, self) if blocked_head else []
        """Names of the modules running the blocked head / embedding for this optimizer."""
        self._uninstall = model

    # -- public API ------------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        """The learning rate of the (first) parameter group; setting it sets every group's."""
        return float(self.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = value

    @property
    def micro_step(self) -> int:
        """Number of :meth:`backward` calls accumulated since the last update (0 right after an update)."""
        return self._micro

    def backward(self, loss: Tensor) -> None:
        """Backpropagate ``loss`` and update the parameters inside backward (or accumulate, see the class doc).

        Args:
            loss: A scalar loss of the model.

        Raises:
            RuntimeError: Called while another fused backward runs, or a parameter got two gradients in one
                pass (e.g. reentrant checkpointing of a shared weight).
        """
        if self._mode is not None:
            raise RuntimeError("FusedOptimizer.backward is not re-entrant")
        final = self._micro + 1 >= self.accumulate_grad_batches
        try:
            with ENCODES.deferring():  # re-encodes finish an update later, all before this returns
                self._passes(loss, final)
        finally:
            self._mode = None
            self._coef = None
            self._norms.clear()
        self._micro = 0 if final else self._micro + 1

    def _passes(self, loss: Tensor, final: bool) -> None:
        """The backward passes of one :meth:`backward` call (and the updates of accumulated gradients)."""
        if not final:
            self._run(loss, "accumulate")
        elif self.max_grad_norm is None:
            self._run(loss, "update")
            self._flush(None)
        elif self.accumulate_grad_batches > 1:
            self._run(loss, "accumulate")
            self._flush(self._clip_coef({i: self._norm(b) for i, b in self._accum.items()}))
        else:
            self._run(loss, "norm", retain_graph=True)
            self._coef = self._clip_coef(self._norms)
            self._run(loss, "update")

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """No-op: the updates happen in :meth:`backward`. Call it anyway if an LR scheduler drives ``lr``.

        Raises:
            ValueError: A closure was given (use ``opt.backward(loss)`` instead).
        """
        if closure is not None:
            raise ValueError("FusedOptimizer updates inside backward: call opt.backward(loss) instead of step(closure)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Harmless: gradients are dropped as soon as they are used (accumulation buffers are kept)."""
        super().zero_grad(set_to_none=set_to_none)

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (a plain ``loss.backward()`` then fills ``.grad`` again).

        The blocked head and embedding are removed too: the model computes its plain loss again.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.blocked_modules:
            from nz_lightning.optim.blocked_head import uninstall_blocked_head

            uninstall_blocked_head(self._uninstall, self)
            self.blocked_modules = []

    def _run(self, loss: Tensor, mode: str, retain_graph: bool = False) -> None:
        self._mode = mode
        self._seen.clear()
        self._deferred.clear()
        reducer = self.grad_reducer
        self._inflight = InflightReductions(reducer, self._use) if is_async_reducer(reducer) else None  # type: ignore[arg-type]
        # with reductions in flight, an update follows its backward op a few decodes later
        held = 1 if self._inflight is None else self._inflight.depth + 1
        try:
            with REUSE.holding(held):
                loss.backward(retain_graph=retain_graph)
                if self._inflight is not None:
                    self._inflight.drain()
            self._flush_deferred()
        finally:
            if self._inflight is not None:
                self._inflight.discard()
            self._inflight = None
            self._deferred.clear()

    def _on_grad(self, p: Tensor) -> None:
        grad = p.grad
        p.grad = None
        if grad is None:
            return
        if grad.is_sparse:
            raise RuntimeError("FusedOptimizer does not support sparse gradients")
        i = self._arrival(p)
        head = self._deferred.pop(i, None)
        if head is not None:  # the rest of a deferred gradient: go block-wise
            run_blocked(self, p, i, sum_producers(head, dense_rows(grad, param_bounds(p))))
            return
        if self._inflight is not None:  # reduced asynchronously: used once its reduction is finished
            self._inflight.push(i, grad)
            return
        if self.grad_reducer is not None:
            grad = self.grad_reducer(grad)
        self._use(i, grad)

    def _use(self, i: int, grad: Tensor) -> None:
        """Use parameter ``i``'s (reduced) gradient in the current pass: its norm, accumulation or update."""
        if self._mode == "norm":
            self._norms[i] = self._norm(grad)
        elif self._mode == "accumulate":
            self._accumulate(i, grad)
        else:
            buf = self._accum.pop(i, None)
            if buf is not None:
                grad = buf.add_(grad)
            self._apply(self._params[i], i, grad, self._coef)

    def _accumulate(self, i: int, grad: Tensor) -> None:
        buf = self._accum.get(i)
        if buf is None:
            self._accum[i] = grad.to(self.accum_dtype or grad.dtype, copy=True)
        else:
            buf.add_(grad)

    @staticmethod
    def _norm(grad: Tensor) -> Tensor:
        return torch.linalg.vector_norm(grad, 2, dtype=torch.float32)

    def _clip_coef(self, norms: dict[int, Tensor]) -> Tensor:
        """``clip_grad_norm_``'s coefficient from per-parameter norms, stacked in its order (by device/dtype)."""
        assert self.max_grad_norm is not None
        if not norms:
            return torch.tensor(1.0)
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for i in sorted(norms):
            p = self._params[i]
            groups.setdefault((p.device, p.dtype), []).append(norms[i])
        ordered = [n for group in groups.values() for n in group]
        first = ordered[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in ordered]), 2)
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def _flush(self, coef: Tensor | None) -> None:
        """Apply the updates still pending in the accumulation buffers (in parameter order) and free them."""
        for i in sorted(self._accum):
            grad = self._accum.pop(i)
            if coef is not None:
                grad = grad.mul_(coef.to(grad.device))
            self._apply(self._params[i], i, grad)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen

    def _apply(self, p: Tensor, i: int, grad: Tensor, coef: Tensor | None = None) -> None:
        """Update ``p`` (row block by row block, see :mod:`~nz_lightning.optim.blockwise`) and count the step."""
        state, step, noise = self._prepare(p, i)
        apply_update(p, grad, state, self.rule, self.lr, step, coef=coef, noise=noise)
        state["step"] = step

    def _apply_blocked(self, p: Tensor, i: int, produce: BlockGrad) -> None:
        """Like :meth:`_apply` for a gradient produced block by block (with the clip coefficient of the pass)."""
        state, step, noise = self._prepare(p, i)
        apply_blocked_update(p, produce, state, self.rule, self.lr, step, coef=self._coef, noise=noise)
        state["step"] = step

    def _prepare(self, p: Tensor, i: int) -> tuple[dict[str, Any], int, Callable[[int, int], Tensor] | None]:
        """``p``'s rule state (created on first use), the number of this update, and its rounding noise."""
        state = self.state[p]
        if "step" not in state:
            state.update(self.rule.init_state(p.detach()))  # only shape, dtype and device are used
            state["step"] = 0
        step = int(state["step"]) + 1
        noise = None
        if self.stochastic_rounding and p.dtype == torch.bfloat16:
            gen, total = self._generator(p.device), p.numel()

            def noise(start: int, stop: int) -> Tensor:
                return sr_noise(gen, (self.seed, i, step), start, stop, total)

        return state, step, noise


def _fused_hook(p: Tensor) -> FusedOptimizer | None:
    """The :class:`FusedOptimizer` whose post-accumulate-grad hook is installed on ``p``, if any."""
    hooks = getattr(p, "_post_accumulate_grad_hooks", None) or {}
    for hook in hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, FusedOptimizer):
            return owner
    return None
