"""One fused update (read -> rule -> write) of one parameter, row block by row block.

A compressed weight is held as row blocks (:func:`~nz_lightning.tensor.workspace.row_bounds`). For an elementwise rule
(SGD, AdamW) each block is decoded into a pooled buffer, updated with the matching rows of the gradient and of the
state, and re-encoded before the next block is decoded, so one block's dense copy and encoder buffers exist at a
time instead of a whole matrix's. AdaLomo first takes its row/column statistics (and, with ``scale_parameter``, the
parameter's RMS) over the full matrix, then updates block by block; its results equal the full-matrix formula.

A dense parameter goes through the same loop with the same row split, so that a compressed model and its dense twin
stay bit-identical: PyTorch's CPU kernels can round the last elements of a range differently from the rest
(vectorized body vs. scalar tail, e.g. bf16 ``add`` with ``alpha``), so the split must match.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from nz_lightning.optim.rules import AdaLomo, UpdateRule, stochastic_round_to_bf16
from nz_lightning.tensor.parameter import NZParameter, read_dense, write_dense
from nz_lightning.tensor.reuse import REUSE
from nz_lightning.tensor.workspace import DECODE_POOL, decoded_block, row_block, row_bounds

__all__ = [
    "SR_CHUNK",
    "BlockGrad",
    "apply_blocked_update",
    "apply_update",
    "block_value",
    "mix_seed",
    "param_bounds",
    "sr_noise",
]

SR_CHUNK = 1 << 18
"""Elements per independently seeded chunk of the stochastic-rounding noise (so the noise of any row block can be
drawn on its own, and does not depend on how the parameter is split)."""

_MASK63 = (1 << 63) - 1
Noise = Callable[[int, int], Tensor]
"""``noise(start, stop)``: the stochastic-rounding bits of flat elements ``start:stop`` of a parameter."""
BlockGrad = Callable[[int, Tensor], Tensor]
"""``produce(k, value)``: the gradient of row block ``k`` of a parameter, given the block's current (pre-update)
value ``value``; may be called more than once per block (AdaLomo makes two sweeps) and must return the same bits."""


def param_bounds(p: Tensor) -> list[tuple[int, int]]:
    """The row blocks ``p`` is updated by: its store's blocks if compressed, else :func:`row_bounds` of its shape."""
    return p.store.bounds if isinstance(p, NZParameter) else row_bounds(p.shape, p.element_size())


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so that nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return (h ^ (h >> 29)) & _MASK63


def sr_noise(gen: torch.Generator, key: tuple[int, ...], start: int, stop: int, total: int) -> Tensor:
    """The stochastic-rounding bits of flat elements ``start:stop`` of a ``total``-element tensor.

    Chunk ``c`` of :data:`SR_CHUNK` elements is drawn from ``gen`` re-seeded with ``mix_seed(*key)`` (``c == 0``)
    or ``mix_seed(*key, c)``, so the bits of an element depend only on ``key`` and its position, on every device.

    Args:
        gen: The generator to re-seed and draw from (on the parameter's device).
        key: What identifies this update, e.g. ``(seed, parameter index, step)``.
        start: First flat element.
        stop: One past the last flat element.
        total: Number of elements of the whole tensor.

    Returns:
        ``stop - start`` int32 values in ``[0, 2**16)``.
    """
    parts = [torch.empty(0, dtype=torch.int32, device=gen.device)]
    for c in range(start // SR_CHUNK, (stop + SR_CHUNK - 1) // SR_CHUNK):
        lo, hi = c * SR_CHUNK, min((c + 1) * SR_CHUNK, total)
        gen.manual_seed(mix_seed(*key) if c == 0 else mix_seed(*key, c))
        draw = torch.randint(0, 1 << 16, (hi - lo,), dtype=torch.int32, device=gen.device, generator=gen)
        parts.append(draw[max(start, lo) - lo : min(stop, hi) - lo])
    return parts[-1] if len(parts) == 2 else torch.cat(parts)


def apply_update(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    rule: UpdateRule,
    lr: float,
    step: int,
    *,
    coef: Tensor | None = None,
    noise: Noise | None = None,
) -> None:
    """Update ``p`` in place from ``grad`` (scaled by the clip coefficient ``coef``), one row block at a time.

    Args:
        p: A trainable parameter (compressed or dense).
        grad: Its full gradient (not mutated).
        state: Its rule state (mutated; ``"step"`` is left to the caller).
        rule: The update rule.
        lr: Learning rate.
        step: 1-based number of this update.
        coef: Gradient scale (clipping), or ``None``.
        noise: Stochastic-rounding bits by flat element range (bf16 only), or ``None`` to round to nearest.
    """
    store = p.store if isinstance(p, NZParameter) else None
    bounds = param_bounds(p)
    factored = isinstance(rule, AdaLomo) and "exp_avg_sq_row" in state
    if coef is not None and not (len(bounds) > 1 and rule.elementwise):
        grad, coef = grad * coef.to(grad.device), None  # out of place: autograd may still share the gradient
    # the value decoded for this weight's backward op, if still held (nz_lightning.tensor.reuse), else decodes
    reused = REUSE.take(p.store) if isinstance(p, NZParameter) and p.is_whole_store() else None
    held = None if reused is None else reused[0]
    try:
        if len(bounds) > 1 and factored:
            assert isinstance(rule, AdaLomo)
            _factored_blocks(p, bounds, grad, state, rule, lr, step, noise, held)
        elif len(bounds) > 1 and rule.elementwise:
            shaped = {k for k, v in state.items() if isinstance(v, Tensor) and v.shape == p.shape}
            for k in range(len(bounds)):
                g = row_block(grad, bounds, k)
                g = g if coef is None else g * coef.to(g.device)
                st = {key: row_block(v, bounds, k) if key in shaped else v for key, v in state.items()}
                with _block(p, bounds, k, held) as value:
                    new = _rule(rule, value, g, st, lr, step, store is not None, _block_noise(noise, p, bounds, k))
                    _write_block(p, bounds, k, new)
        else:
            value = read_dense(p) if held is None else held
            new = _rule(rule, value, grad, state, lr, step, store is not None, _block_noise(noise, p, bounds, 0))
            del value  # free the decoded copy before re-encoding
            write_dense(p, new)
    finally:
        del held
        if reused is not None:
            DECODE_POOL.release(reused[1])


def _factored_blocks(
    p: Tensor,
    bounds: list[tuple[int, int]],
    grad: Tensor,
    state: dict[str, Tensor],
    rule: AdaLomo,
    lr: float,
    step: int,
    noise: Noise | None,
    held: Tensor | None = None,
) -> None:
    """AdaLomo on a matrix: statistics over the full gradient (and parameter), then the update block by block
    (``held``: the full value already decoded, else each block is decoded)."""
    r_factor, c_factor, clip = rule.factored_stats(grad, state, step)
    param32: Tensor | None = None
    rate: Tensor | float = lr
    if rule.scale_parameter:  # RMS(param) needs the full parameter (in fp32, as the full-matrix formula)
        param32 = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        for k in range(len(bounds)):
            with _block(p, bounds, k, held) as value:
                row_block(param32, bounds, k).copy_(value)
        rate = rule.rate(param32, lr)
    for k in range(len(bounds)):
        c_k = row_block(c_factor, bounds, k) if p.dim() >= 3 else c_factor
        g_k, r_k = row_block(grad, bounds, k), row_block(r_factor, bounds, k)
        if param32 is not None:
            new = rule.factored_apply(row_block(param32, bounds, k), g_k, r_k, c_k, clip, rate)
        else:
            with _block(p, bounds, k, held) as value:
                new = rule.factored_apply(value.to(torch.float32, copy=True), g_k, r_k, c_k, clip, rate)
        bits = _block_noise(noise, p, bounds, k)
        _write_block(p, bounds, k, new.to(p.dtype) if bits is None else stochastic_round_to_bf16(new, noise=bits))
        del new


def apply_blocked_update(
    p: Tensor,
    produce: BlockGrad,
    state: dict[str, Tensor],
    rule: UpdateRule,
    lr: float,
    step: int,
    *,
    coef: Tensor | None = None,
    noise: Noise | None = None,
) -> None:
    """Update ``p`` in place from a gradient that exists only one row block at a time (``produce``).

    Elementwise rules make one sweep: decode block ``k``, ``g = produce(k, value)``, update, re-encode. AdaLomo on a
    matrix makes two (:func:`_factored_sweeps`): its factored statistics and update RMS need the whole gradient.

    Args:
        p: A trainable parameter (compressed or dense), updated by the blocks of :func:`param_bounds`.
        produce: The gradient of each row block, given the block's pre-update value (see :data:`BlockGrad`).
        state: Its rule state (mutated; ``"step"`` is left to the caller).
        rule: The update rule.
        lr: Learning rate.
        step: 1-based number of this update.
        coef: Gradient scale (clipping), or ``None``.
        noise: Stochastic-rounding bits by flat element range (bf16 only), or ``None``.

    Raises:
        TypeError: A rule that is neither elementwise nor factored AdaLomo on a 2-D parameter.
    """
    bounds, scratch = param_bounds(p), isinstance(p, NZParameter)
    if isinstance(rule, AdaLomo) and "exp_avg_sq_row" in state and p.dim() == 2:
        _factored_sweeps(p, bounds, produce, state, rule, lr, step, coef, noise)
        return
    if not rule.elementwise:
        raise TypeError(f"block-wise gradients need an elementwise rule or AdaLomo on a matrix, got {rule.name}")
    shaped = {k for k, v in state.items() if isinstance(v, Tensor) and v.shape == p.shape}
    for k in range(len(bounds)):
        with _block(p, bounds, k) as value:
            g = produce(k, value)
            g = g if coef is None else g * coef.to(g.device)
            st = {key: row_block(v, bounds, k) if key in shaped else v for key, v in state.items()}
            new = _rule(rule, value, g, st, lr, step, scratch, _block_noise(noise, p, bounds, k))
            _write_block(p, bounds, k, new)
            del g, new


def _factored_sweeps(
    p: Tensor,
    bounds: list[tuple[int, int]],
    produce: BlockGrad,
    state: dict[str, Tensor],
    rule: AdaLomo,
    lr: float,
    step: int,
    coef: Tensor | None,
    noise: Noise | None,
) -> None:
    """AdaLomo on a matrix from block gradients: two sweeps over the blocks, each producing every block's gradient.

    Sweep 1 updates the row statistics block by block and sums, over the rows, the column statistics
    (``g^2 + eps1``), ``g^2 / row`` (which gives the RMS of the update without the update:
    ``sum (r_i c_j g_ij)^2 = mean(row) * sum_j (sum_i g_ij^2 / row_i) / col_j``) and, with ``scale_parameter``, the
    parameter's squares. Sweep 2 applies the update block by block. Equal to the whole-matrix formula up to rounding
    (column sums and norms are summed block by block); compressed and dense twins take the same path (same bits).
    """
    f32 = torch.float32
    beta2t = rule._beta2t(step)
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    rows, cols = p.shape
    col_sum = torch.zeros(cols, dtype=f32, device=p.device)
    weighted = torch.zeros(cols, dtype=f32, device=p.device)
    param_sq = torch.zeros((), dtype=f32, device=p.device)

    def grad32(k: int, value: Tensor) -> Tensor:
        g = produce(k, value).to(f32)
        return g if coef is None else g.mul_(coef.to(g.device))

    for k in range(len(bounds)):
        with _block(p, bounds, k) as value:
            g = grad32(k, value)
            if rule.scale_parameter:
                param_sq += value.to(f32).square().sum()
        sq = g.square().add_(rule.eps[0])
        r_k = row_block(row, bounds, k)
        r_k.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
        col_sum += sq.sum(dim=0)
        weighted += g.square_().div_(r_k.unsqueeze(-1)).sum(dim=0)
        del g, sq
    col.mul_(beta2t).add_(col_sum.div_(rows), alpha=1.0 - beta2t)
    mean_row = row.mean()
    r_factor = (row / mean_row).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    mean_sq = weighted.div_(col).sum().mul_(mean_row).div_(rows * cols)
    clip = (mean_sq.sqrt() / rule.clip_threshold).clamp_(min=1.0)
    rate: Tensor | float = lr
    if rule.scale_parameter:
        rate = (param_sq / max(p.numel(), 1)).sqrt().clamp_(min=rule.eps[1]) * lr
    for k in range(len(bounds)):
        with _block(p, bounds, k) as value:
            g = grad32(k, value)
            new = rule.factored_apply(value.to(f32, copy=True), g, row_block(r_factor, bounds, k), c_factor, clip, rate)
        bits = _block_noise(noise, p, bounds, k)
        _write_block(p, bounds, k, new.to(p.dtype) if bits is None else stochastic_round_to_bf16(new, noise=bits))
        del g, new


@contextlib.contextmanager
def block_value(p: Tensor, k: int) -> Iterator[Tensor]:
    """The current value of row block ``k`` (of :func:`param_bounds`) of ``p``: a pooled decode, or a view."""
    with _block(p, param_bounds(p), k) as value:
        yield value


@contextlib.contextmanager
def _block(p: Tensor, bounds: list[tuple[int, int]], k: int, held: Tensor | None = None) -> Iterator[Tensor]:
    """The current value of row block ``k``: a view of ``held`` (the full value, decoded already), else decoded into
    a pooled buffer (compressed ``p``) or a view of ``p``."""
    if held is not None:
        yield row_block(held, bounds, k)
        return
    if not isinstance(p, NZParameter):
        yield row_block(p.detach(), bounds, k)
        return
    with decoded_block(p.store, k) as value:
        yield value


def _write_block(p: Tensor, bounds: list[tuple[int, int]], k: int, new: Tensor) -> None:
    """Store ``new`` as row block ``k`` of ``p`` (re-encoding only that block of a compressed ``p``)."""
    if isinstance(p, NZParameter):
        p.store.write_block(k, new)
    else:
        row_block(p.detach(), bounds, k).copy_(new)


def _rule(
    rule: UpdateRule,
    value: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    lr: float,
    step: int,
    scratch: bool,
    noise: Tensor | None = None,
) -> Tensor:
    """The rule's new value: stochastically rounded, or computed in ``value`` when it is a scratch copy."""
    if noise is not None:
        return stochastic_round_to_bf16(rule.update_fp32(value, grad, state, lr, step), noise=noise)
    if scratch:
        return rule.update_inplace(value, grad, state, lr, step)
    return rule.update(value, grad, state, lr, step)


def _block_noise(noise: Noise | None, p: Tensor, bounds: list[tuple[int, int]], k: int) -> Tensor | None:
    if noise is None or p.dtype != torch.bfloat16:
        return None
    row = math.prod(p.shape[1:]) if p.dim() else 1
    return noise(bounds[k][0] * row, bounds[k][1] * row)
