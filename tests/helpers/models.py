"""Tiny language models, token batches and training loops shared by the tensor-layer and optimizer tests."""

from __future__ import annotations

import io
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from nz_lightning.optim import FusedOptimizer, fused_optimizer
from nz_lightning.tensor.convert import compress_model
from nz_lightning.tensor.parameter import is_compressed

VOCAB = 128
RULE_LR = {"sgd": 0.5, "adamw": 1e-2, "adalomo": 1e-2}


class MlpLM(nn.Module):
    """A plain MLP language model (embedding, two biased Linears) with an HF-like ``(input_ids, labels)`` API."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> types.SimpleNamespace:
        logits = self.fc2(F.gelu(self.fc1(self.emb(input_ids))))
        return types.SimpleNamespace(loss=F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()))


def llama(tied: bool = False) -> nn.Module:
    sizes: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=64)
    heads: dict[str, Any] = dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **sizes, **heads))


def gpt2() -> nn.Module:  # HF Conv1D layers and tied embeddings; dropout off so that runs are comparable
    no_dropout: dict[str, Any] = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, **no_dropout))


MODELS: dict[str, tuple[Callable[[], nn.Module], torch.dtype]] = {
    "mlp-fp32": (MlpLM, torch.float32),
    "mlp-bf16": (MlpLM, torch.bfloat16),
    "llama-bf16": (llama, torch.bfloat16),
    "llama-tied-bf16": (lambda: llama(tied=True), torch.bfloat16),
    "gpt2-fp32": (gpt2, torch.float32),
}


def build(kind: str, compressed: bool = False) -> Any:
    factory, dtype = MODELS[kind]
    torch.manual_seed(0)
    model = factory().to(dtype)
    return compress_model(model) if compressed else model


def batches(n: int, batch: int = 2, seq: int = 12, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=gen) for _ in range(n)]


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    loss: torch.Tensor = model(input_ids=ids, labels=ids).loss
    return loss


def train(model: nn.Module, opt: FusedOptimizer, data: list[torch.Tensor]) -> list[float]:
    losses = []
    for ids in data:
        loss = loss_of(model, ids)
        opt.backward(loss)
        losses.append(loss.item())
    return losses


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def check_resume(rule: str, options: dict[str, Any], lr: float) -> None:
    """Train 3 steps, save model and optimizer, train 2 more; a fresh model resumed from the save must match."""
    data = batches(5)
    model = build("llama-tied-bf16", compressed=True)
    opt = fused_optimizer(model, rule, lr=lr, **options)
    train(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    expected = train(model, opt, data[3:])
    buf.seek(0)
    saved, fresh = torch.load(buf, weights_only=True), build("llama-tied-bf16", compressed=True)
    fresh.load_state_dict(saved["model"])
    fresh_opt = fused_optimizer(fresh, rule, lr=123.0, **options)
    fresh_opt.load_state_dict(saved["opt"])
    assert fresh_opt.lr == lr
    assert train(fresh, fresh_opt, data[3:]) == expected
    assert_same_state(model, fresh)
    assert all(is_compressed(p) for p in fresh.parameters() if p.dim() >= 2)
