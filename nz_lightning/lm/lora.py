"""LoRA adapters (peft) on a freshly built model, compatible with Lightning's bitsandbytes precision."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def plain_linear() -> Iterator[None]:
    """Restore the real ``torch.nn.Linear`` for the duration of the block.

    ``BitsandbytesPrecision.module_init_context`` (active while ``configure_model`` runs) replaces
    ``torch.nn.Linear`` by a quantized class, so that the base model is built quantized. The LoRA adapters
    that peft creates inside the same hook must stay ordinary trainable layers.
    """
    patched = torch.nn.Linear
    torch.nn.Linear = torch.nn.modules.linear.Linear  # type: ignore[misc]
    try:
        yield
    finally:
        torch.nn.Linear = patched  # type: ignore[misc]


def apply_lora(model: nn.Module, config: Mapping[str, Any], task_type: str) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters; only the adapters stay trainable.

    Args:
        model: A Hugging Face model (plain or with bitsandbytes linear layers).
        config: ``peft.LoraConfig`` options; defaults: ``r=8``, ``lora_alpha=16``, ``lora_dropout=0.05``,
            ``target_modules="all-linear"`` (every linear layer except the output head, as in QLoRA).
        task_type: ``"CAUSAL_LM"`` or ``"SEQ_2_SEQ_LM"``.

    Returns:
        The ``PeftModel`` (its ``forward`` takes the same batches as the base model).
    """
    from peft import LoraConfig, get_peft_model

    options: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
    options.update(config)
    if isinstance(options["target_modules"], (list, tuple)):
        options["target_modules"] = list(options["target_modules"])
    with plain_linear():
        return get_peft_model(model, LoraConfig(task_type=task_type, **options))
