"""``CausalLMModule`` and ``Seq2SeqLMModule``: Hugging Face LMs built in ``configure_model`` from a config mapping.

The model is created in :meth:`~_HFLMModule.configure_model`, not in ``__init__``, so that Lightning (or a
strategy) can build it under an init context: on ``meta`` for streamed compression, in bf16 directly for
``bf16-true``, or with bitsandbytes layers for QLoRA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import BLEUScore

from nz_lightning.lm.checkpointing import enable_activation_checkpointing
from nz_lightning.lm.data import IGNORE_INDEX
from nz_lightning.lm.lora import apply_lora
from nz_lightning.lm.optimizer_config import build_optimizer, build_scheduler


def hf_config(config: Mapping[str, Any]) -> Any:
    """A ``transformers`` config from a mapping with ``model_type`` (``AutoConfig.for_model``).

    Raises:
        ValueError: ``model_type`` is missing.
    """
    from transformers import AutoConfig

    options = dict(config)
    model_type = options.pop("model_type", None)
    if model_type is None:
        raise ValueError("the model config needs a `model_type` (e.g. 'llama', 'gpt_neo', 't5')")
    return AutoConfig.for_model(model_type, **options)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return value


class _HFLMModule(pl.LightningModule):
    """Shared logic: build, train, evaluate (loss and perplexity) and optimize a Hugging Face LM.

    Args:
        config: The ``transformers`` config as a mapping with ``model_type`` (``hidden_size``, ...); ``None`` or
            empty: the ``pretrained`` model's own config.
        optimizer: ``{"name": "sgd"|"adamw", "lr": ..., **options}`` (see :func:`build_optimizer`).
        scheduler: Optional per-step LR schedule (see :func:`build_scheduler`); ``None``: constant LR.
        pretrained: Load weights with ``from_pretrained`` from this local path (or hub name) into ``config``'s
            architecture (its own without ``config``) instead of initialising at random. When the model is built
            with its parameters on ``meta`` (``NeuZipFSDPStrategy(meta_init=True)``), it is built from the config
            only and the strategy reads each FSDP unit's weights from the directory's safetensors file(s) as it
            shards it (:meth:`meta_weight_sources`): ``pretrained`` must then be a local directory.
        dtype: Parameter dtype (``"float32"``, ``"bfloat16"``, ...); ``None`` keeps the ambient default (which
            Lightning's ``bf16-true``/``16-true`` precision sets while ``configure_model`` runs).
        gradient_checkpointing: Recompute activations in backward (HF ``gradient_checkpointing_enable``).
        lora: peft LoRA options (see :func:`apply_lora`); ``None``: full training.
    """

    auto_class: ClassVar[str] = ""
    peft_task: ClassVar[str] = ""

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        lora: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = dict(config or {})
        self.optimizer_config = dict(optimizer or {"name": "sgd", "lr": 1e-3})
        self.scheduler_config = dict(scheduler) if scheduler else None
        self.pretrained, self.dtype_name = pretrained, dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.lora_config = dict(lora) if lora else None
        _dtype(dtype)  # fail early on a bad name
        self.model: nn.Module | None = None
        self._meta_weights: list[Path] | None = None
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # -- model ---------------------------------------------------------------------------------------------

    def build_hf_config(self) -> Any:
        """The ``transformers`` config this module builds (``config``, else the ``pretrained`` model's).

        Raises:
            ValueError: Neither ``config`` nor ``pretrained`` is given.
        """
        if self.model_config:
            return hf_config(self.model_config)
        if not self.pretrained:
            raise ValueError("the model needs a `config` (with model_type) or `pretrained` (a local path or hub name)")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.pretrained)

    def configure_model(self) -> None:
        """Build the model (once) in the ambient device/dtype context, then enable checkpointing and LoRA.

        Raises:
            FileNotFoundError: Building on ``meta`` with ``pretrained`` that is not a local directory with
                safetensors weights.
            ValueError: Building on ``meta`` with ``lora`` (adapters need peft's own init, e.g. ``B = 0``).
        """
        if self.model is not None:
            return
        import transformers

        from nz_lightning.distributed.materialize import building_on_meta, hf_weight_files

        auto = getattr(transformers, self.auto_class)
        config = self.build_hf_config()
        kwargs: dict[str, Any] = {}
        dtype = _dtype(self.dtype_name)
        if dtype is not None:
            kwargs["dtype"] = dtype
        on_meta = building_on_meta()
        if on_meta and self.lora_config is not None:
            raise ValueError("lora adapters cannot be built on meta (peft's init, e.g. B = 0): build without meta_init")
        if self.pretrained and on_meta:  # the strategy fills each unit from the files as it shards it
            self._meta_weights = hf_weight_files(self.pretrained)
            model = auto.from_config(config, **kwargs)
        elif self.pretrained:
            model = auto.from_pretrained(self.pretrained, config=config, **kwargs).train()  # loads in eval mode
        else:
            model = auto.from_config(config, **kwargs)
        if self.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if self.lora_config is not None:
            model = apply_lora(model, self.lora_config, self.peft_task)
        self.model = model

    def meta_weight_sources(self) -> dict[str, list[Path]]:
        """Where the strategy reads the ``meta`` weights of ``self.model`` (``{"model": files}``, keys relative to the
        Hugging Face model), when ``pretrained`` was built on ``meta``; else ``{}``."""
        return {"model": self._meta_weights} if self._meta_weights is not None else {}

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("the model is not built yet: call configure_model() (the Trainer does)")
        return self.model

    def forward(self, **batch: torch.Tensor) -> Any:
        """The wrapped model's output for a batch (``input_ids``, ``labels``, ...)."""
        return self._require_model()(**batch)

    # -- steps ---------------------------------------------------------------------------------------------

    @staticmethod
    def predicted_tokens(batch: Mapping[str, torch.Tensor]) -> int:
        """Number of tokens the loss averages over (what weights the loss across batches)."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Forward with labels; logs ``train/loss`` each step."""
        loss = self(**batch).loss
        self.log("train/loss", loss.detach().float(), on_step=True, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metric: MeanMetric) -> torch.Tensor:
        loss = self(**batch).loss.detach().float()
        metric.update(loss, weight=self.predicted_tokens(batch))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate the token-weighted validation loss."""
        self._eval_step(batch, self.val_loss)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate the token-weighted test loss."""
        self._eval_step(batch, self.test_loss)

    def _log_epoch(self, prefix: str, metric: MeanMetric) -> None:
        if metric.update_count == 0:
            return
        loss = metric.compute()
        metric.reset()
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{prefix}/ppl", torch.exp(loss.clamp(max=50.0)), sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss`` and ``val/ppl`` (perplexity = exp of the token-weighted mean loss)."""
        self._log_epoch("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        """Log ``test/loss`` and ``test/ppl``."""
        self._log_epoch("test", self.test_loss)

    # -- optimization --------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """The configured optimizer over trainable parameters, plus the per-step LR schedule if any."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, self.optimizer_config)
        if self.scheduler_config is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        total = total if math.isfinite(total) and total > 0 else 1
        scheduler = build_scheduler(optimizer, self.scheduler_config, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CausalLMModule(_HFLMModule):
    """A decoder-only LM (``AutoModelForCausalLM``: Llama, GPT-Neo, GPT-2, ...) on ``input_ids``/``labels`` blocks.

    See :class:`_HFLMModule` for the arguments.
    """

    auto_class = "AutoModelForCausalLM"
    peft_task = "CAUSAL_LM"

    @staticmethod
    def predicted_tokens(batch: Mapping[str, torch.Tensor]) -> int:
        """Labels after the first position of each row (HF shifts them by one)."""
        return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


class Seq2SeqLMModule(_HFLMModule):
    """An encoder-decoder LM (``AutoModelForSeq2SeqLM``: T5, ...) on padded source/target pairs.

    Args:
        *args: As :class:`_HFLMModule`.
        bleu: Also generate (greedy) in validation/test and log corpus BLEU (``val/bleu``, ``test/bleu``),
            decoding with the datamodule's ``tokenizer``.
        max_new_tokens: Generation length for BLEU.
        **kwargs: As :class:`_HFLMModule`.
    """

    auto_class = "AutoModelForSeq2SeqLM"
    peft_task = "SEQ_2_SEQ_LM"

    def __init__(self, *args: Any, bleu: bool = False, max_new_tokens: int = 64, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bleu, self.max_new_tokens = bleu, max_new_tokens
        self.val_bleu = BLEUScore()
        self.test_bleu = BLEUScore()

    def _update_bleu(self, batch: dict[str, torch.Tensor], metric: BLEUScore) -> None:
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("bleu=True needs a datamodule with a `tokenizer` to decode generations")
        model: Any = self._require_model()
        generated = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
        )
        labels = batch["labels"].masked_fill(batch["labels"] == IGNORE_INDEX, tokenizer.pad_token_id)
        preds = tokenizer.batch_decode(generated.tolist(), skip_special_tokens=True)
        refs = tokenizer.batch_decode(labels.tolist(), skip_special_tokens=True)
        metric.update([p.strip() for p in preds], [[r.strip()] for r in refs])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Validation loss, and BLEU of greedy generations when enabled."""
        super().validation_step(batch, batch_idx)
        if self.bleu:
            self._update_bleu(batch, self.val_bleu)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Test loss, and BLEU of greedy generations when enabled."""
        super().test_step(batch, batch_idx)
        if self.bleu:
            self._update_bleu(batch, self.test_bleu)

    def _log_bleu(self, prefix: str, metric: BLEUScore) -> None:
        if self.bleu and metric.update_count > 0:
            self.log(f"{prefix}/bleu", metric.compute() * 100.0)
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss``, ``val/ppl`` and (when enabled) ``val/bleu`` (0-100)."""
        super().on_validation_epoch_end()
        self._log_bleu("val", self.val_bleu)

    def on_test_epoch_end(self) -> None:
        """Log ``test/loss``, ``test/ppl`` and (when enabled) ``test/bleu`` (0-100)."""
        super().on_test_epoch_end()
        self._log_bleu("test", self.test_bleu)
