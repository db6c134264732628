"""QLoRA on CPU: bitsandbytes base weights (int8 / fp4 / nf4 / nf4-dq) + peft LoRA rank 8, through Lightning."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nz_lightning.lm import run
from nz_lightning.lm.evaluate import check_quant_requirements
from nz_lightning.lm.modules import CausalLMModule
from nz_lightning.lm.qlora import (
    BitsandbytesQuantPrecision,
    QuantSettings,
    held_weight_bytes,
    import_bitsandbytes,
    quantize_linear,
    quantize_model,
    quantized_layers,
)

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: the QLoRA baselines cannot run")

ROOT = Path(__file__).resolve().parents[2]
MODES = ["int8", "fp4", "nf4", "nf4-dq"]
HIDDEN, FFN, LAYERS, VOCAB = 64, 128, 2, 260
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}

pytestmark = pytest.mark.usefixtures("restore_cpu_threads", "quiet_lightning")


def tiny_module(lr: float = 1e-2) -> CausalLMModule:
    config = {
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 64, "tie_word_embeddings": False,
    }  # fmt: skip
    return CausalLMModule(config=config, dtype="float32", lora=LORA, optimizer={"name": "adamw", "lr": lr})


class FixedBatches(Dataset):
    """The same few sequences every epoch (the adapters can fit them: the loss must fall)."""

    def __init__(self, n: int = 4, seq: int = 32) -> None:
        self.ids = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def expected_quantized_bytes(mode: str, shapes: list[tuple[int, int]]) -> int:
    """Bytes bitsandbytes holds for weights of these shapes: int8 values + one fp32 scale per row; 4-bit: two codes
    per byte + one fp32 absmax per 64 weights (double quantization: one byte per 64 weights, one fp32 scale per 256
    absmax values, a 256-entry fp32 code book and an fp32 offset), plus each layer's 16-entry fp32 code book."""
    total = 0
    for out_f, in_f in shapes:
        n = out_f * in_f
        if mode == "int8":
            total += n + 4 * out_f
            continue
        blocks = math.ceil(n / 64)
        total += math.ceil(n / 2) + 16 * 4
        total += blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4 if mode.endswith("-dq") else 4 * blocks
    return total


def build_quantized(mode: str) -> tuple[CausalLMModule, BitsandbytesQuantPrecision]:
    plugin = BitsandbytesQuantPrecision(mode=mode, dtype=torch.bfloat16)
    module = tiny_module()
    torch.manual_seed(0)
    with plugin.module_init_context():
        module.configure_model()
    return module, plugin


@pytest.mark.parametrize("mode", MODES)
def test_base_layers_quantized_frozen_and_sized(mode: str) -> None:
    module, _ = build_quantized(mode)
    model = module.model
    assert model is not None
    layers = dict(quantized_layers(model))
    assert len(layers) == LAYERS * len(LINEARS)  # every linear of every block; the output head stays dense
    param_cls = bnb.nn.Int8Params if mode == "int8" else bnb.nn.Params4bit
    for name, layer in layers.items():
        assert name.endswith(".base_layer") and type(layer.weight) is param_cls
        assert layer.weight.dtype == (torch.int8 if mode == "int8" else torch.uint8)
        assert not layer.weight.requires_grad
        if mode != "int8":
            assert layer.weight.quant_state.quant_type == mode[:3]
            assert (layer.weight.quant_state.state2 is not None) is mode.endswith("-dq")
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear and not head.weight.requires_grad
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    shapes = [(layer.out_features, layer.in_features) for layer in layers.values()]
    assert sum(p.numel() for p in trainable.values()) == sum(8 * (o + i) for o, i in shapes)
    sizes = held_weight_bytes(model)
    assert sizes["quantized"] == expected_quantized_bytes(mode, shapes)
    assert sizes["quantized_numel"] == sum(o * i for o, i in shapes)
    assert sizes["trainable"] == 4 * sum(8 * (o + i) for o, i in shapes)  # fp32 adapters (peft upcasts)
    # vs bf16; nf4-dq's 1 KiB code book per layer outweighs its saving on these 4-8K-weight layers
    bound = {"int8": 0.55, "nf4-dq": 0.4}.get(mode, 0.3)
    assert sizes["quantized"] < bound * 2 * sizes["quantized_numel"]


class Snapshot(pl.Callback):
    """Adapter and quantized base weights when training starts and ends, plus the losses of every step."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []

    @staticmethod
    def _weights(module: pl.LightningModule) -> dict[str, torch.Tensor]:
        out = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        for name, layer in quantized_layers(module):
            out[name + ".q"] = layer.weight.detach().view(torch.uint8).clone()
            state = getattr(layer.weight, "quant_state", None)
            scale = state.absmax if state is not None else layer.weight.SCB
            out[name + ".scale"] = (layer.state.SCB if scale is None else scale).detach().clone()  # int8: moves
        return out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self._weights(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = self._weights(pl_module)


@pytest.mark.parametrize("mode", MODES)
def test_adapters_train_base_stays_bit_identical(mode: str) -> None:
    """A Lightning fit on CPU with the plugin, validation in between: the loss falls, every adapter moves, the
    quantized base weights and their scales stay bit for bit what they were."""
    snap = Snapshot()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, plugins=[BitsandbytesQuantPrecision(mode=mode, dtype=torch.bfloat16)],
        max_steps=12, val_check_interval=4, check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[snap],
    )  # fmt: skip
    data = DataLoader(FixedBatches(), batch_size=2)
    torch.manual_seed(0)
    trainer.fit(tiny_module(lr=1e-2), train_dataloaders=data, val_dataloaders=data)
    assert len(snap.losses) == 12
    assert sum(snap.losses[-3:]) < 0.95 * sum(snap.losses[:3]), snap.losses  # ~8-10% in 12 steps
    adapters = [k for k in snap.start if ".lora_" in k]
    assert adapters and all(not torch.equal(snap.start[k], snap.end[k]) for k in adapters if ".lora_B." in k)
    frozen = [k for k in snap.start if k.endswith((".q", ".scale"))]
    assert len(frozen) == 2 * LAYERS * len(LINEARS)
    assert all(torch.equal(snap.start[k], snap.end[k]) for k in frozen)


def test_gradients_through_4bit_layers_are_unchanged_by_an_eval_pass() -> None:
    """bitsandbytes repacks 4-bit weights for its AVX-512 BF16 inference op on an eval-mode CPU forward; that op has
    no autograd, so later training forwards would get wrong gradients. The adapter keeps the trainable layout."""
    module, _ = build_quantized("nf4")
    model = module.model
    assert model is not None
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", enabled=False):
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = grads()
    assert before.keys() == after.keys() and any(".layers.0." in n and "lora_A" in n for n in before)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False) for _, m in quantized_layers(model))


# -- train.py / Hydra ----------------------------------------------------------------------------------------------


def compose_train(*overrides: str, output_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, f"paths.output_dir={output_dir}", "logger=none"])


TINY = [
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.max_bytes=40000",
    "data.seq_len=32", "data.batch_size=2", "callbacks.rich_progress_bar.leave=false", "save_checkpoint=false",
]  # fmt: skip


@pytest.mark.parametrize("mode", ["int8", "nf4_dq"])
def test_train_py_qlora_recipe_on_the_tiny_model(tmp_path: Path, mode: str) -> None:
    """``python train.py +recipe_base=qlora +quant=<mode>``: the QLoRA recipe settings on the tiny default, on CPU."""
    cfg = compose_train("+recipe_base=qlora", f"+quant={mode}", *TINY, output_dir=tmp_path)
    assert cfg.trainer.precision is None and cfg.model.lora.r == 8
    summary = run.train(cfg, print_table=True)
    assert summary["steps"] == 4 and math.isfinite(summary["val_loss"])
    held = summary["quantized"]  # bitsandbytes bytes in the summary table (the packed storage is no weight count)
    assert 0 < held["quantized"] < (1.1 if mode == "int8" else 0.75) * held["quantized_numel"] and held["trainable"]


def test_table2_qlora_recipe_runs_on_cpu(tmp_path: Path) -> None:
    """``+experiment=qlora/t5_1b trainer=cpu``: the Table 2 QLoRA recipe on a tiny local T5 and local SQL pairs."""
    import json

    from transformers import T5Config, T5ForConditionalGeneration

    from tests.helpers.text_data import SQL_ROWS, trained_tokenizer

    (tmp_path / "sql.jsonl").write_text("\n".join(json.dumps(r) for r in SQL_ROWS))
    tokenizer = trained_tokenizer(tmp_path, [v for r in SQL_ROWS for v in r.values()])
    torch.manual_seed(0)
    small = dict(vocab_size=304, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
    T5ForConditionalGeneration(T5Config(**small, decoder_start_token_id=0)).save_pretrained(str(tmp_path / "t5"))
    cfg = compose_train(
        "+experiment=qlora/t5_1b", "trainer=cpu", "quant=fp4", "model.config=null",
        f"model.pretrained={tmp_path / 't5'}",
        "data.dataset=json", f"data.data_files={tmp_path / 'sql.jsonl'}", f"data.tokenizer={tokenizer}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "data.val_fraction=0.1", "data.batch_size=4",
        "model.max_new_tokens=8", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "callbacks.rich_progress_bar.leave=false", "save_checkpoint=false",
        output_dir=tmp_path,
    )  # fmt: skip
    assert cfg.trainer.plugins[0].mode == "fp4" and cfg.model.lora.target_modules == "all-linear"
    summary = run.train(cfg, print_table=False)
    metrics = summary["metrics"]
    assert summary["steps"] == 3 and math.isfinite(metrics["test/loss"]) and "test/bleu" in metrics


# -- bad input -----------------------------------------------------------------------------------------------------


def test_missing_bitsandbytes_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match=r"bitsandbytes package: pip install 'nz-lightning\[qlora\]'"):
        BitsandbytesQuantPrecision(mode="nf4")
    with pytest.raises(ImportError, match="bitsandbytes package"):
        import_bitsandbytes()
    cfg = compose_train("+quant=nf4", output_dir=tmp_path)
    with pytest.raises(ImportError, match="bitsandbytes nf4 baseline needs the bitsandbytes package"):
        check_quant_requirements(cfg.trainer)
    with pytest.raises(ImportError, match="bitsandbytes nf4 baseline needs the bitsandbytes package"):
        run.train(cfg, print_table=False)  # before anything is built: no silent fallback to a dense run


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"unsupported compute dtype torch.float64 \(the quant config's `dtype`\)"):
        BitsandbytesQuantPrecision(mode="nf4", dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown bitsandbytes quantization mode 'int4'"):
        BitsandbytesQuantPrecision(mode="int4")
    with pytest.raises(ValueError, match="unknown bitsandbytes quantization mode 'nf3'"):
        check_quant_requirements({"plugins": [{"_target_": "nz_lightning.lm.qlora.BitsandbytesQuantPrecision",
                                               "mode": "nf3"}]})  # fmt: skip
    settings = QuantSettings("nf4")
    with pytest.raises(ValueError, match="fp32 / bf16 / fp16 weights, got a torch.float64"):
        quantize_linear(nn.Linear(8, 8).double(), settings)
    with pytest.raises(ValueError, match="meta device"):
        quantize_linear(nn.Linear(8, 8, device="meta"), settings)
    with pytest.raises(TypeError, match="no nn.Linear layer"):
        quantize_model(nn.Sequential(nn.ReLU()), settings)


def test_lora_before_quantization_is_refused() -> None:
    """Adapters added to a dense model first would leave peft's dense LoRA layers around bitsandbytes ones: refused."""
    module = tiny_module()
    module.configure_model()  # no plugin context: dense base + LoRA
    assert module.model is not None
    with pytest.raises(ValueError, match="LoRA adapters were added before quantization"):
        BitsandbytesQuantPrecision(mode="nf4").convert_module(module)
