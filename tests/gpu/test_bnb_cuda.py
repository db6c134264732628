"""The bitsandbytes baselines run on CUDA: Lightning's ``BitsandbytesPrecision`` and ours
(:class:`nz_lightning.lm.qlora.BitsandbytesQuantPrecision`, what the ``+quant=...`` configs select; it also runs on
CPU, see tests/app/test_qlora.py).

Skipped with a reason where ``bitsandbytes`` is not installed. A tiny Llama built in ``configure_model`` (so that
the plugin swaps in quantized layers) is validated on the GPU: its layers are bitsandbytes ones, the quantization
state is counted by :func:`nz_lightning.lm.evaluate.quant_state_nbytes`, and its loss is close to the bf16 model's.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

pytestmark = pytest.mark.gpu

MODES = ["int8", "nf4", "nf4-dq", "fp4"]
VOCAB, SEQ = 128, 32


def _module() -> Any:
    import lightning.pytorch as pl
    from transformers import LlamaConfig, LlamaForCausalLM

    class TinyLlamaEval(pl.LightningModule):
        def configure_model(self) -> None:
            if hasattr(self, "model"):
                return
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=SEQ,
            )
            self.model = LlamaForCausalLM(config)

        def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
            (ids,) = batch
            self.log("val_loss", self.model(input_ids=ids, labels=ids).loss.float())

    return TinyLlamaEval()


def _validate(module: Any, **options: Any) -> float:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, **options
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (result,) = trainer.validate(module, DataLoader(TensorDataset(ids), batch_size=2))
    return float(result["val_loss"])


@pytest.mark.parametrize("plugin", ["lightning", "nz_lightning"])
@pytest.mark.parametrize("mode", MODES)
def test_bitsandbytes_baseline_on_cuda(mode: Any, plugin: str) -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: its baselines cannot be checked")
    from lightning.pytorch.plugins import BitsandbytesPrecision

    from nz_lightning.lm.evaluate import quant_state_nbytes
    from nz_lightning.lm.qlora import BitsandbytesQuantPrecision

    dense = _module()
    dense_loss = _validate(dense, precision="bf16-true")
    quantized = _module()
    cls = BitsandbytesPrecision if plugin == "lightning" else BitsandbytesQuantPrecision
    dtype = torch.float16 if (mode == "int8" and plugin == "lightning") else torch.bfloat16  # Lightning: int8 = fp16
    loss = _validate(quantized, plugins=[cls(mode=mode, dtype=dtype)])
    layers = [m for m in quantized.modules() if type(m).__module__.startswith(("bitsandbytes", "lightning"))]
    assert any("Linear" in type(m).__name__ for m in layers), "no quantized linear layer was built"
    assert quant_state_nbytes(quantized) > 0
    assert math.isfinite(loss) and abs(loss - dense_loss) < 0.1 * dense_loss
