"""The run logic behind ``train.py``: build data, model, strategy, callbacks, loggers and trainer from a Hydra
config, then train (:func:`train`) or evaluate (:func:`evaluate`) and print a summary (:mod:`nz_lightning.lm.report`).

``train.py`` is only the Hydra entry point; tests and notebooks compose a config (``hydra.compose``) and call these
functions directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_object, instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from nz_lightning.formats.safe_load import check_checkpoint_file
from nz_lightning.lm.memory import peak_rss_bytes
from nz_lightning.lm.report import print_eval_summary, print_summary
from nz_lightning.tensor.sizes import WeightSizes, weight_sizes

__all__ = [
    "WeightSizeProbe",
    "build_strategy",
    "eval_method",
    "evaluate",
    "import_target",
    "instantiate_group",
    "instantiate_target",
    "set_cpu_threads",
    "train",
]


# -- instantiation -------------------------------------------------------------------------------------------


def import_target(target: str, key: str | None = None) -> Any:
    """Import the object a config's ``_target_`` names, so that a broken import fails loudly and says which.

    Hydra's own error for an unimportable target ("Error locating target ...") hides the cause in the exception
    chain; this raises an ``ImportError`` that names the target (and its config key) and carries the real error.

    Args:
        target: A dotted path, e.g. ``nz_lightning.NeuZipStrategy``.
        key: The config key the target belongs to (for the message), e.g. ``callbacks.neuzip_stats``.

    Returns:
        The class or callable.

    Raises:
        ImportError: The target's module, or something it imports, cannot be imported, or it lacks the name.
    """
    where = f" ({key}._target_)" if key else ""
    try:
        return get_object(target)
    except ImportError as e:
        cause = e.__cause__ if isinstance(e.__cause__, BaseException) else e
        raise ImportError(f"cannot import {target!r}{where}: {cause!r}") from cause
    except (AttributeError, ValueError) as e:
        raise ImportError(f"cannot import {target!r}{where}: {e!r}") from e


def instantiate_target(conf: DictConfig, key: str | None = None, **kwargs: Any) -> Any:
    """Instantiate a ``_target_`` config after importing its target (:func:`import_target`: broken imports raise).

    Args:
        conf: A config node with ``_target_``.
        key: Its config key, named in errors.
        **kwargs: Extra arguments for the target (override the config's).

    Returns:
        The instantiated object (containers passed as plain dicts and lists, ``_convert_="all"``).
    """
    import_target(str(conf._target_), key)
    return instantiate(conf, **kwargs, _convert_="all")


def instantiate_group(group: DictConfig | None, key: str = "") -> list[Any]:
    """Instantiate every ``_target_`` entry of a ``{name: config}`` group (callbacks, loggers).

    Entries without ``_target_`` (e.g. ``none`` placeholders) are skipped; any target that cannot be imported raises.

    Args:
        group: The group's node (``cfg.callbacks``, ``cfg.logger``) or None.
        key: The group's config key, named in errors.

    Returns:
        The instantiated objects in config order.

    Raises:
        ImportError: An entry's target cannot be imported.
    """
    objects: list[Any] = []
    for name, conf in (group or {}).items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            label = str(name)
            objects.append(instantiate_target(conf, f"{key}.{label}" if key else label))
    return objects


def build_strategy(cfg: DictConfig) -> Any:
    """The Trainer's strategy: ``cfg.strategy`` instantiated when present (``+strategy=...``), else ``"auto"``.

    Args:
        cfg: The run's config.

    Returns:
        A strategy object, a strategy name (a plain string ``cfg.strategy``) or ``"auto"``.

    Raises:
        ImportError: The strategy's target cannot be imported (the message names it; the cause is chained).
    """
    conf = cfg.get("strategy")
    if conf is None:
        return "auto"
    if isinstance(conf, str):
        return conf
    return instantiate_target(conf, "strategy")


def set_cpu_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch's intra-op parallelism and for the numba codec.

    Args:
        n: Thread count (numba's is capped at ``NUMBA_NUM_THREADS``).
    """
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(max(1, min(n, int(getattr(numba.config, "NUMBA_NUM_THREADS", n)))))


class WeightSizeProbe(Callback):
    """Records :func:`~nz_lightning.tensor.sizes.weight_sizes` of the module at the end of training (before a
    strategy's teardown could decompress it).

    Attributes:
        sizes: The sizes, or None before training ends.
        quantized: :func:`~nz_lightning.lm.qlora.held_weight_bytes` when the model has bitsandbytes layers.
    """

    def __init__(self) -> None:
        self.sizes: WeightSizes | None = None
        self.quantized: dict[str, int] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the weights as trained."""
        self.sizes = weight_sizes(pl_module)
        from nz_lightning.lm.qlora import held_weight_bytes, quantized_layers

        self.quantized = held_weight_bytes(pl_module) if quantized_layers(pl_module) else None


# -- shared steps --------------------------------------------------------------------------------------------


def _start(cfg: DictConfig) -> str:
    """Threads, seed and the output directory (created) of a run."""
    if cfg.get("cpu_threads"):
        set_cpu_threads(int(cfg.cpu_threads))
    pl.seed_everything(int(cfg.seed), workers=True)
    output_dir = str(cfg.paths.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    return output_dir


def _check_vocab(module: Any, datamodule: Any) -> None:
    model_vocab = (getattr(module, "model_config", None) or {}).get("vocab_size")
    data_vocab = getattr(datamodule, "vocab_size", None)
    if model_vocab is not None and data_vocab is not None and int(model_vocab) < int(data_vocab):
        raise ValueError(f"model vocab_size {model_vocab} < tokenizer size {data_vocab}: raise model.config.vocab_size")


def _scalars(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _log_config(trainer: pl.Trainer, cfg: DictConfig) -> None:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in trainer.loggers:
        lg.log_hyperparams(resolved)  # type: ignore[arg-type]


# -- training ------------------------------------------------------------------------------------------------


def train(cfg: DictConfig, print_table: bool = True) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, optionally validate/test, save a checkpoint and print a summary.

    Args:
        cfg: A composed ``conf/train.yaml`` config (``task=train``).
        print_table: Print the summary table (:func:`nz_lightning.lm.report.print_summary`).

    Returns:
        The summary: ``strategy`` (class name), ``steps``, ``train_loss``, ``val_loss``, ``val_ppl`` (None when not
        logged), ``wall_s``, ``peak_rss`` (bytes), ``weights`` (the trained model's
        :class:`~nz_lightning.tensor.sizes.WeightSizes`), ``quantized`` (bytes held by bitsandbytes-quantized weights,
        :func:`~nz_lightning.lm.qlora.held_weight_bytes`, or None), ``checkpoint`` (path or None), ``output_dir`` and
        ``metrics`` (every scalar the trainer logged).

    Raises:
        ImportError: A configured target (strategy, callback, logger, model, data) cannot be imported, or a
            ``+quant=...`` baseline is configured without the bitsandbytes package.
        ValueError: The model's vocabulary is smaller than the tokenizer's, or an unknown quantization mode.
    """
    from nz_lightning.lm.evaluate import check_quant_requirements

    start = time.perf_counter()
    check_quant_requirements(cfg.trainer)
    output_dir = _start(cfg)
    datamodule = instantiate_target(cfg.data, "data")
    module = instantiate_target(cfg.model, "model")
    module._log_hyperparams = False  # the whole resolved config is logged below; don't add the module's args again
    _check_vocab(module, datamodule)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    probe = WeightSizeProbe()
    trainer: pl.Trainer = instantiate_target(
        cfg.trainer, "trainer", callbacks=[*callbacks, probe], logger=loggers or False, strategy=build_strategy(cfg)
    )
    _log_config(trainer, cfg)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        check_checkpoint_file(str(ckpt_path))  # a clear error for a bad file, whatever strategy reads it
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = _scalars(trainer)  # each later stage (validate, test) starts its own callback_metrics
    checkpoint = None
    if cfg.get("save_checkpoint", True):
        checkpoint = os.path.join(output_dir, "checkpoints", "final.ckpt")
        trainer.save_checkpoint(checkpoint, weights_only=False)  # full state: resumable with ckpt_path=
    if cfg.get("validate", False):
        trainer.validate(module, datamodule=datamodule)
        metrics.update(_scalars(trainer))
    if cfg.get("test", False):
        trainer.test(module, datamodule=datamodule)
        metrics.update(_scalars(trainer))

    summary = {
        "strategy": type(trainer.strategy).__name__,
        "steps": trainer.global_step,
        "train_loss": metrics.get("train/loss"),
        "val_loss": metrics.get("val/loss"),
        "val_ppl": metrics.get("val/ppl"),
        "wall_s": time.perf_counter() - start,
        "peak_rss": peak_rss_bytes(),
        "weights": probe.sizes,
        "quantized": probe.quantized,
        "checkpoint": checkpoint,
        "output_dir": output_dir,
        "metrics": metrics,
    }
    if print_table and trainer.is_global_zero:  # data parallel: one table, from rank 0
        print_summary(summary)
    return summary


# -- evaluation (task=eval) ----------------------------------------------------------------------------------


def eval_method(cfg: DictConfig) -> str:
    """What the config makes of the weights in ``task=eval``, in words (e.g. ``"neuzip 3-bit (block 512)"``).

    Args:
        cfg: The run's config.

    Returns:
        ``bitsandbytes <mode>``, the ``eval.quantize`` method, ``neuzip lossless`` / ``neuzip <k>-bit (block n)``
        or ``dense <dtype or precision>``.
    """
    from nz_lightning.lm.evaluate import bnb_quant_mode

    mode = bnb_quant_mode(cfg.trainer)
    if mode is not None:
        return f"bitsandbytes {mode}"
    if cfg.eval.get("quantize"):
        return str(cfg.eval.quantize)
    strategy = cfg.get("strategy")
    if isinstance(strategy, Mapping) and strategy.get("compress", False):
        bits = strategy.get("mantissa_bits")
        return "neuzip lossless" if bits is None else f"neuzip {bits}-bit (block {strategy.get('block_size')})"
    return f"dense {cfg.model.get('dtype') or cfg.trainer.get('precision')}"


def evaluate(cfg: DictConfig, print_table: bool = True) -> dict[str, Any]:
    """Perplexity of ``cfg.model`` on ``cfg.data`` (``cfg.eval``: split, window, ...) through ``trainer.test``.

    The method is what the config makes of the weights: no strategy (dense), ``+strategy=neuzip`` (lossless),
    ``+strategy=neuzip_lossy_<k>bit``, ``eval.quantize=rowwise_int8`` or ``+quant=int8|nf4|fp4|nf4_dq``
    (bitsandbytes, CPU or CUDA).

    Args:
        cfg: A composed ``conf/train.yaml`` config with ``task=eval``.
        print_table: Print the summary table (:func:`nz_lightning.lm.report.print_eval_summary`).

    Returns:
        The summary: ``model``, ``method`` (:func:`eval_method`), ``items`` (scored windows or pairs), ``wall_s``,
        ``peak_rss`` (bytes), ``peak_cuda`` (bytes or None), ``output_dir`` and ``metrics`` (``eval/*``).

    Raises:
        ImportError: A configured target cannot be imported, or a bitsandbytes baseline without bitsandbytes.
        RuntimeError: Lightning's own ``BitsandbytesPrecision`` without CUDA.
    """
    from torch.utils.data import DataLoader

    from nz_lightning.lm.evaluate import PerplexityEvaluator, bf16_nbytes, check_quant_requirements, eval_dataset

    start = time.perf_counter()
    check_quant_requirements(cfg.trainer)
    output_dir = _start(cfg)
    opts = cfg.eval
    datamodule = instantiate_target(cfg.data, "data")
    dataset, words, collate = eval_dataset(datamodule, str(opts.split), int(opts.window), opts.get("max_windows"))
    lm = instantiate_target(cfg.model, "model")
    _check_vocab(lm, datamodule)
    evaluator = PerplexityEvaluator(
        lm,
        words,
        causal=datamodule.task == "causal",
        bf16_bytes=bf16_nbytes(lm),
        quantize=opts.get("quantize"),
        weights_from=opts.get("weights_from"),
    )
    loggers = instantiate_group(cfg.get("logger"), "logger")
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer_cfg = cfg.trainer.copy()
    if "plugins" in trainer_cfg:  # BitsandbytesPrecision replaces the precision setting
        trainer_cfg.precision = None
    trainer: pl.Trainer = instantiate_target(
        trainer_cfg, "trainer", callbacks=callbacks, logger=loggers or False, strategy=build_strategy(cfg)
    )
    _log_config(trainer, cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate)
    trainer.test(evaluator, dataloaders=loader)
    summary = {
        "model": cfg.model.get("pretrained") or (cfg.model.get("config") or {}).get("model_type"),
        "method": eval_method(cfg),
        "items": len(dataset),  # type: ignore[arg-type]
        "wall_s": time.perf_counter() - start,
        "peak_rss": peak_rss_bytes(),
        "peak_cuda": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "output_dir": output_dir,
        "metrics": dict(evaluator.results),
    }
    if print_table:
        print_eval_summary(summary)
    return summary
