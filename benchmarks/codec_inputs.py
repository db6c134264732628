"""Inputs of the codec benchmark: run configurations, synthetic Llama-style weights and safetensors files.

Tensors are produced lazily as ``(name, source, make_tensor)`` triples so that only one input is in memory at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

TensorSource = Iterator[tuple[str, str, Callable[[], torch.Tensor]]]
"""Lazily produced inputs: ``(name, source, make_tensor)``; tensors are built one at a time to bound memory."""


@dataclass(frozen=True)
class Config:
    """Shapes of the in-process synthetic inputs and the number of timing repeats.

    Attributes:
        name: ``full``, ``quick`` or ``tiny``.
        hidden: Model width (Llama ``hidden_size``).
        intermediate: MLP width (``intermediate_size``).
        vocab: Vocabulary size (rows of ``embed_tokens``).
        kv_dim: Width of the k/v projections (``num_key_value_heads * head_dim``).
        extra_numel: Elements of the extra fp16 and fp32 tensors.
        repeats: Best-of-N timing repeats.
        tiny: Use the smoke configuration (two bf16 tensors, so only one dtype is JIT-compiled).
    """

    name: str
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int
    extra_numel: int
    repeats: int
    tiny: bool = False


FULL = Config("full", 2048, 5632, 32000, 256, 4 * 1024 * 1024, 5)
QUICK = Config("quick", 512, 1408, 2048, 64, 512 * 1024, 3)
TINY = Config("tiny", 256, 256, 256, 256, 64 * 1024, 1, tiny=True)


def normal_tensor(shape: tuple[int, ...], std: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal(0, std) drawn in float32 and cast to ``dtype`` (how random init usually reaches bf16/fp16).

    Args:
        shape: Shape of the tensor.
        std: Standard deviation of the normal distribution.
        dtype: Floating-point dtype of the result.
        gen: CPU generator the values are drawn from.

    Returns:
        A CPU tensor of ``shape`` and ``dtype``.
    """
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(dtype)


def synthetic_tensors(cfg: Config, seed: int = 0) -> TensorSource:
    """Random-init Llama-style weights (one decoder layer, embeddings, norms) plus one fp16 and one fp32 tensor.

    Linear and embedding weights are N(0, 0.02), norm weights are ones (as in Hugging Face's Llama init). With
    ``cfg.tiny`` only two bf16 attention projections are produced.

    Args:
        cfg: Shapes of the inputs.
        seed: Seed of the generator shared by all the random tensors (drawn in the order they are made).

    Returns:
        An iterator of ``(name, "synthetic", make_tensor)``.
    """
    gen = torch.Generator().manual_seed(seed)
    h, m, v, kv = cfg.hidden, cfg.intermediate, cfg.vocab, cfg.kv_dim
    bf = torch.bfloat16
    if cfg.tiny:
        shapes_bf16: list[tuple[str, tuple[int, ...], float | None]] = [
            ("layers.0.self_attn.q_proj.weight", (h, h), 0.02),
            ("layers.0.self_attn.o_proj.weight", (h, h), 0.02),
        ]
    else:
        shapes_bf16 = [
            ("embed_tokens.weight", (v, h), 0.02),
            ("layers.0.self_attn.q_proj.weight", (h, h), 0.02),
            ("layers.0.self_attn.k_proj.weight", (kv, h), 0.02),
            ("layers.0.self_attn.v_proj.weight", (kv, h), 0.02),
            ("layers.0.self_attn.o_proj.weight", (h, h), 0.02),
            ("layers.0.mlp.gate_proj.weight", (m, h), 0.02),
            ("layers.0.mlp.up_proj.weight", (m, h), 0.02),
            ("layers.0.mlp.down_proj.weight", (h, m), 0.02),
            ("layers.0.input_layernorm.weight", (h,), None),
            ("layers.0.post_attention_layernorm.weight", (h,), None),
            ("norm.weight", (h,), None),
        ]
    for name, shape, std in shapes_bf16:
        if std is None:
            yield name, "synthetic", functools.partial(torch.ones, shape, dtype=bf)
        else:
            yield name, "synthetic", functools.partial(normal_tensor, shape, std, bf, gen)
    extra_dtypes = [] if cfg.tiny else [torch.float16, torch.float32]
    for dtype in extra_dtypes:
        name = f"extra.{DTYPE_NAME[dtype]}.weight"
        yield name, "synthetic", functools.partial(normal_tensor, (cfg.extra_numel,), 0.02, dtype, gen)


def file_tensors(path: Path) -> TensorSource:
    """Every tensor of a safetensors file, loaded one at a time.

    Args:
        path: The ``.safetensors`` file.

    Returns:
        An iterator of ``(key, file name, load_tensor)``.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    for key in keys:

        def load(key: str = key) -> torch.Tensor:
            with safe_open(str(path), framework="pt") as g:
                t: torch.Tensor = g.get_tensor(key)
            return t

        yield key, path.name, load
