"""Train a language model with Lightning from Hydra configs (``conf/``, recipes in ``recipes/``).

Examples::

    python train.py +strategy=neuzip                       # embedded default: tiny Llama, stdlib text, CPU
    python train.py                                        # the same with plain Lightning (no compression)
    python train.py +experiment=llama3_8b_under_16gb       # a recipe (recipes/*.yaml, see recipes/README.md)
    python train.py +strategy=neuzip logger=wandb model.optimizer.lr=1e-3
    python train.py task=eval +strategy=neuzip_lossy_3bit model=pretrained_causal model.pretrained=DIR data=wikitext2
    python train.py +experiment=table3a/llama3_8b_neuzip_3bit   # lossy-inference recipes (Table 3, GPU)
"""

from __future__ import annotations

import logging
import os
import resource
import time
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train")


# -- instantiation -------------------------------------------------------------------------------------------


def _target_available(target: str) -> bool:
    try:
        get_object(target)
    except (ImportError, AttributeError, ValueError):
        return False
    return True


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a ``{name: config}`` group (callbacks, loggers).

    An ``nz_lightning.*`` target that cannot be imported (an optional component this checkout lacks) is
    skipped with a warning; any other failure raises.
    """
    objects: list[Any] = []
    for name, conf in (group or {}).items():
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            continue
        target = str(conf._target_)
        if target.startswith("nz_lightning.") and not _target_available(target):
            log.warning("skipping %s: %s is not available in this checkout", name, target)
            continue
        objects.append(instantiate(conf, _convert_="all"))
    return objects


def build_strategy(cfg: DictConfig) -> Any:
    """The Trainer's strategy: ``cfg.strategy`` instantiated when present (``+strategy=...``), else ``"auto"``.

    Raises:
        InstantiationException: The configured strategy cannot be built (e.g. not importable yet).
    """
    conf = cfg.get("strategy")
    if conf is None:
        return "auto"
    if isinstance(conf, str):
        return conf
    target = str(conf.get("_target_", ""))
    if target and not _target_available(target):
        raise InstantiationException(f"strategy target {target!r} cannot be imported")
    return instantiate(conf, _convert_="all")


def set_cpu_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch's intra-op parallelism and for the numba codec."""
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(max(1, min(n, int(getattr(numba.config, "NUMBA_NUM_THREADS", n)))))


# -- measurements --------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``; ``ru_maxrss`` where ``/proc`` is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _serialized_nbytes(store: Any) -> int:
    return int(store.serialized_nbytes)


def weight_bytes(module: Any) -> dict[str, int]:
    """Bytes of the weights now vs what the same parameters need dense (each tied parameter once).

    Returns:
        ``dense``: numel x itemsize of every parameter. ``compressed``: the serialized compressed form of the
        compressed parameters (header, tables, payload) plus the dense rest. ``held``: the same with what the
        compressed stores hold besides (``store.nbytes``: decoder lookup tables cached by decodes, 32 KiB per
        tensor on CPU, which only matters for tiny models). ``compressed_params``: how many are compressed;
        ``compressed_dense``: their dense size.
    """
    from nz_lightning import compressed_parameters

    compressed = compressed_parameters(module)
    ids = {id(p) for _, p in compressed}
    stores = {id(p.store): p.store for _, p in compressed}
    serialized = sum(_serialized_nbytes(s) for s in stores.values())
    dense = rest = compressed_dense = 0
    for p in module.parameters():
        size = p.numel() * p.element_size()
        dense += size
        if id(p) in ids:
            compressed_dense += size
        else:
            rest += size
    return {
        "dense": dense,
        "compressed": rest + serialized,
        "held": rest + sum(s.nbytes for s in stores.values()),
        "compressed_params": len(compressed),
        "compressed_dense": compressed_dense,
    }


class WeightSizeProbe(Callback):
    """Records :func:`weight_bytes` at the end of training (before a strategy's teardown could decompress)."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the weights as trained."""
        self.sizes = weight_bytes(pl_module)


# -- summary -------------------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def print_summary(summary: dict[str, Any]) -> None:
    """A closing table on the console (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="nz_lightning run", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("strategy", str(summary["strategy"]))
    table.add_row("steps", str(summary["steps"]))
    for key in ("train_loss", "val_loss", "val_ppl"):
        if summary.get(key) is not None:
            table.add_row(key.replace("_", " "), f"{summary[key]:.4f}")
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    table.add_row("peak RSS (VmHWM)", _mib(summary["peak_rss"]))
    sizes = summary.get("weights")
    if sizes:
        ratio = sizes["compressed"] / max(1, sizes["dense"])
        table.add_row("weights (dense model)", _mib(sizes["dense"]))
        table.add_row("weights compressed", f"{_mib(sizes['compressed'])} ({ratio:.3f} of dense)")
        table.add_row("  held incl. decoder tables", _mib(sizes["held"]))
        table.add_row("compressed tensors", f"{sizes['compressed_params']} ({_mib(sizes['compressed_dense'])} dense)")
    if summary.get("checkpoint"):
        table.add_row("checkpoint", str(summary["checkpoint"]))
    table.add_row("output dir", str(summary["output_dir"]))
    Console().print(table)


# -- the run -------------------------------------------------------------------------------------------------


def _check_vocab(module: Any, datamodule: Any) -> None:
    model_vocab = getattr(module, "model_config", {}).get("vocab_size")
    data_vocab = getattr(datamodule, "vocab_size", None)
    if model_vocab is not None and data_vocab is not None and int(model_vocab) < int(data_vocab):
        raise ValueError(f"model vocab_size {model_vocab} < tokenizer size {data_vocab}: raise model.config.vocab_size")


def _scalars(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, optionally validate/test, save a checkpoint and print a summary.

    Returns:
        The summary: strategy, steps, losses, wall time, peak RSS, weight sizes, checkpoint path, metrics.
    """
    start = time.perf_counter()
    if cfg.get("cpu_threads"):
        set_cpu_threads(int(cfg.cpu_threads))
    pl.seed_everything(int(cfg.seed), workers=True)
    output_dir = str(cfg.paths.output_dir)
    os.makedirs(output_dir, exist_ok=True)

    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    module._log_hyperparams = False  # the whole resolved config is logged below; don't add the module's args again
    _check_vocab(module, datamodule)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    probe = WeightSizeProbe()
    strategy = build_strategy(cfg)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=[*callbacks, probe], logger=loggers or False, strategy=strategy, _convert_="all"
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in trainer.loggers:
        lg.log_hyperparams(resolved)  # type: ignore[arg-type]

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
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
        "checkpoint": checkpoint,
        "output_dir": output_dir,
        "metrics": metrics,
    }
    print_summary(summary)
    return summary


# -- evaluation (task=eval) ----------------------------------------------------------------------------------


def _method(cfg: DictConfig) -> str:
    from nz_lightning.lm.evaluate import bnb_quant_mode

    mode = bnb_quant_mode(cfg.trainer)
    if mode is not None:
        return f"bitsandbytes {mode}"
    if cfg.eval.get("quantize"):
        return str(cfg.eval.quantize)
    strategy = cfg.get("strategy")
    if isinstance(strategy, DictConfig) and strategy.get("compress", False):
        bits = strategy.get("mantissa_bits")
        return "neuzip lossless" if bits is None else f"neuzip {bits}-bit (block {strategy.get('block_size')})"
    return f"dense {cfg.model.get('dtype') or cfg.trainer.get('precision')}"


def print_eval_summary(summary: dict[str, Any]) -> None:
    """The closing table of an evaluation (rich)."""
    from rich.console import Console
    from rich.table import Table

    m = summary["metrics"]
    table = Table(title="nz_lightning eval", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("model", str(summary["model"]))
    table.add_row("method", str(summary["method"]))
    table.add_row("scored", f"{summary['items']} items, {m['eval/tokens']:,.0f} tokens, {m['eval/words']:,.0f} words")
    for key in ("token", "word"):
        value = m[f"eval/{key}_ppl"]
        table.add_row(f"{key} perplexity", f"{value:.4f}" if value < 1e6 else f"{value:.4e}")
    ratio = f" ({m['eval/weight_ratio']:.3f} of bf16 {_mib(m['eval/bf16_bytes'])})" if "eval/weight_ratio" in m else ""
    table.add_row("weights", _mib(m["eval/weight_bytes"]) + ratio)
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    table.add_row("peak RSS (VmHWM)", _mib(summary["peak_rss"]))
    if summary.get("peak_cuda"):
        table.add_row("peak CUDA memory", _mib(summary["peak_cuda"]))
    table.add_row("output dir", str(summary["output_dir"]))
    Console().print(table)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Perplexity of ``cfg.model`` on ``cfg.data`` (``cfg.eval``: split, window, ...) through ``trainer.test``.

    The method is what the config makes of the weights: no strategy (dense), ``+strategy=neuzip`` (lossless),
    ``+strategy=neuzip_lossy_<k>bit``, ``eval.quantize=rowwise_int8`` or ``+quant=int8|nf4|fp4|nf4_dq``
    (bitsandbytes; needs CUDA).

    Returns:
        The summary: model, method, scored items, wall time, peak RSS / CUDA memory, and ``metrics`` (``eval/*``).

    Raises:
        RuntimeError: A bitsandbytes baseline without bitsandbytes or CUDA.
    """
    from torch.utils.data import DataLoader

    from nz_lightning.lm.evaluate import PerplexityEvaluator, bf16_nbytes, check_quant_requirements, eval_dataset

    start = time.perf_counter()
    if cfg.get("cpu_threads"):
        set_cpu_threads(int(cfg.cpu_threads))
    pl.seed_everything(int(cfg.seed), workers=True)
    check_quant_requirements(cfg.trainer)
    output_dir = str(cfg.paths.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    opts = cfg.eval
    datamodule = instantiate(cfg.data, _convert_="all")
    dataset, words, collate = eval_dataset(datamodule, str(opts.split), int(opts.window), opts.get("max_windows"))
    lm = instantiate(cfg.model, _convert_="all")
    _check_vocab(lm, datamodule)
    evaluator = PerplexityEvaluator(
        lm,
        words,
        causal=datamodule.task == "causal",
        bf16_bytes=bf16_nbytes(lm),
        quantize=opts.get("quantize"),
        weights_from=opts.get("weights_from"),
    )
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = [c for c in instantiate_group(cfg.get("callbacks")) if not isinstance(c, LearningRateMonitor)]
    trainer_cfg = cfg.trainer.copy()
    if "plugins" in trainer_cfg:  # BitsandbytesPrecision replaces the precision setting
        trainer_cfg.precision = None
    trainer: pl.Trainer = instantiate(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, strategy=build_strategy(cfg), _convert_="all"
    )
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate)
    trainer.test(evaluator, dataloaders=loader)
    summary = {
        "model": cfg.model.get("pretrained") or (cfg.model.get("config") or {}).get("model_type"),
        "method": _method(cfg),
        "items": len(dataset),  # type: ignore[arg-type]
        "wall_s": time.perf_counter() - start,
        "peak_rss": peak_rss_bytes(),
        "peak_cuda": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "output_dir": output_dir,
        "metrics": dict(evaluator.results),
    }
    print_eval_summary(summary)
    return summary


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point (``task=train`` or ``task=eval``); returns ``cfg.optimized_metric`` when set."""
    if str(cfg.get("task", "train")) == "eval":
        summary = evaluate(cfg)
    elif str(cfg.get("task", "train")) == "train":
        summary = train(cfg)
    else:
        raise ValueError(f"task must be 'train' or 'eval', got {cfg.task!r}")
    key = cfg.get("optimized_metric")
    return summary["metrics"].get(key) if key else None


if __name__ == "__main__":
    main()
