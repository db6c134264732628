"""Embedding whose weight gradient is produced, and used by the fused optimizer, one row block at a time.

Autograd's ``embedding`` backward builds a dense ``vocab x hidden`` gradient. :class:`BlockedEmbedding` (an
``nn.Embedding`` whose class is swapped in place by :func:`install_blocked_embedding`) instead hands the fused
optimizer a producer of each row block's gradient: torch's own ``embedding_dense_backward`` run on the block's rows
only (tokens of other blocks are sent to one spare row that is dropped). Each row therefore sums the same gradient
rows, in the same token order, as the dense backward: on CPU, where torch's order is deterministic, the result is
bit-identical to it (tested). No host sync; the token loop runs once per block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nz_lightning.optim.blockwise import param_bounds
from nz_lightning.optim.linear_ce import BlockSink

__all__ = ["BlockedEmbedding", "embedding_block_grad", "install_blocked_embedding", "uninstall_blocked_embedding"]


def embedding_block_grad(
    grad: Tensor, indices: Tensor, start: int, stop: int, padding_idx: int | None, scale_grad_by_freq: bool
) -> Tensor:
    """Rows ``start:stop`` of ``embedding``'s weight gradient, summed in torch's order.

    Args:
        grad: ``[N, H]`` gradient of the looked-up rows.
        indices: ``[N]`` looked-up rows.
        start: First row of the block.
        stop: One past its last row.
        padding_idx: The embedding's (non-negative) padding row, or ``None``.
        scale_grad_by_freq: As ``nn.Embedding``'s (frequencies are per row, so per block is exact).

    Returns:
        A ``[stop - start, H]`` tensor in ``grad``'s dtype.
    """
    rows = stop - start
    local = indices - start
    local = torch.where((local < 0) | (local >= rows), rows, local)  # other blocks' tokens: the spare row
    pad = padding_idx - start if padding_idx is not None and start <= padding_idx < stop else -1
    out = torch.ops.aten.embedding_dense_backward(grad, local, rows + 1, pad, scale_grad_by_freq)
    return out[:rows]


class _EmbeddingBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, indices: Tensor, weight: Tensor, module: BlockedEmbedding) -> Tensor:
        ctx.save_for_backward(indices)
        ctx.weight, ctx.module = weight, module
        return F.embedding(indices, weight, module.padding_idx, None, 2.0, module.scale_grad_by_freq, False)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, None, None]:
        (indices,) = ctx.saved_tensors
        weight, module = ctx.weight, ctx.module
        idx = indices.reshape(-1)
        grad = grad_out.reshape(idx.numel(), -1).contiguous()
        bounds = param_bounds(weight)
        pad = module.padding_idx
        pad = None if pad is None else (pad + weight.shape[0] if pad < 0 else pad)

        def produce(k: int, value: Tensor) -> Tensor:
            start, stop = bounds[k]
            return embedding_block_grad(grad, idx, start, stop, pad, module.scale_grad_by_freq)

        sink = module._nz_sink
        assert sink is not None
        sink.apply_blocked(weight, produce)
        return None, None, None


class BlockedEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose weight gradient goes to a fused optimizer by row blocks (see the module doc).

    Outside a gradient-recording forward, or without its optimizer, it is a plain ``nn.Embedding``.
    """

    _nz_sink: BlockSink | None = None

    def forward(self, input: Tensor) -> Tensor:
        """The embedding lookup; its backward hands the weight gradient to the optimizer block by block."""
        sink = self._nz_sink
        if sink is None or not (torch.is_grad_enabled() and self.weight.requires_grad) or not sink.owns(self.weight):
            return super().forward(input)
        out: Tensor = _EmbeddingBlocks.apply(input, self.weight, self)
        return out


def install_blocked_embedding(module: nn.Module, sink: BlockSink) -> bool:
    """Make ``module`` (an exact ``nn.Embedding``) a :class:`BlockedEmbedding` feeding ``sink``; ``False`` if unfit."""
    emb: Any = module
    fit = type(emb) is nn.Embedding and emb.max_norm is None and not emb.sparse
    if fit:
        emb.__class__ = BlockedEmbedding
        emb._nz_sink = sink
    return fit


def uninstall_blocked_embedding(module: nn.Module) -> None:
    """Undo :func:`install_blocked_embedding`."""
    if type(module) is BlockedEmbedding:
        emb: Any = module
        emb.__class__ = nn.Embedding
        del emb._nz_sink
