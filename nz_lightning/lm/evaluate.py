"""Perplexity evaluation of a (compressed, lossy or quantized) language model: ``python train.py task=eval ...``.

The paper's Table 3 protocol: the evaluation text is tokenized as one stream and cut into non-overlapping windows
(1024 tokens by default; the last, shorter window is kept), scored at batch size 1. Reported:

* token-level perplexity: torchmetrics ``Perplexity`` = exp(total NLL / predicted tokens), where each window
  predicts all its tokens but the first;
* word-level perplexity: exp(total NLL / words), words being the whitespace-separated tokens of the raw text;
* the weights' serialized bytes (:func:`~nz_lightning.tensor.sizes.weight_sizes`: NeuZip blobs, int8 values plus
  scales, dense bytes of the rest; plus bitsandbytes quantization state) and their ratio to the same model in bf16.

Seq2seq models (T5) are scored on the targets of the data module's pairs (teacher forcing); words are those of the
raw targets. The weights are whatever the run makes of them: dense (no strategy), NeuZip lossless or lossy (the
strategy compresses them when the evaluation starts), per-row absmax int8 (``eval.quantize=rowwise_int8``) or
bitsandbytes int8 / nf4 / fp4 / nf4-dq (``+quant=...``: :class:`~nz_lightning.lm.qlora.BitsandbytesQuantPrecision`,
on CPU or CUDA).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from torchmetrics.text import Perplexity

from nz_lightning.formats.safe_load import refuse_pickled_objects
from nz_lightning.lm.data import IGNORE_INDEX

__all__ = [
    "PerplexityEvaluator",
    "WindowDataset",
    "BNB_PLUGINS",
    "bf16_nbytes",
    "bnb_quant_mode",
    "check_quant_requirements",
    "count_words",
    "eval_dataset",
    "quant_state_nbytes",
]

QUANTIZERS = ("rowwise_int8",)
"""Names ``eval.quantize`` accepts (CPU-capable baselines from :mod:`nz_lightning.lm.baselines`)."""


def _exp(x: float) -> float:
    return math.exp(x) if x < 700.0 else math.inf


def count_words(texts: str | Sequence[str]) -> int:
    """Whitespace-separated tokens of the raw text (the denominator of word-level perplexity)."""
    return sum(len(t.split()) for t in ([texts] if isinstance(texts, str) else texts))


class WindowDataset(Dataset):
    """Non-overlapping windows of a 1-D token stream, each ``{"input_ids", "labels"}`` (labels = inputs).

    Args:
        tokens: The token stream.
        window: Window length in tokens (>= 2).
        max_windows: Keep only the first ``max_windows`` windows (``None``: all).

    Raises:
        ValueError: ``window < 2`` or the stream is shorter than 2 tokens.
    """

    def __init__(self, tokens: Tensor, window: int, max_windows: int | None = None) -> None:
        if window < 2:
            raise ValueError(f"eval window must be >= 2 tokens, got {window}")
        tokens = tokens.reshape(-1).long()
        starts = [s for s in range(0, tokens.numel(), window) if tokens.numel() - s >= 2]
        if not starts:
            raise ValueError(f"the evaluation text has {tokens.numel()} tokens: nothing to score")
        self.windows = [tokens[s : s + window] for s in starts[:max_windows]]
        self.covered = sum(w.numel() for w in self.windows)
        """Tokens of the stream the windows cover (from its start)."""
        self.complete = self.covered == tokens.numel()

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def eval_dataset(
    datamodule: Any, split: str = "test", window: int = 1024, max_windows: int | None = None
) -> tuple[Dataset, int, Callable[..., Any] | None]:
    """The scored data of a :class:`~nz_lightning.lm.data.TextDataModule` split, its word count and collate function.

    Causal task: the split's raw text (:meth:`~nz_lightning.lm.data.TextDataModule.raw_texts`, joined) tokenized
    as one stream, in :class:`WindowDataset` windows. Seq2seq task: the data module's (source, target) pairs.

    Args:
        datamodule: The data module (its tokenizer is used).
        split: ``"test"`` (falls back to the validation data where there is none), ``"val"`` or ``"train"``.
        window: Window length in tokens (causal task).
        max_windows: Score only the first windows / pairs (``None``: all); words then count the covered text.
    """
    texts = datamodule.raw_texts(split)
    if datamodule.task == "causal":
        text = "".join(texts)
        tokens = torch.tensor(datamodule.tokenizer([text], add_special_tokens=False)["input_ids"][0], dtype=torch.long)
        windows = WindowDataset(tokens, window, max_windows)
        covered = text if windows.complete else datamodule.tokenizer.decode(tokens[: windows.covered].tolist())
        return windows, count_words(covered), None
    from nz_lightning.lm.data import pad_pairs

    datamodule.setup()
    pairs = datamodule.data[split if split in datamodule.data else "val"]
    n = len(pairs) if max_windows is None else min(len(pairs), max_windows)
    return Subset(pairs, range(n)), count_words(texts[:n]), pad_pairs(datamodule.tokenizer.pad_token_id)


def bf16_nbytes(lm: Any) -> int:
    """Dense bytes of the LM's weights in bf16 (each tied tensor once), from its architecture built on ``meta``."""
    import transformers

    from nz_lightning.tensor.sizes import WeightSizes, weight_sizes

    auto = getattr(transformers, lm.auto_class)
    with torch.device("meta"):
        model = auto.from_config(lm.build_hf_config())
    return WeightSizes.dense(weight_sizes(model).numel, torch.bfloat16.itemsize).dense_bytes


def quant_state_nbytes(model: nn.Module) -> int:
    """Bytes of bitsandbytes quantization constants, which live outside the packed weight tensors.

    4-bit weights (``Params4bit.quant_state``): absmax per block, the code book, and with double quantization
    the second-level state; int8 weights: the per-row scales (``SCB``). 0 for models without bitsandbytes layers.
    """
    total, seen = 0, set()

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for module in model.modules():
        for param in module.parameters(recurse=False):
            state = getattr(param, "quant_state", None)
            if state is not None:
                add(getattr(state, "absmax", None))
                add(getattr(state, "code", None))
                nested = getattr(state, "state2", None)
                if nested is not None:
                    add(getattr(nested, "absmax", None))
                    add(getattr(nested, "code", None))
            add(getattr(param, "SCB", None))
        add(getattr(getattr(module, "state", None), "SCB", None))
    return total


BNB_PLUGINS = ("nz_lightning.lm.qlora.BitsandbytesQuantPrecision", "BitsandbytesPrecision")
"""Targets of bitsandbytes precision plugins: ours (CPU or CUDA) and Lightning's (CUDA only; matched by class name)."""


def _bnb_plugin(trainer_conf: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for plugin in trainer_conf.get("plugins") or []:
        if isinstance(plugin, Mapping) and str(plugin.get("_target_", "")).endswith(BNB_PLUGINS):
            return plugin
    return None


def bnb_quant_mode(trainer_conf: Mapping[str, Any]) -> str | None:
    """The mode of a bitsandbytes precision plugin in a trainer config (``+quant=...``), else ``None``."""
    plugin = _bnb_plugin(trainer_conf)
    return None if plugin is None else str(plugin.get("mode"))


def check_quant_requirements(trainer_conf: Mapping[str, Any]) -> None:
    """Fail early, naming what is missing, when a bitsandbytes baseline cannot run here.

    ``conf/quant/*.yaml`` select :class:`~nz_lightning.lm.qlora.BitsandbytesQuantPrecision`, which runs on CPU and
    CUDA and needs only the bitsandbytes package; Lightning's own ``BitsandbytesPrecision`` also needs a CUDA GPU.

    Raises:
        ImportError: A bitsandbytes plugin is configured without the ``bitsandbytes`` package.
        RuntimeError: Lightning's ``BitsandbytesPrecision`` is configured without a CUDA device or on a CPU trainer.
        ValueError: The plugin's mode is unknown.
    """
    plugin = _bnb_plugin(trainer_conf)
    if plugin is None:
        return
    from nz_lightning.lm.qlora import INSTALL_HINT, MODES

    mode = str(plugin.get("mode"))
    if mode not in MODES:
        raise ValueError(
            f"unknown bitsandbytes quantization mode {mode!r} (quant plugin `mode`); choose one of {MODES}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"the bitsandbytes {mode} baseline needs the bitsandbytes package: {INSTALL_HINT}")
    if str(plugin.get("_target_")).endswith(BNB_PLUGINS[0]):
        return
    if not torch.cuda.is_available() or trainer_conf.get("accelerator") == "cpu":
        raise RuntimeError(
            f"the bitsandbytes {mode} baseline through Lightning's BitsandbytesPrecision needs a CUDA GPU and "
            f"trainer=gpu; on a CPU use the quant configs (+quant={mode.replace('-', '_')}: {BNB_PLUGINS[0]})"
        )


def load_weights_file(path: str) -> Mapping[str, Any]:
    """The state dict in a checkpoint file (a Lightning checkpoint's ``state_dict``, or a bare state dict).

    The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a checkpoint from
    an untrusted source cannot run code while it is read.

    Raises:
        ValueError: The file holds other objects (it is refused, naming the file), or is not a checkpoint at all.
    """
    with refuse_pickled_objects(path):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or Lightning checkpoint")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: 'state_dict' is a {type(state).__name__}, not a mapping of tensors")
    return state


class PerplexityEvaluator(pl.LightningModule):
    """Scores an HF LM module (``CausalLMModule`` / ``Seq2SeqLMModule``) in ``trainer.test``.

    Logs ``eval/token_ppl``, ``eval/word_ppl``, ``eval/nll`` (mean per token), ``eval/tokens``, ``eval/words``,
    ``eval/weight_bytes``, ``eval/bf16_bytes`` and ``eval/weight_ratio`` (weight bytes / bf16 bytes).
    ``eval/weight_bytes`` is the weights' serialized bytes (:func:`~nz_lightning.tensor.sizes.weight_sizes`, each
    tied tensor once) plus bitsandbytes quantization state (:func:`quant_state_nbytes`); ``eval/bf16_bytes`` is
    the same weights' dense bytes in bf16 (:func:`bf16_nbytes`).

    Args:
        lm: The LM module; its model is built in :meth:`configure_model` (under the strategy's and precision's
            init contexts).
        words: Words of the scored raw text (for word-level perplexity).
        causal: Causal LM (labels shifted by one) or seq2seq (labels scored as they are).
        bf16_bytes: The model's weight bytes in bf16 (the reference of ``eval/weight_ratio``).
        quantize: ``None`` or ``"rowwise_int8"`` (:func:`~nz_lightning.lm.baselines.quantize_rowwise_int8`, applied
            after the model is built).
        weights_from: A Lightning checkpoint (e.g. ``final.ckpt`` of a training run) whose ``state_dict`` is loaded
            into ``lm`` after it is built, dense or NeuZip-compressed format.

    Raises:
        ValueError: Unknown ``quantize``.
    """

    def __init__(
        self,
        lm: pl.LightningModule,
        words: int,
        *,
        causal: bool = True,
        bf16_bytes: int | None = None,
        quantize: str | None = None,
        weights_from: str | None = None,
    ) -> None:
        super().__init__()
        if quantize is not None and quantize not in QUANTIZERS:
            raise ValueError(f"unknown eval.quantize {quantize!r}; choose one of {', '.join(QUANTIZERS)} or null")
        self.lm = lm
        self.words, self.causal, self.bf16_bytes = int(words), causal, bf16_bytes
        self.quantize, self.weights_from = quantize, weights_from
        self.perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self.results: dict[str, float] = {}

    def configure_model(self) -> None:
        """Build the LM (once), load ``weights_from``, apply ``quantize``, and put it in eval mode."""
        if getattr(self.lm, "model", None) is not None:
            return
        self.lm.configure_model()
        if self.weights_from:
            from nz_lightning.lightning.checkpoint_io import load_state_dict

            load_state_dict(self.lm, dict(load_weights_file(self.weights_from)))
        if self.quantize == "rowwise_int8":
            from nz_lightning.lm.baselines import quantize_rowwise_int8

            self.lm.model = quantize_rowwise_int8(self._model())
        self._model().eval()

    def _model(self) -> nn.Module:
        model = getattr(self.lm, "model", None)
        if model is None:
            raise RuntimeError("the model is not built yet: call configure_model() (the Trainer does)")
        return model

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Accumulate the NLL of one window (causal) or one pair's target tokens (seq2seq)."""
        model = self._model()
        labels = batch["labels"]
        if self.causal:
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            labels = labels[:, 1:]
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)
            logits = logits.logits
        self.perplexity.update(logits.float(), labels)

    def on_test_epoch_end(self) -> None:
        """Compute and log the perplexities and the weight sizes."""
        from nz_lightning.tensor.sizes import weight_sizes

        nll, count = self.perplexity.total_log_probs.double(), self.perplexity.count.double()
        self.perplexity.reset()
        model = self._model()
        weight_bytes = weight_sizes(model).serialized_bytes + quant_state_nbytes(model)
        results = {
            "eval/token_ppl": _exp(float(nll / count)) if count else float("nan"),
            "eval/word_ppl": _exp(float(nll) / self.words) if self.words else float("nan"),
            "eval/nll": float(nll / count) if count else float("nan"),
            "eval/tokens": float(count),
            "eval/words": float(self.words),
            "eval/weight_bytes": float(weight_bytes),
        }
        if self.bf16_bytes:
            results["eval/bf16_bytes"] = float(self.bf16_bytes)
            results["eval/weight_ratio"] = weight_bytes / self.bf16_bytes
        self.results = results
        for key, value in results.items():
            self.log(key, value, sync_dist=False)
