"""Gradients that arrive one row block at a time (blocked head, blocked embedding) in a fused optimizer.

A producer (:data:`~nz_lightning.optim.blockwise.BlockGrad`) computes the gradient of row block ``k`` of a parameter
from the block's current value; nothing ever holds the parameter's whole gradient. :func:`run_blocked` feeds such a
producer through the optimizer's current mode, exactly as :meth:`FusedOptimizer._on_grad` does for whole gradients:

* ``"norm"`` (first pass of two-pass clipping): the parameter's fp32 norm is the norm of its block norms.
* ``"accumulate"``: each block is copied (first micro-batch) or added into the parameter's accumulation buffer.
* ``"update"``: pending accumulation is added block by block, then the rule updates and re-encodes the block
  (:func:`~nz_lightning.optim.blockwise.apply_blocked_update`), with the clip coefficient of the pass.

Every block gradient goes through the optimizer's ``grad_reducer`` first. The row split is
:func:`~nz_lightning.optim.blockwise.param_bounds` for compressed and dense parameters alike, so a compressed model
and its dense twin stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nz_lightning.optim.blockwise import BlockGrad, block_value, param_bounds
from nz_lightning.tensor.workspace import row_block

if TYPE_CHECKING:
    from nz_lightning.optim.fused import FusedOptimizer

__all__ = ["BlockGradsMixin", "dense_rows", "run_blocked", "sum_producers"]


def sum_producers(first: BlockGrad, second: BlockGrad) -> BlockGrad:
    """A producer of ``first(k, v) + second(k, v)`` (a tied weight: the head's part, then the embedding's)."""

    def produce(k: int, value: Tensor) -> Tensor:
        return first(k, value).add_(second(k, value))

    return produce


def dense_rows(grad: Tensor, bounds: list[tuple[int, int]]) -> BlockGrad:
    """A producer serving row blocks of an existing whole gradient (copies, so that callers may add into them)."""

    def produce(k: int, value: Tensor) -> Tensor:
        return row_block(grad, bounds, k).clone()

    return produce


def _reduced(produce: BlockGrad, reducer: Callable[[Tensor], Tensor] | None) -> BlockGrad:
    if reducer is None:
        return produce

    def produce_reduced(k: int, value: Tensor) -> Tensor:
        return reducer(produce(k, value))

    return produce_reduced


class BlockGradsMixin:
    """The block-gradient API of :class:`~nz_lightning.optim.fused.FusedOptimizer`."""

    _index: dict[int, int]
    _mode: str | None
    _seen: set[int]
    _deferred: dict[int, BlockGrad]
    _params: list[Tensor]

    def owns(self, p: Tensor) -> bool:
        """Whether ``p`` is one of the parameters this optimizer updates."""
        return id(p) in self._index

    def apply_blocked(self, p: Tensor, produce: BlockGrad) -> None:
        """Take ``p``'s gradient for this backward pass one row block at a time, instead of through ``p.grad``.

        ``produce(k, value)`` returns the gradient of row block ``k`` (:func:`~nz_lightning.optim.blockwise.
        param_bounds`) given the block's current, not yet updated value; it is called once per block and sweep, block
        after block, and each block is used (norm, accumulation or update and re-encode) before the next is produced.
        If part of ``p``'s gradient was deferred (:meth:`defer_blocked`), both parts are summed block by block.

        Raises:
            RuntimeError: Not inside :meth:`backward`, or ``p`` already got its gradient in this pass.
            ValueError: ``p`` is not a parameter of this optimizer.
        """
        i = self._arrival(p)
        head = self._deferred.pop(i, None)
        run_blocked(
            self,  # type: ignore[arg-type]
            p,
            i,
            produce if head is None else sum_producers(head, produce),
        )

    def defer_blocked(self, p: Tensor, produce: BlockGrad) -> None:
        """Hold part of ``p``'s gradient (by blocks) until the rest arrives in this pass, e.g. a tied head's part.

        The rest arrives through ``p.grad`` or :meth:`apply_blocked`; if it never does, the deferred part alone is
        used when the backward pass ends. ``produce`` must stay valid until then (the weight is not updated before).

        Raises:
            RuntimeError: Not inside :meth:`backward`, or ``p`` already has a deferred part or its gradient.
            ValueError: ``p`` is not a parameter of this optimizer.
        """
        i = self._check_index(p)
        self._require_backward()
        if i in self._seen or i in self._deferred:
            raise RuntimeError("defer_blocked: a parameter's gradient may be deferred once per pass, before it arrived")
        self._deferred[i] = produce

    # -- internals -------------------------------------------------------------------------------------

    def _require_backward(self) -> None:
        if self._mode is None:
            raise RuntimeError(
                "this model's parameters are driven by a FusedOptimizer: call opt.backward(loss) instead of "
                "loss.backward() (or opt.remove_hooks() to detach it)"
            )

    def _check_index(self, p: Tensor) -> int:
        i = self._index.get(id(p))
        if i is None:
            raise ValueError("this parameter is not one the FusedOptimizer updates")
        return i

    def _arrival(self, p: Tensor) -> int:
        """The index of ``p``, after checking that its gradient may arrive now (once per pass, inside backward)."""
        i = self._check_index(p)
        self._require_backward()
        if i in self._seen:
            raise RuntimeError(
                "a parameter received its gradient twice in one backward pass (reentrant checkpointing of a "
                "shared weight?); fused updates need it once: use non-reentrant checkpointing"
            )
        self._seen.add(i)
        return i

    def _flush_deferred(self) -> None:
        """Use the deferred parts whose rest never came in this pass (e.g. a tied head, ``inputs_embeds`` given)."""
        while self._deferred:
            i, produce = self._deferred.popitem()
            self._seen.add(i)
            run_blocked(self, self._params[i], i, produce)  # type: ignore[arg-type]


def run_blocked(opt: FusedOptimizer, p: Tensor, i: int, produce: BlockGrad) -> None:
    """Use parameter ``i``'s block-wise gradient in ``opt``'s current mode (see the module docstring)."""
    produce = _reduced(produce, opt.grad_reducer)
    bounds = param_bounds(p)
    mode = opt._mode
    if mode == "norm":
        norms = []
        for k in range(len(bounds)):
            with block_value(p, k) as value:
                norms.append(torch.linalg.vector_norm(produce(k, value), 2, dtype=torch.float32))
        opt._norms[i] = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), 2)
    elif mode == "accumulate":
        buf = opt._accum.get(i)
        fresh = buf is None
        if buf is None:
            buf = torch.empty(p.shape, dtype=opt.accum_dtype or p.dtype, device=p.device)
        for k in range(len(bounds)):
            with block_value(p, k) as value:
                g = produce(k, value)
            target = row_block(buf, bounds, k)
            target.copy_(g) if fresh else target.add_(g)
        opt._accum[i] = buf
    else:
        pending = opt._accum.pop(i, None)
        if pending is not None:
            inner, added = produce, set()

            def produce(k: int, value: Tensor) -> Tensor:  # AdaLomo asks twice per block: add once
                rows = row_block(pending, bounds, k)
                if k not in added:
                    rows.add_(inner(k, value))
                    added.add(k)
                return rows

        opt._apply_blocked(p, i, produce)
