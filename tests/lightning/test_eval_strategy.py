"""NeuZipStrategy(mantissa_bits=k): lossy weights for validate / test / predict, fit refused, bad settings reported."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from nz_lightning.lightning.strategy import NeuZipStrategy
from nz_lightning.tensor.parameter import is_compressed
from tests.helpers.lit import VOCAB, batches, build, loader, trainer

pytestmark = pytest.mark.usefixtures("quiet_lightning")


class TinyLlama(pl.LightningModule):
    """A tiny random Hugging Face Llama (fp32) scored by next-token cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        self.model = LlamaForCausalLM(config)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def predict_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.model(input_ids=batch[0]).logits


def test_lossy_validate_close_to_lossless_on_tiny_llama() -> None:
    losses = {}
    for bits in (None, 3, 0):
        model = TinyLlama()
        (result,) = trainer(NeuZipStrategy(mantissa_bits=bits, block_size=512)).validate(model, loader(4))
        losses[bits] = result["val_loss"]
        store = model.model.model.layers[0].mlp.up_proj.weight.store
        assert store.mantissa_bits == bits and is_compressed(model.model.lm_head.weight)
        assert model.model.model.embed_tokens.weight.requires_grad is (bits is None)
    with torch.no_grad():
        dense = TinyLlama()
        reference = sum(dense.model(input_ids=b[0], labels=b[0]).loss for b in batches(4)) / 4
    assert losses[None] == pytest.approx(float(reference), rel=1e-6)
    assert losses[3] != losses[None] and losses[3] == pytest.approx(losses[None], rel=0.02)
    assert abs(losses[0] - losses[None]) > abs(losses[3] - losses[None])  # fewer bits, larger error
    predictions = trainer(NeuZipStrategy(mantissa_bits=3)).predict(TinyLlama(), loader(1))
    assert predictions is not None and torch.isfinite(predictions[0]).all()


def test_lossy_fit_is_refused_when_fit_starts() -> None:
    strategy = NeuZipStrategy(mantissa_bits=3)  # constructing it is fine: the same config serves evaluation
    model = build()
    with pytest.raises(ValueError, match=r"mantissa_bits=3.*trainer\.fit is not supported.*validate"):
        trainer(strategy).fit(model, loader(1))
    assert not is_compressed(model.fc.weight)  # refused before the weights were touched


def test_lossy_mantissa_bits_out_of_range_for_dtype() -> None:
    with pytest.raises(ValueError, match=r"NeuZipStrategy\(mantissa_bits=7.*out of range for torch\.bfloat16"):
        trainer(NeuZipStrategy(mantissa_bits=7)).validate(build(), loader(1))
    (result,) = trainer(NeuZipStrategy(mantissa_bits=7)).validate(build(dtype=torch.float32), loader(1))
    assert result["val_loss"] > 0  # 7 bits are valid for fp32 weights
