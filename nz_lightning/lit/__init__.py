"""LightningModules wrapping Hugging Face language models built from a config (or loaded from a local path)."""

from .lora import apply_lora
from .modules import CausalLMModule, Seq2SeqLMModule
from .optim import build_optimizer, build_scheduler

__all__ = ["CausalLMModule", "Seq2SeqLMModule", "apply_lora", "build_optimizer", "build_scheduler"]
