"""Large embeddings and output heads as several FSDP2 units: their weight rows split into parts.

FSDP2 gathers a unit's weights whole: an output head or embedding larger than a decoder layer (Llama-3's 128K x
4096 head is 1 GiB in bf16, 2.4x a layer) would set every rank's peak, gathered dense with its unsharded gradient and
reduce-scatter buffer on top. :func:`split_rows` replaces such an ``nn.Linear`` / ``nn.Embedding`` by a
:class:`RowSplitLinear` / :class:`RowSplitEmbedding` whose parts (consecutive row ranges of the weight) are units of
their own, so that one part at a time is dense. Outputs are the same: the head's logits are the parts' logits
concatenated; an embedding row is looked up in the part that holds it (the others contribute exact zeros through
``torch.where``). Checkpoints keep the original names: :func:`merge_split_state` and :func:`split_split_state` map a
state dict between ``<name>.weight`` and ``<name>.parts.<k>.weight``.

Part boundaries depend on the weight's size and the cap only (rows in multiples of :data:`ROW_ALIGN`, or of
``lcm(ROW_ALIGN, world)`` for a world size that does not divide it), so every power-of-two world size up to 64 splits
a model the same way and its per-parameter optimizer state reshards between them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nz_lightning.tensor.parameter import read_dense

__all__ = [
    "ROW_ALIGN",
    "EmbeddingRows",
    "RowSplitEmbedding",
    "RowSplitLinear",
    "UnitSplitter",
    "merge_split_state",
    "split_rows",
    "split_split_state",
]

ROW_ALIGN = 64
"""Rows per part are a multiple of this (and of the world size)."""


class _FanOut(torch.autograd.Function):
    """``n`` aliases of ``x`` whose gradients are summed in fp32 and rounded to ``x``'s dtype once.

    Autograd would sum the parts' input gradients in ``x``'s dtype, one rounding per part (bf16: 8 mantissa bits);
    the unsplit layer rounds its one GEMM once.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, n: int) -> tuple[Tensor, ...]:
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, None]:
        present = [g for g in grads if g is not None]
        if not present:
            return None, None
        total = present[0].to(torch.float32, copy=True)
        for g in present[1:]:
            total += g
        return total.to(present[0].dtype), None


class RowSplitLinear(nn.Module):
    """An ``nn.Linear`` held as parts of its output rows: ``forward`` concatenates the parts' outputs.

    The input gradient, a sum of the parts' partial products, is summed in fp32 and rounded once for a 16-bit input
    (closer to the unsplit layer's one GEMM than a sum in the input's dtype; not the same bits).

    Args:
        parts: Linear layers with the same input size (and all with or all without bias), in row order.
    """

    def __init__(self, parts: Sequence[nn.Linear]) -> None:
        super().__init__()
        if not parts or len({p.in_features for p in parts}) != 1 or len({p.bias is None for p in parts}) != 1:
            raise ValueError("RowSplitLinear needs one or more linear parts with the same input size and bias setting")
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: Tensor) -> Tensor:
        """The whole layer's output: each part's rows, concatenated on the last dimension."""
        n = len(self.parts)
        fan = n > 1 and x.requires_grad and x.dtype in (torch.bfloat16, torch.float16)
        inputs = _FanOut.apply(x, n) if fan else (x,) * n
        return torch.cat([part(xi) for part, xi in zip(self.parts, inputs, strict=True)], dim=-1)


class _RowsLookup(torch.autograd.Function):
    """``where(id in this part's rows, part's row, prev)``; backward gives the part's weight gradient and ``prev``'s
    in one node, so FSDP's post-backward for the part (reduce-scatter) runs before the next part's backward."""

    @staticmethod
    def forward(
        ctx: Any, prev: Tensor | None, ids: Tensor, weight: Tensor, start: int, padding_idx: int | None
    ) -> Tensor:
        rows = weight.shape[0]
        local = ids - start
        inside = ((local >= 0) & (local < rows)).unsqueeze(-1)
        local = local.clamp(0, rows - 1)
        ctx.save_for_backward(local, inside)
        ctx.rows, ctx.padding_idx, ctx.has_prev = rows, padding_idx, prev is not None
        return torch.where(inside, F.embedding(local, weight), 0.0 if prev is None else prev)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor, None, None]:
        local, inside = ctx.saved_tensors
        mine = torch.where(inside, grad, 0.0)
        pad = -1 if ctx.padding_idx is None else ctx.padding_idx
        grad_weight = torch.ops.aten.embedding_dense_backward(mine, local, ctx.rows, pad, False)
        grad_prev = torch.where(inside, 0.0, grad) if ctx.has_prev else None
        return grad_prev, None, grad_weight, None, None


class EmbeddingRows(nn.Module):
    """Rows ``[start, start + num_embeddings)`` of a split embedding: an FSDP unit of its own.

    ``forward(ids, prev)`` returns ``prev`` with the rows of the ids this part holds filled in (``prev=None``: zeros).
    Its weight's gradient is computed without reading the weight (an embedding's gradient never does).
    """

    def __init__(self, weight: Tensor, start: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self.start = start
        self.num_embeddings, self.embedding_dim = int(weight.shape[0]), int(weight.shape[1])
        self.padding_idx = padding_idx

    def forward(self, ids: Tensor, prev: Tensor | None = None) -> Tensor:
        """``prev`` (or zeros) where ``ids`` fall outside this part, this part's rows where inside."""
        return _RowsLookup.apply(prev, ids, self.weight, self.start, self.padding_idx)


class RowSplitEmbedding(nn.Module):
    """An ``nn.Embedding`` held as parts of its rows (:class:`EmbeddingRows`), looked up part after part.

    Args:
        parts: Row parts of the same width, consecutive from row 0.
    """

    def __init__(self, parts: Sequence[EmbeddingRows]) -> None:
        super().__init__()
        if not parts or len({p.embedding_dim for p in parts}) != 1:
            raise ValueError("RowSplitEmbedding needs one or more embedding parts of the same width")
        if [p.start for p in parts] != [sum(q.num_embeddings for q in parts[:k]) for k in range(len(parts))]:
            raise ValueError("RowSplitEmbedding parts must hold consecutive rows from row 0")
        self.parts = nn.ModuleList(parts)
        self.num_embeddings = sum(p.num_embeddings for p in parts)
        self.embedding_dim = parts[0].embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        """The rows of ``ids``, exactly the whole embedding's (an id out of range raises, asynchronously on a GPU)."""
        in_range = ((ids >= 0) & (ids < self.num_embeddings)).all()
        torch._assert_async(in_range, f"embedding index out of range [0, {self.num_embeddings})")  # no host sync
        out: Tensor | None = None
        for part in self.parts:
            out = part(ids, out)
        assert out is not None
        return out


def _plan(rows: int, nbytes: int, cap: int, align: int) -> list[tuple[int, int]]:
    """Row ranges of at most ``cap`` dense bytes each (rows in multiples of ``align``; one range if nothing to do)."""
    if cap <= 0 or nbytes <= cap or rows < 2 * align:
        return [(0, rows)]
    per = max(align, (rows * cap // nbytes) // align * align)
    return [(s, min(s + per, rows)) for s in range(0, rows, per)]


def split_rows(module: nn.Module, cap: int, world: int = 1) -> nn.Module:
    """``module`` as a row-split module of parts of at most ``cap`` dense bytes, or ``module`` itself.

    Only an ``nn.Linear`` or ``nn.Embedding`` (with default ``max_norm``/``scale_grad_by_freq``/``sparse``) larger than
    ``cap`` is split; parts copy the weight's rows (compressed weights are decoded), so the original may be dropped.

    Args:
        module: The layer.
        cap: Largest dense bytes per part (``<= 0``: no split).
        world: The world size: rows per part are a multiple of ``lcm(ROW_ALIGN, world)``.

    Raises:
        ValueError: An embedding with ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` (not supported split), a
            parameter on the meta device, or rows that do not divide by the world size.
    """
    if not isinstance(module, (nn.Linear, nn.Embedding)) or type(module) not in (nn.Linear, nn.Embedding):
        return module  # subclasses (e.g. adapters) may compute something else
    weight = module.weight
    if weight.device.type == "meta":
        raise ValueError("cannot split a layer whose weight is on the meta device: materialize it first")
    rows, nbytes = int(weight.shape[0]), weight.numel() * weight.element_size()
    bounds = _plan(rows, nbytes, cap, math.lcm(ROW_ALIGN, world))
    if len(bounds) == 1:
        return module
    if rows % world:
        raise ValueError(f"{rows} rows do not divide by the world size {world}: the parts could not be sharded")
    dense = read_dense(weight).detach()
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else read_dense(module.bias).detach()
        linears = []
        for start, stop in bounds:
            part = nn.Linear(module.in_features, stop - start, bias=bias is not None, device="meta")
            part.weight = nn.Parameter(dense[start:stop].clone(), requires_grad=weight.requires_grad)
            if bias is not None:
                part.bias = nn.Parameter(bias[start:stop].clone(), requires_grad=module.bias.requires_grad)
            linears.append(part)
        return RowSplitLinear(linears)
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise ValueError("an embedding with max_norm, scale_grad_by_freq or sparse cannot be split into row parts")
    pad = module.padding_idx
    embeddings = []
    for start, stop in bounds:
        part_pad = pad - start if pad is not None and start <= pad < stop else None
        values = dense[start:stop].clone().requires_grad_(weight.requires_grad)
        embeddings.append(EmbeddingRows(values, start, part_pad))
    return RowSplitEmbedding(embeddings)


class UnitSplitter:
    """Which FSDP units to split into row parts, and the split itself (used by ``shard_model``).

    Candidates are units that are a plain ``nn.Linear`` / ``nn.Embedding`` whose weight is not tied to another module:
    the output head and embeddings, and with per-weight units the projections inside the blocks (which ``"auto"``
    never splits: the cap is the largest of them).

    Args:
        model: The model being sharded.
        units: Its FSDP units, children before parents.
        split_bytes: Largest dense bytes per part; ``"auto"``: the largest unit inside an ``nn.ModuleList``, counting
            only the parameters no nested unit holds; ``None`` or ``0``: never split.
        world: The world size.

    Raises:
        ValueError: A bad ``split_bytes``.
    """

    def __init__(self, model: nn.Module, units: Sequence[nn.Module], split_bytes: int | str | None, world: int) -> None:
        if split_bytes is not None and split_bytes != "auto" and (not isinstance(split_bytes, int) or split_bytes < 0):
            raise ValueError(f"split_bytes must be a byte count >= 0, 'auto' or None; got {split_bytes!r}")
        self.model, self.world = model, world
        uses: dict[int, int] = {}
        for _, module in model.named_modules(remove_duplicate=False):
            for p in module.parameters(recurse=False):
                uses[id(p)] = uses.get(id(p), 0) + 1
        in_blocks = {id(m) for b in model.modules() if isinstance(b, nn.ModuleList) for m in b.modules()}
        self.candidates = {
            id(m)
            for m in units
            if type(m) in (nn.Linear, nn.Embedding) and all(uses[id(p)] == 1 for p in m.parameters(recurse=False))
        }
        self.cap = 0
        if split_bytes == "auto":
            claimed: set[int] = set()
            for m in units:  # children first: a unit owns the parameters no unit inside it claimed
                own = [p for p in m.parameters() if id(p) not in claimed]
                claimed.update(id(p) for p in own)
                if id(m) in in_blocks:
                    self.cap = max(self.cap, sum(p.numel() * p.element_size() for p in own))
        elif isinstance(split_bytes, int):
            self.cap = split_bytes

    def split(self, name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """``[(name, module)]``, or the parts' names and modules after replacing a candidate by its split version.

        Args:
            name: ``module``'s name in the model.
            module: A unit (materialized: its weight is read).
        """
        if id(module) not in self.candidates or self.cap <= 0:
            return [(name, module)]
        new = split_rows(module, self.cap, self.world)
        if not isinstance(new, (RowSplitLinear, RowSplitEmbedding)):
            return [(name, module)]
        parent, _, attr = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, attr, new)
        return [(f"{name}.parts.{k}", part) for k, part in enumerate(new.parts)]


def _split_modules(model: nn.Module) -> list[tuple[str, RowSplitLinear | RowSplitEmbedding]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (RowSplitLinear, RowSplitEmbedding))]


def _part_key(name: str, k: int, leaf: str) -> str:
    return f"{name}.parts.{k}.{leaf}" if name else f"parts.{k}.{leaf}"


def merge_split_state(model: nn.Module, state: MutableMapping[str, Tensor]) -> None:
    """Rename ``<name>.parts.<k>.<weight|bias>`` entries of ``state`` (in place) to the unsplit ``<name>.<leaf>``.

    The merged entry takes the place of the first part's (key order is kept). A state without the parts (e.g. on a
    rank that holds nothing) is left alone.
    """
    for name, module in _split_modules(model):
        for leaf in ("weight", "bias"):
            keys = [_part_key(name, k, leaf) for k in range(len(module.parts))]
            if not all(k in state for k in keys):
                continue
            merged = torch.cat([state[k] for k in keys])
            items = list(state.items())
            state.clear()
            for key, value in items:
                if key == keys[0]:
                    state[f"{name}.{leaf}" if name else leaf] = merged
                elif key not in keys:
                    state[key] = value


def split_split_state(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with each unsplit ``<name>.<leaf>`` of a row-split module of ``model`` cut into its parts' entries.

    Raises:
        ValueError: A tensor whose rows do not match the parts'.
    """
    out = dict(state)
    for name, module in _split_modules(model):
        for leaf in ("weight", "bias"):
            key = f"{name}.{leaf}" if name else leaf
            if key not in out:
                continue
            whole = out.pop(key)
            sizes = [int(getattr(p, leaf).shape[0]) for p in module.parts]
            if whole.dim() == 0 or whole.shape[0] != sum(sizes):
                raise ValueError(f"{key}: {tuple(whole.shape)} does not match the parts' {sum(sizes)} rows")
            for k, piece in enumerate(torch.split(whole, sizes)):
                out[_part_key(name, k, leaf)] = piece
    return out
