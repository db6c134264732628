"""Activation checkpointing of a Hugging Face model under either transformers API generation (no Lightning import)."""

from __future__ import annotations

from typing import Any

__all__ = ["enable_activation_checkpointing"]


def enable_activation_checkpointing(model: Any, use_reentrant: bool = False) -> None:
    """Turn on activation checkpointing of an HF model and turn off its KV cache (which checkpointing excludes).

    transformers 5.25 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and deprecated
    the old name (removed in v6); 5.17 and older have only the old one. The new name is used where it exists.

    Args:
        model: A ``transformers`` ``PreTrainedModel``.
        use_reentrant: ``torch.utils.checkpoint``'s mode (non-reentrant by default, as the fused optimizers need).
    """
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
