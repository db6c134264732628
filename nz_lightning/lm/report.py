"""The closing tables of ``train.py`` runs (rich): training (:func:`print_summary`) and evaluation
(:func:`print_eval_summary`). They print the summary dicts that :func:`nz_lightning.lm.run.train` and
:func:`nz_lightning.lm.run.evaluate` return."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from nz_lightning.tensor.sizes import WeightSizes

__all__ = ["mib", "print_eval_summary", "print_summary", "weight_rows"]


def mib(n: float) -> str:
    """``n`` bytes as MiB with two decimals, e.g. ``"1,024.00 MiB"``."""
    return f"{n / 2**20:,.2f} MiB"


def weight_rows(sizes: WeightSizes) -> list[tuple[str, str]]:
    """Table rows for the weights, each naming its quantity (see :mod:`nz_lightning.tensor.sizes`).

    Args:
        sizes: The model's weight sizes.

    Returns:
        ``(label, value)`` rows: dense size, serialized (compressed) size and its ratio to dense, serialized bits
        per weight, what the weights hold in memory (including cached decoder tables), and the compressed tensors.
    """
    return [
        ("weights: dense", f"{mib(sizes.dense_bytes)} ({sizes.numel:,} weights)"),
        ("weights: serialized (compressed)", f"{mib(sizes.serialized_bytes)} ({sizes.ratio_to_dense:.3f} of dense)"),
        ("  bits per weight (serialized)", f"{sizes.bits_per_weight:.2f}"),
        ("weights: held in memory", f"{mib(sizes.held_bytes)} (incl. decoder tables)"),
        (
            "compressed tensors",
            f"{sizes.compressed_tensors} ({sizes.compressed_numel:,} weights, {mib(sizes.compressed_dense_bytes)} "
            "dense)",
        ),
    ]


def _table(title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    return table


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """Print the closing table of a training run.

    Args:
        summary: What :func:`nz_lightning.lm.run.train` returns (``strategy``, ``steps``, losses, ``wall_s``,
            ``peak_rss``, ``weights`` (:class:`~nz_lightning.tensor.sizes.WeightSizes` or None), ``quantized``
            (:func:`~nz_lightning.lm.qlora.held_weight_bytes` of bitsandbytes-quantized models, else None),
            ``checkpoint``, ``output_dir``).
        console: Where to print; default a new rich console on stdout.
    """
    table = _table("nz_lightning run")
    table.add_row("strategy", str(summary["strategy"]))
    table.add_row("steps", str(summary["steps"]))
    for key in ("train_loss", "val_loss", "val_ppl"):
        if summary.get(key) is not None:
            table.add_row(key.replace("_", " "), f"{summary[key]:.4f}")
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    table.add_row("peak RSS (VmHWM)", mib(summary["peak_rss"]))
    sizes = summary.get("weights")
    quant = summary.get("quantized")
    if sizes is not None and not quant:
        for label, value in weight_rows(sizes):
            table.add_row(label, value)
    if quant:  # bitsandbytes layers: their packed storage is not a weight count (nz_lightning.lm.qlora)
        table.add_row(
            "weights: bitsandbytes quantized", f"{mib(quant['quantized'])} ({quant['quantized_numel']:,} weights)"
        )
        table.add_row("weights: held in total", f"{mib(quant['total'])} (quantized + dense rest + adapters)")
        table.add_row("weights: trainable", mib(quant["trainable"]))
    if summary.get("checkpoint"):
        table.add_row("checkpoint", str(summary["checkpoint"]))
    table.add_row("output dir", str(summary["output_dir"]))
    (console or Console()).print(table)


def print_eval_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """Print the closing table of an evaluation (``task=eval``).

    Args:
        summary: What :func:`nz_lightning.lm.run.evaluate` returns (``model``, ``method``, ``items``, ``wall_s``,
            ``peak_rss``, ``peak_cuda``, ``output_dir`` and ``metrics`` with the ``eval/*`` figures).
        console: Where to print; default a new rich console on stdout.
    """
    m = summary["metrics"]
    table = _table("nz_lightning eval")
    table.add_row("model", str(summary["model"]))
    table.add_row("method", str(summary["method"]))
    table.add_row("scored", f"{summary['items']} items, {m['eval/tokens']:,.0f} tokens, {m['eval/words']:,.0f} words")
    for key in ("token", "word"):
        value = m[f"eval/{key}_ppl"]
        table.add_row(f"{key} perplexity", f"{value:.4f}" if value < 1e6 else f"{value:.4e}")
    ratio = f" ({m['eval/weight_ratio']:.3f} of bf16 {mib(m['eval/bf16_bytes'])})" if "eval/weight_ratio" in m else ""
    table.add_row("weights: serialized", mib(m["eval/weight_bytes"]) + ratio)  # incl. bitsandbytes quant state
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    table.add_row("peak RSS (VmHWM)", mib(summary["peak_rss"]))
    if summary.get("peak_cuda"):
        table.add_row("peak CUDA memory", mib(summary["peak_cuda"]))
    table.add_row("output dir", str(summary["output_dir"]))
    (console or Console()).print(table)
