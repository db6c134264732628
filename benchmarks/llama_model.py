"""Llama-style models for the training benchmarks: built dense, or on ``meta`` and compressed tensor by tensor."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn

INIT_STD = 0.02


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The options shared by the training benchmarks: model shape (~160M Llama by default), lengths, threads."""
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, nargs="+", default=[64, 512])


def default_threads() -> int:
    """Every core this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def llama_config(
    hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int, max_pos: int = 8192
) -> Any:
    """A transformers ``LlamaConfig`` (bf16, untied embeddings, HF default init std 0.02)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        torch_dtype="bfloat16",
    )


LLAMA3_8B = {"hidden": 4096, "layers": 32, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}


def build_dense(config: Any, seed: int = 0) -> nn.Module:
    """The same model as :func:`build_compressed_from_meta` (same values), held dense."""
    from transformers import LlamaForCausalLM

    from nz_lightning import compress_model

    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    compress_model(model, weights=random_weight(seed), exclude=["*"])  # materialize only, nothing compressed
    _materialize_meta_buffers(model, config)
    return model.train()


def random_weight(seed: int = 0) -> Any:
    """A weight source for ``compress_model``: N(0, 0.02) matrices, ones for norm vectors, per-name seeded."""

    def make(name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if len(shape) < 2:
            return torch.ones(shape, dtype=dtype)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
        out = torch.empty(shape, dtype=dtype)
        rows_per_chunk = max(1, (1 << 24) // max(1, shape[-1]))
        for start in range(0, shape[0], rows_per_chunk):  # fp32 scratch stays small for 8B-sized matrices
            chunk = out[start : start + rows_per_chunk]
            chunk.copy_(torch.randn(chunk.shape, generator=gen) * INIT_STD)
        return out

    return make


def build_compressed_from_meta(config: Any, seed: int = 0, backend: str | None = None) -> nn.Module:
    """Build on ``meta`` and materialize + compress one tensor at a time (the dense model never exists)."""
    from transformers import LlamaForCausalLM

    from nz_lightning import compress_model

    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    compress_model(model, weights=random_weight(seed), backend=backend)
    _materialize_meta_buffers(model, config)
    return model.train()


def _materialize_meta_buffers(model: nn.Module, config: Any) -> None:
    """Recreate modules whose buffers are still on meta (rotary embedding tables) on the CPU."""
    for name, module in list(model.named_modules()):
        if any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            fresh = type(module)(config=config)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)
    leftover = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"buffers still on meta after materialization: {leftover}")
