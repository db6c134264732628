"""The blocked head on Hugging Face causal LMs: ``model(**batch).loss`` without logits or a dense head gradient.

:func:`install_blocked_head` (called by :class:`~nz_lightning.optim.FusedOptimizer` unless ``blocked_head=False``)
changes, on every fit causal LM inside the model, in place and reversibly:

* the output head (an exact ``nn.Linear``) becomes a :class:`BlockedHead`: when the model's forward was called with
  ``labels`` while gradients are recorded, the head returns :class:`DeferredLogits` (a placeholder holding the
  hidden states; any tensor op on it raises) instead of computing the logits;
* ``model.loss_function`` becomes a :class:`BlockedCausalLMLoss`, which computes HF's ``ForCausalLMLoss`` from the
  placeholder with :func:`~nz_lightning.optim.linear_ce.causal_lm_loss` (row block by row block, weight gradients to
  the fused optimizer inside backward) and calls the original loss for real logits;
* the input embedding (an exact ``nn.Embedding``) becomes a
  :class:`~nz_lightning.optim.blocked_embedding.BlockedEmbedding`.

A model fits when its ``forward`` computes ``X = self.<head>(hidden_states)`` and passes ``X`` to
``self.loss_function`` with nothing in between (Llama, Mistral, Qwen2/3, Gemma, Phi, GPT-Neo(X), GPT-2, ...).
Models that post-process the logits (Gemma 2 soft-capping, Cohere's ``logit_scale``) keep their plain head.
Without labels, without gradients (evaluation, generation) or after ``remove_hooks()``, the model is unchanged.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from nz_lightning.optim.blocked_embedding import install_blocked_embedding, uninstall_blocked_embedding
from nz_lightning.optim.linear_ce import BlockSink, causal_lm_loss
from nz_lightning.tensor.parameter import NZParameter

__all__ = ["BlockedCausalLMLoss", "BlockedHead", "DeferredLogits", "install_blocked_head", "uninstall_blocked_head"]

_STATE = "_nz_blocked_head"


class DeferredLogits(torch.Tensor):
    """Stands for the logits the blocked head did not compute; holds the hidden states and the head.

    Raises on any tensor op: use ``.loss``, or call the model without ``labels`` (or under ``torch.no_grad()``) to get
    real logits.
    """

    hidden: Tensor
    head: BlockedHead

    @staticmethod
    def __new__(cls, hidden: Tensor, head: BlockedHead) -> DeferredLogits:  # noqa: D102
        shape = (*hidden.shape[:-1], head.out_features)
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=hidden.dtype, device=hidden.device)
        t.hidden, t.head = hidden, head
        return t

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return f"DeferredLogits(shape={tuple(self.shape)}, dtype={self.dtype}: not computed by the blocked head)"

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        raise RuntimeError(
            f"{func}: the logits were not computed (nz_lightning's blocked head computes the loss block by block "
            "during training). Use outputs.loss, call the model without labels or under torch.no_grad() for "
            "logits, or build the fused optimizer / strategy with blocked_head=False"
        )


class BlockedHead(nn.Linear):
    """An ``nn.Linear`` head that, once armed by its model's forward, returns :class:`DeferredLogits`."""

    _nz_armed: bool = False

    def forward(self, input: Tensor) -> Tensor:
        """Plain logits, or a :class:`DeferredLogits` placeholder when armed (one use)."""
        if self._nz_armed:
            self._nz_armed = False
            return DeferredLogits(input, self)
        return super().forward(input)


class BlockedCausalLMLoss:
    """``model.loss_function`` under the blocked head: HF's ``ForCausalLMLoss`` on :class:`DeferredLogits`.

    Args:
        fallback: The model's loss function before installation (used for real logits).
        sink: The fused optimizer that takes the head's gradient block by block.
        tied: The head's weight is the input embedding's (its block gradients wait for the embedding's).
    """

    def __init__(self, fallback: Any, sink: BlockSink, tied: bool) -> None:
        self.fallback, self.sink, self.tied = fallback, sink, tied

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """The loss (HF's signature; extra keyword arguments are ignored, as HF's ``ForCausalLMLoss`` does)."""
        if not isinstance(logits, DeferredLogits):
            return self.fallback(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs)
        head = logits.head
        if vocab_size is not None and vocab_size != head.out_features:
            raise ValueError(f"vocab_size {vocab_size} does not match the head's {head.out_features} rows")
        return causal_lm_loss(
            logits.hidden,
            head.weight,
            labels.to(logits.hidden.device),
            head.bias,
            ignore_index=ignore_index,
            shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch,
            sink=self.sink,
            defer=self.tied,
        )


def _head_name(model: nn.Module, head: nn.Module) -> str | None:
    return next((name for name, child in model.named_children() if child is head), None)


def _forward_fits(model: nn.Module, head_name: str) -> bool:
    """Whether ``type(model).forward`` passes the head's output straight to ``self.loss_function``."""
    try:
        lines = inspect.getsource(type(model).forward).splitlines()
    except (OSError, TypeError):
        return False
    # the head applied to a name, or to a subscript of it (transformers <= 5.17: ``hidden_states[:, slice_indices, :]``)
    call = re.compile(rf"^\s*(\w+)\s*=\s*self\.{re.escape(head_name)}\((\w+)(\[[^\]()]*\])?\)\s*$")
    for i, line in enumerate(lines):
        match = call.match(line)
        if match is None:
            continue
        var = match.group(1)
        for later in lines[i + 1 :]:
            text = later.strip()
            if "self.loss_function(" in text:
                rest = text.split("self.loss_function(", 1)[1]
                return bool(re.match(rf"^(logits=)?{var}\b", rest)) or rest == ""
            if text and not text.startswith("#") and text not in ("loss = None", "if labels is not None:"):
                return False
    return False


def _labels_given(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if kwargs.get("labels") is not None:
        return True
    try:
        bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
    except TypeError:
        return False
    return bound.arguments.get("labels") is not None


def _fit_causal_lm(model: Any) -> tuple[nn.Linear, nn.Module | None] | None:
    """``(head, input embedding)`` of a Hugging Face causal LM the blocked head fits, else ``None``."""
    if not (hasattr(model, "get_output_embeddings") and hasattr(type(model), "loss_function")):
        return None
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None  # seq2seq heads are not causal LM heads
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return None
    name = _head_name(model, head)
    weight = head.weight
    if name is None or (isinstance(weight, NZParameter) and not weight.is_whole_store()):
        return None
    if not _forward_fits(model, name):
        warnings.warn(
            f"{type(model).__name__}: its forward post-processes the logits before the loss, so the blocked head is "
            "not used (the plain head computes all logits)",
            stacklevel=3,
        )
        return None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head, emb if isinstance(emb, nn.Module) else None


def install_blocked_head(model: nn.Module, sink: BlockSink) -> list[str]:
    """Install the blocked head (and embedding) on every fit causal LM in ``model`` (see the module docstring).

    Args:
        model: The model (or a module holding Hugging Face causal LMs, e.g. a LightningModule).
        sink: The fused optimizer that owns the head's and embedding's weights.

    Returns:
        The qualified names of the modules changed (empty if none fits).
    """
    names = {id(m): n for n, m in model.named_modules()}
    done: list[str] = []
    lm: Any
    for lm in list(model.modules()):
        found = _fit_causal_lm(lm)
        if found is None or _STATE in lm.__dict__:
            continue
        head, emb = found
        armable: Any = head
        tied = emb is not None and getattr(emb, "weight", None) is head.weight
        head.__class__ = BlockedHead
        had_loss = "_loss_function" in lm.__dict__
        previous = lm.__dict__.get("_loss_function")
        lm.loss_function = BlockedCausalLMLoss(lm.loss_function, sink, tied)

        def arm(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], head: Any = armable) -> None:
            head._nz_armed = torch.is_grad_enabled() and _labels_given(module, args, kwargs)

        def disarm(module: nn.Module, *_: Any, head: Any = armable) -> None:
            head._nz_armed = False

        hooks = [
            lm.register_forward_pre_hook(arm, with_kwargs=True),
            lm.register_forward_hook(disarm, always_call=True),
        ]
        blocked_emb = emb is not None and emb.weight.requires_grad and install_blocked_embedding(emb, sink)
        lm.__dict__[_STATE] = (head, emb if blocked_emb else None, hooks, had_loss, previous)
        done += [names[id(head)]] + ([names[id(emb)]] if blocked_emb else [])
    return done


def uninstall_blocked_head(model: nn.Module, sink: BlockSink) -> None:
    """Undo :func:`install_blocked_head` for ``sink`` on every causal LM in ``model``."""
    lm: Any
    for lm in list(model.modules()):
        state = lm.__dict__.get(_STATE)
        if state is None or getattr(lm.__dict__.get("_loss_function"), "sink", None) is not sink:
            continue
        head, emb, hooks, had_loss, previous = state
        for hook in hooks:
            hook.remove()
        head.__class__ = nn.Linear
        head.__dict__.pop("_nz_armed", None)
        if emb is not None:
            uninstall_blocked_embedding(emb)
        if had_loss:
            lm.loss_function = previous
        else:
            del lm.__dict__["_loss_function"]
        del lm.__dict__[_STATE]
