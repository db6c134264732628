"""Tests of ``nz_lightning.lm.baselines``: per-row int8 weights and their sizes in ``weight_sizes``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nz_lightning as nz
from nz_lightning.lm.baselines import (
    Int8Conv1D,
    Int8Embedding,
    Int8Linear,
    Int8Weight,
    dequantize_int8,
    quantize_int8,
    quantize_rowwise_int8,
    relative_errors,
)
from nz_lightning.tensor.sizes import SizedWeight, WeightSizes, weight_sizes

transformers = pytest.importorskip("transformers")

H, V, INTER, KV, LAYERS, POS = 32, 64, 64, 16, 2, 16


def _llama(tie: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=POS, n_embd=H, n_layer=LAYERS, n_head=4)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


def _close_logits(model: nn.Module, ref: torch.Tensor, ids: torch.Tensor, rtol: float = 0.05) -> None:
    with torch.no_grad():
        out = model(ids).logits.float()
    assert torch.isfinite(out).all()
    err = (out - ref).norm() / ref.norm()
    assert err < rtol, float(err)


# ------------------------------------------------------------------------------------------- the quantizer


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_within_half_a_step(dim: int, dtype: torch.dtype) -> None:
    w = (torch.randn(37, 53, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
    w[3 if dim == 0 else slice(None), 3 if dim == 1 else slice(None)] *= 100  # an outlier row/column
    q, scale = quantize_int8(w, dim)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[dim],)
    assert int(q.abs().max()) == 127
    deq = dequantize_int8(q, scale, dim)
    bound = scale.unsqueeze(1 - dim) / 2
    assert ((w.float() - deq).abs() <= bound * (1 + 1e-5)).all()
    absmax = w.float().abs().amax(dim=1 - dim)
    torch.testing.assert_close(scale, absmax / 127)


def test_zero_rows_give_zero_scale_and_zeros() -> None:
    w = torch.randn(4, 8)
    w[1] = 0
    w[3] = -0.0
    q, scale = quantize_int8(w)
    assert scale[1] == 0 and scale[3] == 0
    deq = dequantize_int8(q, scale)
    assert torch.isfinite(deq).all()
    assert (deq[1] == 0).all() and (deq[3] == 0).all()
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = quantize_rowwise_int8(nn.Sequential(lin))
    out = model(torch.randn(3, 8))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1], lin.bias[1].expand(3).detach())


def test_non_finite_and_bad_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.ones(2, 2, dtype=torch.int32))


# ------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("tie", [True, False])
def test_llama_logits_close_and_bytes_exact(tie: bool) -> None:
    model = _llama(tie)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits.float()
    dense_numel = sum(p.numel() for p in model.parameters())
    assert weight_sizes(model) == WeightSizes.dense(dense_numel, 4)

    quantize_rowwise_int8(model)
    _close_logits(model, ref, ids)

    inner = model.model
    assert isinstance(inner.embed_tokens, Int8Embedding)
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(inner.layers[0].self_attn.k_proj, Int8Linear)
    assert (model.lm_head.weight_q is inner.embed_tokens.weight_q) == tie
    assert not any(isinstance(m, nn.Linear | nn.Embedding) for m in model.modules())

    # matrices: int8 values + one fp32 scale per output row; norms stay fp32 (4 bytes each)
    per_layer = [(H, H), (KV, H), (KV, H), (H, H), (INTER, H), (INTER, H), (H, INTER)]
    mats = [(V, H)] * (1 if tie else 2) + per_layer * LAYERS
    norms = H * (2 * LAYERS + 1)
    expected = sum(r * c + 4 * r for r, c in mats) + 4 * norms
    sizes = weight_sizes(model)
    assert sizes.serialized_bytes == sizes.held_bytes == expected
    assert sizes.numel == sum(r * c for r, c in mats) + norms == dense_numel
    assert sizes.dense_bytes == 4 * dense_numel and sizes.compressed_tensors == 0


def test_gpt2_conv1d_tied_quantized_once() -> None:
    model = _gpt2()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits.float()
    quantize_rowwise_int8(model)
    _close_logits(model, ref, ids)
    blocks = model.transformer.h
    c_attn = blocks[0].attn.c_attn
    assert isinstance(c_attn, Int8Conv1D) and c_attn.weight_q.dim == 1
    assert c_attn.weight_q.scale.shape == (3 * H,)  # one scale per output feature
    assert model.lm_head.weight_q is model.transformer.wte.weight_q
    shared = [m for m in model.modules() if isinstance(m, Int8Weight)]
    assert len(shared) == 2 + 4 * LAYERS  # wte (= lm_head), wpe, 4 Conv1D per block

    # Conv1D weights are [in, out]: scales per column; biases and LayerNorms stay fp32
    per_block = [(H, 3 * H), (H, H), (H, 4 * H), (4 * H, H)]
    int8 = V * H + 4 * V + POS * H + 4 * POS + LAYERS * sum(i * o + 4 * o for i, o in per_block)
    biases = LAYERS * (3 * H + H + 4 * H + H)
    layer_norms = 2 * H * (2 * LAYERS + 1)
    assert weight_sizes(model).serialized_bytes == int8 + 4 * (biases + layer_norms)


def test_bf16_model_and_exclude() -> None:
    model = _llama(tie=True, dtype=torch.bfloat16)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits.float()
    quantize_rowwise_int8(model, exclude=["*.mlp.*", "lm_head"], include_embeddings=True)
    _close_logits(model, ref, ids, rtol=0.1)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.up_proj, nn.Linear) and layer.mlp.up_proj.weight.dtype == torch.bfloat16
    assert isinstance(layer.self_attn.q_proj, Int8Linear)
    # excluding lm_head unties it: lm_head keeps the dense bf16 weight, embed_tokens holds an int8 copy
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, Int8Embedding)
    out = model.model.embed_tokens(ids)
    assert out.dtype == torch.bfloat16


def test_exclude_embeddings_flag() -> None:
    model = _llama(tie=False)
    quantize_rowwise_int8(model, include_embeddings=False)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert isinstance(model.lm_head, Int8Linear)


def test_shared_module_replaced_once() -> None:
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    quantize_rowwise_int8(model)
    assert model[0] is model[2] and isinstance(model[0], Int8Linear)
    sizes = weight_sizes(model)
    assert sizes.serialized_bytes == sizes.held_bytes == 64 + 8 * 4 + 8 * 4  # int8 values, scales, fp32 bias
    assert sizes.numel == 64 + 8 and sizes.dense_bytes == 4 * (64 + 8)


def test_int8_weight_is_a_sized_weight() -> None:
    w = Int8Weight(torch.randn(6, 10, dtype=torch.bfloat16), dim=0)
    assert isinstance(w, SizedWeight)
    assert w.weight_sizes() == WeightSizes(numel=60, dense_bytes=120, serialized_bytes=60 + 4 * 6, held_bytes=84)
    conv = Int8Weight(torch.randn(6, 10), dim=1)  # one scale per column
    assert conv.weight_sizes() == WeightSizes(numel=60, dense_bytes=240, serialized_bytes=100, held_bytes=100)


def test_weight_sizes_of_compressed_model() -> None:
    model = _llama(tie=True, dtype=torch.bfloat16)
    nz.compress_model(model)
    compressed = nz.compressed_parameters(model)
    assert len(compressed) == 1 + 7 * LAYERS  # tied lm_head counted once
    serialized = sum(sum(len(b) for b in p.store.to_blobs()) for _, p in compressed)
    norms = H * (2 * LAYERS + 1)
    sizes = weight_sizes(model)
    assert sizes.serialized_bytes == serialized + 2 * norms
    assert sizes.numel == sum(p.numel() for p in _llama(tie=True).parameters())
    assert sizes.compressed_tensors == len(compressed) and sizes.dense_bytes == 2 * sizes.numel
    # int8 on top of a compressed model decodes the weights first
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits.float()
    quantize_rowwise_int8(model)
    _close_logits(model, ref, ids, rtol=0.1)
    assert not nz.compressed_parameters(model)


def test_relative_errors() -> None:
    w = torch.tensor([[1.0, -2.0], [0.0, 4.0]])
    w_hat = torch.tensor([[1.5, -2.0], [1.0, 3.0]])
    stats = relative_errors([(w, w_hat), (torch.zeros(3), torch.zeros(3))])
    assert stats["rel_err_mean"] == pytest.approx((0.5 + 0 + 0.25) / 3)  # the zero weights are left out
    assert stats["rel_err_max"] == pytest.approx(0.5)
    assert stats["rel_frobenius"] == pytest.approx(((0.25 + 1 + 1) / (1 + 4 + 16)) ** 0.5)
    assert relative_errors([(torch.zeros(2), torch.ones(2))]) == {
        "rel_err_mean": 0.0,
        "rel_err_max": 0.0,
        "rel_frobenius": 0.0,
    }
