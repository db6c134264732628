"""LoRA adapters (peft) on a freshly built model, on top of bitsandbytes-quantized base layers for QLoRA.

Inside :class:`~nz_lightning.lm.qlora.BitsandbytesQuantPrecision`'s ``module_init_context`` (active while a
``LightningModule``'s ``configure_model`` runs), :func:`apply_lora` first quantizes the base model's linear layers
(:func:`~nz_lightning.lm.qlora.quantize_model`), so that peft wraps them with its bitsandbytes LoRA layers, as in
QLoRA. Under Lightning's own ``BitsandbytesPrecision`` (CUDA only) the base model is already built quantized, and
:func:`plain_linear` keeps the adapters ordinary layers.
"""

from __future__ import annotations

import importlib.util
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
        model: A Hugging Face model (plain or with bitsandbytes linear layers). Inside the bitsandbytes plugin's
            ``module_init_context`` its linear layers are quantized first (in place).
        config: ``peft.LoraConfig`` options; defaults: ``r=8``, ``lora_alpha=16``, ``lora_dropout=0.05``,
            ``target_modules="all-linear"`` (every linear layer except the output head, as in QLoRA).
        task_type: ``"CAUSAL_LM"`` or ``"SEQ_2_SEQ_LM"``.

    Returns:
        The ``PeftModel`` (its ``forward`` takes the same batches as the base model).
    """
    from nz_lightning.lm.qlora import active_quantization, import_bitsandbytes, quantize_model

    settings = active_quantization()
    if settings is not None:
        quantize_model(model, settings)  # frozen bitsandbytes base layers; peft then adds its bnb LoRA layers
    elif importlib.util.find_spec("bitsandbytes") is not None:
        import_bitsandbytes()  # peft imports bitsandbytes when installed: import it without our codec's shadowing
    from peft import LoraConfig, get_peft_model

    options: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
    options.update(config)
    if isinstance(options["target_modules"], (list, tuple)):
        options["target_modules"] = list(options["target_modules"])
    with plain_linear():
        return get_peft_model(model, LoraConfig(task_type=task_type, **options))
