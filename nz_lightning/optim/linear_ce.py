"""Linear + cross-entropy walked one row block of the head at a time: the logits of the whole vocabulary never exist.

Forward: for each row block of the head weight (its ``WeightStore`` blocks when compressed, the same row split
:func:`~nz_lightning.optim.blockwise.param_bounds` when dense) and each chunk of at most
:data:`LOGITS_CHUNK_ELEMENTS` logits within it, compute ``hidden @ W_chunk^T`` (in the weight dtype, then fp32, as
the plain head followed by HF's ``logits.float()``), keep its log-sum-exp and pick the target logits. Only
``hidden``, the per-token log-sum-exp and the targets are saved.

Backward: recompute each chunk's logits, form ``d loss / d logits`` (softmax minus the smoothed one-hot, scaled by the
token weights) in fp32, round it to the weight dtype (what autograd does after ``.float()``), add ``dlogits @ W_chunk``
to the input gradient (fp32 accumulator) and compute the block's weight gradient ``dlogits^T @ hidden``. With a
fused optimizer (``sink``) that block gradient goes straight to :meth:`FusedOptimizer.apply_blocked`, which updates
and re-encodes the block before the next one is decoded; the input gradient uses each block before its update.
A tied head (``defer=True``) computes the input gradient first and defers its block gradients until the embedding's
gradient arrived (they are recomputed then, block by block: one extra logits GEMM, no stored gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from nz_lightning.optim.blockwise import BlockGrad, block_value, param_bounds
from nz_lightning.tensor.workspace import row_block

__all__ = ["LOGITS_CHUNK_ELEMENTS", "BlockSink", "causal_lm_loss", "linear_cross_entropy"]

LOGITS_CHUNK_ELEMENTS = 1 << 22
"""fp32 logits computed at once (16 MiB): a head block is walked in chunks of ``max(1, this // tokens)`` rows. When
the logits of all tokens over the whole vocabulary fit in one chunk, forward keeps them for backward instead of
recomputing them (the same bits either way: one GEMM less, at most one chunk of memory)."""

_F32 = torch.float32


class BlockSink(Protocol):
    """What the blocked loss needs of a fused optimizer (:class:`~nz_lightning.optim.FusedOptimizer` has it)."""

    def owns(self, p: Tensor) -> bool: ...  # noqa: D102
    def apply_blocked(self, p: Tensor, produce: BlockGrad) -> None: ...  # noqa: D102
    def defer_blocked(self, p: Tensor, produce: BlockGrad) -> None: ...  # noqa: D102


@dataclass
class _Plan:
    bounds: list[tuple[int, int]]
    chunk_rows: int
    ignore_index: int
    label_smoothing: float
    num_items: Tensor | float | None
    sink: BlockSink | None
    defer: bool

    def chunks(self, k: int) -> list[tuple[int, int]]:
        start, stop = self.bounds[k]
        return [(c, min(c + self.chunk_rows, stop)) for c in range(start, stop, self.chunk_rows)]


def _logits(hidden: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(hidden, w, b).to(_F32)


def _in_chunk(targets: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Column of each token's target within chunk ``start:stop`` (clamped) and whether it lies there."""
    local = targets - start
    inside = (local >= 0) & (local < stop - start)
    return local.clamp(0, stop - start - 1).unsqueeze(1), inside


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, plan: _Plan) -> Tensor:
        vocab, eps = weight.shape[0], plan.label_smoothing
        lse_parts: list[Tensor] = []
        keep = hidden.shape[0] * vocab <= LOGITS_CHUNK_ELEMENTS
        kept: dict[int, Tensor] = {}
        target_logit = torch.zeros(hidden.shape[0], dtype=_F32, device=hidden.device)
        logit_sum = torch.zeros_like(target_logit) if eps else None
        for k, (start, _) in enumerate(plan.bounds):
            with block_value(weight, k) as wk:
                for cs, ce in plan.chunks(k):
                    z = _logits(hidden, wk[cs - start : ce - start], None if bias is None else bias[cs:ce])
                    lse_parts.append(torch.logsumexp(z, dim=1))
                    col, inside = _in_chunk(targets, cs, ce)
                    target_logit += torch.where(inside, z.gather(1, col).squeeze(1), 0.0)
                    if logit_sum is not None:
                        logit_sum += z.sum(dim=1)
                    if keep:
                        kept[cs] = z
                    del z
        lse = lse_parts[0] if len(lse_parts) == 1 else torch.logsumexp(torch.stack(lse_parts, dim=1), dim=1)
        valid = targets != plan.ignore_index
        per_token = lse - target_logit
        if logit_sum is not None:
            per_token = per_token.mul_(1.0 - eps).add_(lse - logit_sum / vocab, alpha=eps)
        per_token = torch.where(valid, per_token, 0.0)
        if plan.num_items is None:
            denom = valid.sum().to(_F32)
        else:
            denom = torch.as_tensor(plan.num_items, device=hidden.device).to(_F32)
        ctx.save_for_backward(hidden, targets, lse, valid)
        ctx.denom, ctx.plan, ctx.weight, ctx.bias, ctx.kept = denom, plan, weight, bias, kept
        return per_token.sum() / denom

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        hidden, targets, lse, valid = ctx.saved_tensors
        plan: _Plan = ctx.plan
        weight, bias = ctx.weight, ctx.bias
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab, eps, kept = weight.shape[0], plan.label_smoothing, ctx.kept
        scale = torch.where(valid, grad_loss.to(_F32) / ctx.denom, 0.0).unsqueeze(1)
        grad_h = torch.zeros(hidden.shape, dtype=_F32, device=hidden.device) if need_h else None
        grad_b = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device) if need_b else None
        visited: set[int] = set()

        def block_grads(k: int, wk: Tensor, want_w: bool) -> Tensor:
            """Block ``k``'s weight gradient (if ``want_w``); on the first visit also its input and bias parts."""
            first = k not in visited
            visited.add(k)
            start, stop = plan.bounds[k]
            parts = []
            for cs, ce in plan.chunks(k):
                wc = wk[cs - start : ce - start]
                z = kept.get(cs)  # kept from forward (not modified: backward may run twice), or recomputed
                z = _logits(hidden, wc, None if bias is None else bias[cs:ce]) if z is None else z.clone()
                p = z.sub_(lse.unsqueeze(1)).exp_()
                del z
                col, inside = _in_chunk(targets, cs, ce)
                p.scatter_add_(1, col, inside.to(_F32).mul_(eps - 1.0).unsqueeze(1))
                if eps:
                    p.sub_(eps / vocab)
                dl = p.mul_(scale).to(weight.dtype)
                del p
                if first and grad_h is not None:
                    grad_h.add_(dl @ wc)
                if first and grad_b is not None:
                    grad_b[cs:ce] = dl.sum(dim=0).to(grad_b.dtype)
                if want_w:
                    parts.append(dl.t() @ hidden)
            if not want_w:
                return hidden.new_empty(0)
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        def produce(k: int, value: Tensor) -> Tensor:
            return block_grads(k, value, True)

        sink, grad_w = plan.sink, None
        if need_w and sink is not None and sink.owns(weight):
            if plan.defer:  # tied: input gradient now, weight gradient when the embedding's part arrived
                for k in range(len(plan.bounds)):
                    with block_value(weight, k) as wk:
                        block_grads(k, wk, False)
                sink.defer_blocked(weight, produce)
            else:
                sink.apply_blocked(weight, produce)
        else:
            grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
            for k in range(len(plan.bounds)):
                with block_value(weight, k) as wk:
                    g = block_grads(k, wk, need_w)
                if grad_w is not None:
                    row_block(grad_w, plan.bounds, k).copy_(g)
        return (None if grad_h is None else grad_h.to(hidden.dtype)), grad_w, grad_b, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    num_items_in_batch: Tensor | int | float | None = None,
    sink: BlockSink | None = None,
    defer: bool = False,
) -> Tensor:
    """``cross_entropy(linear(hidden, weight, bias).float(), targets)`` without the logits of the whole vocabulary.

    Args:
        hidden: ``[..., H]`` inputs of the head.
        weight: ``[V, H]`` head weight (compressed or dense); walked by its row blocks.
        targets: ``hidden.shape[:-1]`` class indices (``ignore_index`` entries count for nothing).
        bias: Optional ``[V]`` bias.
        ignore_index: Targets to ignore.
        label_smoothing: As ``torch.nn.functional.cross_entropy``'s (in ``[0, 1)``).
        num_items_in_batch: ``None``: mean over the non-ignored targets; else the summed loss divided by it (HF's
            ``num_items_in_batch``).
        sink: A fused optimizer that takes ``weight``'s gradient block by block inside backward (``None``: the
            weight's gradient is returned to autograd as usual, assembled from the blocks).
        defer: ``weight`` also gets a gradient from elsewhere later in backward (a tied embedding): hand the block
            gradients over only then (:meth:`FusedOptimizer.defer_blocked`).

    Returns:
        The 0-d fp32 loss.

    Raises:
        ValueError: Shapes that do not fit, or ``label_smoothing`` out of range.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not fit a head weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have the shape of hidden without its last dim")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} does not fit a head weight {tuple(weight.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(device=h.device, dtype=torch.long)
    bad = (t != ignore_index) & ((t < 0) | (t >= weight.shape[0]))
    torch._assert_async(~bad.any(), "linear_cross_entropy: a target is out of bounds")
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // max(1, h.shape[0]))
    plan = _Plan(param_bounds(weight), chunk, ignore_index, float(label_smoothing), num_items_in_batch, sink, defer)
    loss: Tensor = _LinearCrossEntropy.apply(h, weight, bias, t, plan)
    return loss


def causal_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """HF's ``ForCausalLMLoss`` on ``linear(hidden, weight, bias)`` computed by :func:`linear_cross_entropy`.

    Position ``t`` predicts ``labels[..., t + 1]`` (the last position predicts nothing), unless ``shift_labels``
    gives the targets already shifted.

    Args:
        hidden: ``[B, T, H]`` last hidden states.
        weight: The head weight.
        labels: ``[B, T]`` labels (``ignore_index`` where no loss is wanted).
        bias: Optional head bias.
        ignore_index: Ignored label value.
        shift_labels: Already shifted targets (``[B, T]``), used instead of ``labels``.
        **options: ``label_smoothing``, ``num_items_in_batch``, ``sink``, ``defer`` of :func:`linear_cross_entropy`.

    Returns:
        The 0-d fp32 loss.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return linear_cross_entropy(hidden, weight, shift_labels, bias, ignore_index=ignore_index, **options)
