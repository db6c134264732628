"""Baselines to compare NeuZip's lossy mode with: per-row absmax int8 weights that report their own size.

:func:`quantize_rowwise_int8` replaces, in place, every ``nn.Linear``, Hugging Face ``Conv1D`` and (optionally)
``nn.Embedding`` by a module that holds its weight as int8 values plus one absmax scale per output row, and
dequantizes it to the input's dtype on every forward (weight-only quantization: activations and the GEMM stay in
the input dtype, as with bitsandbytes' ``LLM.int8`` without outlier handling). Each output row ``r`` stores::

    scale[r] = absmax(w[r]) / 127            (float32, 4 bytes per row)
    q[r, j]  = round_half_even(w[r, j] / scale[r])  in [-127, 127]
    w_hat    = q * scale                      (|w - w_hat| <= scale / 2)

Scales are kept in float32 (not the weight dtype) so that the error bound above holds exactly up to fp32 rounding;
they cost ``32 / in_features`` bits per weight, which :meth:`Int8Weight.weight_sizes` counts. A row of zeros gets
scale 0 and dequantizes to zeros.

:class:`Int8Weight` implements :class:`~nz_lightning.tensor.sizes.SizedWeight`, so
:func:`~nz_lightning.tensor.sizes.weight_sizes` counts a model's weights in whatever form they are held: dense,
NeuZip-compressed (:class:`~nz_lightning.NZParameter`, by serialized bytes) or int8 from this module (values plus
scales), each tied tensor once.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from nz_lightning.tensor.parameter import NZParameter
from nz_lightning.tensor.sizes import WeightSizes

INT8_MAX = 127
"""Largest magnitude of a quantized value (symmetric range [-127, 127]; -128 is never used)."""

_CHUNK_ELEMENTS = 1 << 22
"""Quantization works on slices of at most about this many elements, bounding its fp32 temporaries."""

__all__ = [
    "INT8_MAX",
    "Int8Conv1D",
    "Int8Embedding",
    "Int8Linear",
    "Int8Weight",
    "dequantize_int8",
    "quantize_int8",
    "quantize_rowwise_int8",
    "relative_errors",
]


def quantize_int8(weight: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 quantization of a 2-D tensor with one scale per index of ``dim``.

    Args:
        weight: Floating-point matrix (any float dtype, any device); it is not modified.
        dim: The axis that has one scale per index: 0 for ``[out, in]`` weights (Linear, Embedding), 1 for
            ``[in, out]`` weights (HF ``Conv1D``).

    Returns:
        ``(q, scale)``: ``q`` int8 with ``weight``'s shape, ``scale`` float32 of shape ``[weight.shape[dim]]``,
        such that ``|weight - q * scale| <= scale / 2`` elementwise (scale broadcast along ``dim``).

    Raises:
        ValueError: ``weight`` is not a 2-D floating-point tensor, ``dim`` is not 0 or 1, or a value is not finite.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D floating-point weight, got {tuple(weight.shape)} {weight.dtype}")
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 or 1, got {dim}")
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[dim], dtype=torch.float32, device=w.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1 - dim]))
    for start in range(0, w.shape[dim], step):
        part = w.narrow(dim, start, min(step, w.shape[dim] - start)).float()
        absmax = part.abs().amax(dim=1 - dim, keepdim=True)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError("cannot quantize a weight with non-finite values to int8")
        s = absmax / INT8_MAX
        safe = torch.where(s > 0, s, torch.ones_like(s))  # zero rows: any divisor gives q = 0
        q.narrow(dim, start, part.shape[dim]).copy_(torch.round(part / safe).clamp_(-INT8_MAX, INT8_MAX))
        scale.narrow(0, start, part.shape[dim]).copy_(s.reshape(-1))
    return q, scale


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, dim: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q * scale`` computed in float32 (scale broadcast along ``dim``), then cast to ``dtype``."""
    s = scale.float().unsqueeze(1 - dim)
    return (q.float() * s).to(dtype)


class Int8Weight(nn.Module):
    """An int8 weight matrix with per-row float32 scales; one instance is shared by all modules tied to it.

    A :class:`~nz_lightning.tensor.sizes.SizedWeight`: :func:`~nz_lightning.tensor.sizes.weight_sizes` counts it
    (once, however many modules share it) by :meth:`weight_sizes`.

    Args:
        weight: The dense 2-D weight to quantize (see :func:`quantize_int8`).
        dim: Axis with one scale per index (0: ``[out, in]``; 1: ``[in, out]``).

    Attributes:
        qweight: int8 buffer, the weight's shape.
        scale: float32 buffer, one scale per index of ``dim``.
        dim: As given.
        dtype: The original weight's dtype (the output dtype of :class:`Int8Embedding`).
    """

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, dim: int = 0) -> None:
        super().__init__()
        q, scale = quantize_int8(weight, dim)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.dim = dim
        self.dtype = weight.dtype

    @property
    def shape(self) -> torch.Size:
        """Shape of the weight."""
        return self.qweight.shape

    @property
    def nbytes(self) -> int:
        """Bytes held: int8 values plus scales."""
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * self.scale.element_size()

    def weight_sizes(self) -> WeightSizes:
        """Sizes of this weight: its elements, dense bytes in the original dtype, and int8 values plus scales
        as both serialized and held bytes."""
        numel = self.qweight.numel()
        return WeightSizes(
            numel=numel, dense_bytes=numel * self.dtype.itemsize, serialized_bytes=self.nbytes, held_bytes=self.nbytes
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reconstructed weight in ``dtype`` (default: the original weight's dtype)."""
        return dequantize_int8(self.qweight, self.scale, self.dim, dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dim={self.dim}, dtype={self.dtype}"


class Int8Linear(nn.Module):
    """``nn.Linear`` with an :class:`Int8Weight` (per output feature), dequantized to the input dtype per call."""

    def __init__(self, weight: Int8Weight, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight_q = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w_hat.T + bias``."""
        return F.linear(x, self.weight_q.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Conv1D(nn.Module):
    """HF ``Conv1D`` (weight ``[in, out]``) with an :class:`Int8Weight` scaled per output feature (``dim=1``)."""

    def __init__(self, weight: Int8Weight, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight_q = weight
        self.bias = bias
        self.nx, self.nf = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w_hat + bias`` over the last dimension of ``x``."""
        w = self.weight_q.dequantize(x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.mm(flat, w) if self.bias is None else torch.addmm(self.bias.to(x.dtype), flat, w)
        return out.view(*x.shape[:-1], self.nf)

    def extra_repr(self) -> str:
        return f"nx={self.nx}, nf={self.nf}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """``nn.Embedding`` with an :class:`Int8Weight` (one scale per token row); outputs the original dtype."""

    def __init__(self, weight: Int8Weight, padding_idx: int | None = None) -> None:
        super().__init__()
        self.weight_q = weight
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows of ``ids`` (only those rows are dequantized)."""
        rows = F.embedding(ids, self.weight_q.qweight)
        scale = F.embedding(ids, self.weight_q.scale.unsqueeze(1))
        return (rows.float() * scale.float()).to(self.weight_q.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def _dense_weight(w: torch.Tensor) -> torch.Tensor:
    return w.dense() if isinstance(w, NZParameter) else w.detach()


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def quantize_rowwise_int8(
    model: nn.Module, *, include_embeddings: bool = True, exclude: Iterable[str] | None = None
) -> nn.Module:
    """Replace linear-type layers (and embeddings) by per-row absmax int8 versions, in place.

    ``nn.Linear`` becomes :class:`Int8Linear` (one scale per output feature), HF ``Conv1D`` becomes
    :class:`Int8Conv1D` (its weight is ``[in, out]``; one scale per output feature), and with
    ``include_embeddings`` ``nn.Embedding`` becomes :class:`Int8Embedding` (one scale per token). Biases stay
    dense parameters. Weights tied between such modules (e.g. ``lm_head`` and ``embed_tokens``) are quantized
    once into one shared :class:`Int8Weight`; a module shared under several names is replaced once. Weights that
    are NeuZip-compressed are decoded first.

    Args:
        model: Any module; modified in place.
        include_embeddings: Also quantize ``nn.Embedding`` layers.
        exclude: fnmatch patterns of module names (as in ``named_modules``) to leave as they are. A module is
            excluded when any of its names matches. Excluding one side of a tied pair unties it: the excluded
            module keeps the dense weight, the other holds an int8 copy.

    Returns:
        ``model``.

    Raises:
        ValueError: A weight has non-finite values, or an embedding uses ``max_norm`` (exclude it).
    """
    patterns = list(exclude or [])
    conv1d = _conv1d_type()
    names = _names_by_module(model)
    shared: dict[tuple[int, int], Int8Weight] = {}
    replaced: dict[int, nn.Module] = {}

    def quantized(w: torch.Tensor, dim: int) -> Int8Weight:
        key = (id(w), dim)
        if key not in shared:
            shared[key] = Int8Weight(_dense_weight(w), dim)
        return shared[key]

    def convert(module: nn.Module) -> nn.Module | None:
        if any(fnmatch.fnmatchcase(n, p) for n in names.get(id(module), []) for p in patterns):
            return None
        if isinstance(module, nn.Linear):
            return Int8Linear(quantized(module.weight, 0), module.bias)
        if conv1d is not None and isinstance(module, conv1d):
            weight, bias = module.weight, module.bias
            assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, nn.Parameter))
            return Int8Conv1D(quantized(weight, 1), bias)
        if include_embeddings and isinstance(module, nn.Embedding):
            if module.max_norm is not None:
                name = names.get(id(module), ["?"])[0]
                raise ValueError(f"embedding {name!r} uses max_norm, which int8 does not support; exclude it")
            return Int8Embedding(quantized(module.weight, 0), module.padding_idx)
        return None

    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # named_children() would skip repeats
            if child is None:
                continue
            if id(child) not in replaced:
                new = convert(child)
                if new is None:
                    continue
                replaced[id(child)] = new
            setattr(parent, child_name, replaced[id(child)])
    return model


def relative_errors(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Error statistics of reconstructed weights over all ``(w, w_hat)`` pairs together.

    Returns:
        ``rel_err_mean`` and ``rel_err_max``: ``|w_hat - w| / |w|`` over the elements with ``w != 0``;
        ``rel_frobenius``: ``||w_hat - w||_F / ||w||_F`` over all elements (0 when every ``w`` is 0).
    """
    rel_sum = rel_max = sq_err = sq_ref = 0.0
    count = 0
    for w, w_hat in pairs:
        ref = w.detach().double()
        diff = w_hat.detach().double() - ref
        nonzero = ref != 0
        rel = diff[nonzero].abs() / ref[nonzero].abs()
        count += rel.numel()
        rel_sum += float(rel.sum())
        rel_max = max(rel_max, float(rel.max()) if rel.numel() else 0.0)
        sq_err += float(diff.square().sum())
        sq_ref += float(ref.square().sum())
    return {
        "rel_err_mean": rel_sum / max(count, 1),
        "rel_err_max": rel_max,
        "rel_frobenius": math.sqrt(sq_err / sq_ref) if sq_ref else 0.0,
    }
