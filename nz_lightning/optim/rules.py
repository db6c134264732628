"""Pure parameter-update rules on dense tensors, used by the fused in-backward optimizer.

A rule knows nothing about hooks, compression or parameter groups. It holds hyperparameters and maps
``(value, grad, state, lr, step)`` to the parameter's new value:

* :meth:`UpdateRule.init_state` builds the per-parameter state (a dict of tensors).
* :meth:`UpdateRule.update` returns the new value in the parameter's dtype, rounded to nearest.
* :meth:`UpdateRule.update_fp32` returns the new value in fp32, so that the caller can round it to
  bf16 stochastically (:func:`stochastic_round_to_bf16`).

Neither mutates ``p``; both mutate the tensors in ``state`` (moments, buffers). ``step`` counts the
updates applied to this parameter, this one included (1 on the first update). The key ``"step"`` in
``state`` is reserved for the caller.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SGD", "AdaLomo", "AdamW", "UpdateRule", "stochastic_round_to_bf16"]

_F32 = torch.float32


class UpdateRule:
    """Base class of the update rules: hyperparameters plus the two update entry points."""

    name: str = "rule"
    elementwise: bool = False
    """True when rows ``s:e`` of the new value depend only on rows ``s:e`` of the value, the gradient and the
    parameter-shaped state tensors: the fused optimizer then updates a large parameter one row block at a time."""

    def init_state(self, p: Tensor) -> dict[str, Tensor]:
        """The initial per-parameter state for a parameter with ``p``'s shape, dtype and device.

        Args:
            p: The parameter's dense value (only its metadata is used).

        Returns:
            A dict of state tensors (empty for stateless rules).
        """
        return {}

    def update_inplace(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lr: float, step: int) -> Tensor:
        """Like :meth:`update`, but may overwrite ``p`` (a scratch copy) to avoid one allocation.

        The result is bit-identical to :meth:`update`. The default simply calls :meth:`update`.
        """
        return self.update(p, grad, state, lr, step)

    def update_fp32(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lr: float, step: int) -> Tensor:
        """The new value of the parameter, in fp32 (not yet rounded to the parameter's dtype).

        Args:
            p: Current dense value (not mutated).
            grad: Its gradient (any float dtype; used in fp32).
            state: The parameter's state from :meth:`init_state` (mutated).
            lr: Learning rate.
            step: 1-based number of this update for this parameter.

        Returns:
            A fresh fp32 tensor of ``p``'s shape.
        """
        raise NotImplementedError

    def update(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lr: float, step: int) -> Tensor:
        """The new value of the parameter in ``p.dtype`` (round-to-nearest from the fp32 result).

        Args:
            p: Current dense value (not mutated).
            grad: Its gradient.
            state: The parameter's state (mutated).
            lr: Learning rate.
            step: 1-based number of this update for this parameter.

        Returns:
            A fresh tensor with ``p``'s shape and dtype.
        """
        return self.update_fp32(p, grad, state, lr, step).to(p.dtype)


def _fp32_copy(p: Tensor) -> Tensor:
    return p.to(dtype=_F32, copy=True)


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


class SGD(UpdateRule):
    """Stochastic gradient descent, with the formulas of ``torch.optim.SGD`` (``foreach=False``).

    ``update`` works in the promoted dtype of parameter and gradient, exactly as torch does: for a bf16
    parameter with a bf16 gradient and no momentum it computes ``p.add(g, alpha=-lr)`` and is bit-identical
    to ``torch.optim.SGD``. The momentum buffer is kept in the parameter's dtype, like torch (one extra
    parameter-sized tensor per parameter); on the first step it is a copy of the gradient. With an fp32
    accumulated gradient (gradient accumulation) the math runs in fp32 and is rounded once at the end.

    Args:
        momentum: Momentum factor (0 disables the buffer).
        weight_decay: L2 penalty added to the gradient (``g + weight_decay * p``), as in torch.
        nesterov: Nesterov momentum.
        dampening: Dampening of the momentum.

    Raises:
        ValueError: Negative hyperparameters, or Nesterov without momentum / with dampening.
    """

    name = "sgd"
    elementwise = True

    def __init__(
        self, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, dampening: float = 0.0
    ) -> None:
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum} and {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires a momentum > 0 and zero dampening")
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.dampening = dampening

    def init_state(self, p: Tensor) -> dict[str, Tensor]:
        """A momentum buffer in ``p.dtype`` when momentum is on, else nothing."""
        return {"momentum_buffer": torch.zeros(p.shape, dtype=p.dtype, device=p.device)} if self.momentum else {}

    def _step(
        self,
        p: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        lr: float,
        step: int,
        dtype: torch.dtype,
        inplace: bool = False,
    ) -> Tensor:
        value = p.to(dtype)
        g = grad.to(dtype)
        if self.weight_decay != 0:
            g = g.add(value, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = state["momentum_buffer"]
            if step == 1:
                buf.copy_(g)
            else:
                buf.mul_(self.momentum).add_(g.to(buf.dtype), alpha=1 - self.dampening)
            g = g.add(buf.to(dtype), alpha=self.momentum) if self.nesterov else buf.to(dtype)
        return value.add_(g, alpha=-lr) if inplace and value is p else value.add(g, alpha=-lr)

    def update(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lr: float, step: int) -> Tensor:
        """``torch.optim.SGD``'s update in the promoted dtype of ``p`` and ``grad``, cast back to ``p.dtype``."""
        return self._step(p, grad, state, lr, step, torch.promote_types(p.dtype, grad.dtype)).to(p.dtype)

    def update_fp32(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lr: float, step: int) -> Tensor:
        """The same update with all math in fp32 (the momentum buffer keeps its dtype)."""
        return self._step(p, grad, state, lr, step, _F32)

    def update_inplace(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lr: float, step: int) -> Tensor:
        """:meth:`update` computed in ``p``'s storage when no dtype promotion is needed (same bits)."""
        dtype = torch.promote_types(p.dtype, grad.dtype)
        return self._step(p, grad, state, lr, step, dtype, inplace=dtype == p.dtype).to(p.dtype)


class AdamW(UpdateRule):
    """AdamW (decoupled weight decay), the single-tensor formula of ``torch.optim.AdamW``, math in fp32.

    Memory: two dense moment tensors per parameter in ``state_dtype``, i.e. 2 x 4 = 8 bytes per parameter
    for fp32 states (the default) or 4 bytes per parameter for bf16 states. On an fp32 parameter with fp32
    states the update is op-for-op torch's (``foreach=False``) and so bit-identical to it. On bf16 parameters
    the math runs in fp32 (torch would run it in bf16) and the result is rounded once.

    Args:
        betas: Decay rates of the first and second moments.
        eps: Added to the denominator.
        weight_decay: Decoupled weight decay (``p *= 1 - lr * weight_decay``).
        state_dtype: Storage dtype of the moments (fp32, bf16 or fp16); math is always fp32.

    Raises:
        ValueError: Out-of-range hyperparameters or a non-float ``state_dtype``.
    """

    name = "adamw"
    elementwise = True

    def __init__(
        self,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps} and {weight_decay}")
        if state_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"state_dtype must be float32, bfloat16 or float16, got {state_dtype}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self.weight_decay = weight_decay
        self.state_dtype = state_dtype

    def init_state(self, p: Tensor) -> dict[str, Tensor]:
        """Zeroed first and second moments in ``state_dtype``."""
        return {
            "exp_avg": torch.zeros(p.shape, dtype=self.state_dtype, device=p.device),
            "exp_avg_sq": torch.zeros(p.shape, dtype=self.state_dtype, device=p.device),
        }

    def update_fp32(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lr: float, step: int) -> Tensor:
        """One AdamW step in fp32; the moments are updated in place (via an fp32 copy if stored narrower)."""
        beta1, beta2 = self.betas
        param = _fp32_copy(p)
        g = grad.to(_F32)
        exp_avg, exp_avg_sq = state["exp_avg"].to(_F32), state["exp_avg_sq"].to(_F32)
        if self.weight_decay != 0:
            param.mul_(1 - lr * self.weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if state["exp_avg"].dtype != _F32:
            state["exp_avg"].copy_(exp_avg)
            state["exp_avg_sq"].copy_(exp_avg_sq)
        return param


class AdaLomo(UpdateRule):
    """AdaLomo: Adafactor-style factored second moment, no momentum, RMS-clipped update (math in fp32).

    For a parameter with 2 or more dimensions the second moment is factored over the last two: a row vector
    ``r`` (mean of ``g^2 + eps1`` over columns) and a column vector ``c`` (mean over rows), each an EMA, and
    ``v ~= r c^T / mean(r)``. State is O(rows + cols) fp32 values per matrix (times the leading dims for
    higher-rank tensors) instead of O(rows x cols); 0-D/1-D parameters keep a full fp32 second moment.
    The update ``g / sqrt(v)`` is divided by ``max(1, RMS(update) / clip_threshold)``, the learning rate is
    scaled by ``max(eps2, RMS(p))`` when ``scale_parameter`` is on, and decoupled weight decay uses that
    scaled rate (as in LOMO's ``AdaLomo``).

    Args:
        eps: ``(eps1, eps2)``: added to ``g^2``; floor of the parameter RMS used for the relative step.
        clip_threshold: RMS bound of the normalized update.
        decay_rate: Exponent of the EMA schedule ``beta2_t = 1 - t ** decay_rate`` (Adafactor/AdaLomo).
        beta2: A constant EMA rate used instead of the schedule when given.
        weight_decay: Decoupled weight decay.
        scale_parameter: Scale the learning rate by the parameter's RMS (relative step).

    Raises:
        ValueError: Out-of-range hyperparameters.
    """

    name = "adalomo"

    def __init__(
        self,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta2: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
    ) -> None:
        if len(eps) != 2 or eps[0] < 0 or eps[1] < 0:
            raise ValueError(f"eps must be two numbers >= 0, got {eps}")
        if clip_threshold <= 0:
            raise ValueError(f"clip_threshold must be > 0, got {clip_threshold}")
        if decay_rate >= 0:
            raise ValueError(f"decay_rate must be < 0, got {decay_rate}")
        if beta2 is not None and not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.eps = (float(eps[0]), float(eps[1]))
        self.clip_threshold = clip_threshold
        self.decay_rate = decay_rate
        self.beta2 = beta2
        self.weight_decay = weight_decay
        self.scale_parameter = scale_parameter

    def init_state(self, p: Tensor) -> dict[str, Tensor]:
        """Row and column second-moment vectors (>= 2-D) or a full second moment (0-D/1-D), all fp32."""
        if p.dim() >= 2:
            return {
                "exp_avg_sq_row": torch.zeros(p.shape[:-1], dtype=_F32, device=p.device),
                "exp_avg_sq_col": torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=_F32, device=p.device),
            }
        return {"exp_avg_sq": torch.zeros(p.shape, dtype=_F32, device=p.device)}

    def update_fp32(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], lr: float, step: int) -> Tensor:
        """One AdaLomo step in fp32; the second-moment statistics are updated in place."""
        if "exp_avg_sq_row" in state:
            r_factor, c_factor, clip = self.factored_stats(grad, state, step)
            param = _fp32_copy(p)
            return self.factored_apply(param, grad, r_factor, c_factor, clip, self.rate(param, lr))
        g = grad.to(_F32)
        v = state["exp_avg_sq"]
        v.mul_(self._beta2t(step)).add_(g * g + self.eps[0], alpha=1.0 - self._beta2t(step))
        upd = v.rsqrt().mul_(g)
        param = _fp32_copy(p)
        return self._step(param, upd.div_(self._clip(upd)), self.rate(param, lr))

    def _beta2t(self, step: int) -> float:
        return self.beta2 if self.beta2 is not None else 1.0 - math.pow(step, self.decay_rate)

    def _clip(self, upd: Tensor) -> Tensor:
        return (_rms(upd) / self.clip_threshold).clamp_(min=1.0)

    def _step(self, param: Tensor, upd: Tensor, rate: Tensor | float) -> Tensor:
        if self.weight_decay != 0:
            param.mul_(1.0 - rate * self.weight_decay)
        return param.sub_(upd.mul_(rate))

    def rate(self, param: Tensor, lr: float) -> Tensor | float:
        """The step size: ``lr`` scaled by ``max(eps2, RMS(param))`` (a 0-d tensor) with ``scale_parameter``.

        Args:
            param: The full parameter in fp32.
            lr: Learning rate.
        """
        return _rms(param).clamp_(min=self.eps[1]) * lr if self.scale_parameter else lr  # 0-d: no host sync

    def factored_stats(self, grad: Tensor, state: dict[str, Tensor], step: int) -> tuple[Tensor, Tensor, Tensor]:
        """First pass of a factored (>= 2-D) step, over the full gradient: update the row/column statistics.

        Peak scratch is one fp32 copy of the gradient at a time.

        Args:
            grad: The full gradient.
            state: The parameter's state (``exp_avg_sq_row`` / ``exp_avg_sq_col`` are updated in place).
            step: 1-based number of this update.

        Returns:
            ``(r_factor, c_factor, clip)``: ``g / sqrt(v) == r_factor * c_factor * g`` (shapes ``[..., R, 1]`` and
            ``[..., 1, C]``), and the divisor that bounds the RMS of that update (0-d).
        """
        beta2t = self._beta2t(step)
        sq = grad.to(_F32, copy=True)
        sq.mul_(sq).add_(self.eps[0])  # g * g + eps1, elementwise as in the formula
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
        del sq
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        return r_factor, c_factor, self._clip(torch.mul(r_factor, c_factor).mul_(grad))

    def factored_apply(
        self, param: Tensor, grad: Tensor, r_factor: Tensor, c_factor: Tensor, clip: Tensor, rate: Tensor | float
    ) -> Tensor:
        """Second pass of a factored step on the full parameter or any row block of it (elementwise).

        Args:
            param: The parameter (or rows of it) in fp32; overwritten with the result.
            grad: The matching rows of the gradient.
            r_factor: The matching rows of :meth:`factored_stats`' ``r_factor``.
            c_factor: :meth:`factored_stats`' ``c_factor`` (its matching rows of dim 0 for >= 3-D parameters).
            clip: :meth:`factored_stats`' divisor.
            rate: :meth:`rate` of the full parameter.

        Returns:
            ``param``, updated.
        """
        return self._step(param, torch.mul(r_factor, c_factor).mul_(grad).div_(clip), rate)


def stochastic_round_to_bf16(
    x: Tensor, generator: torch.Generator | None = None, *, noise: Tensor | None = None
) -> Tensor:
    """Round fp32 ``x`` to bf16 stochastically: add 16 uniform random low bits, then truncate.

    A value between two bf16 neighbours is rounded up with probability equal to its distance from the lower
    one (in units of the gap), so the rounding is unbiased in expectation. NaN and +-inf pass through
    unchanged; finite values beyond the bf16 range may round to +-inf, as under round-to-nearest.

    Args:
        x: Values to round (converted to fp32 first if needed).
        generator: Source of the random bits (on ``x``'s device), unless ``noise`` is given.
        noise: The random low bits themselves: ``x.numel()`` int32 values in ``[0, 2**16)``.

    Returns:
        A bf16 tensor of ``x``'s shape.

    Raises:
        ValueError: Neither ``generator`` nor ``noise`` was given.
    """
    x = x.to(_F32).contiguous()
    if noise is None:
        if generator is None:
            raise ValueError("stochastic_round_to_bf16 needs a generator or the noise")
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = (x.view(torch.int32) + noise.view(x.shape)).bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32
    rounded = bits.view(_F32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16))
