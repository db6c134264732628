"""nz_lightning.lm.report: the closing tables name each weight quantity; nz_lightning.lm.run helpers."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from nz_lightning.lm import report, run
from nz_lightning.tensor.sizes import WeightSizes, weight_sizes


def _printed(fn: object, summary: dict[str, object]) -> str:
    console = Console(record=True, width=200)
    fn(summary, console=console)  # type: ignore[operator]
    return console.export_text()


def test_train_summary_rows_name_the_quantities() -> None:
    sizes = WeightSizes(
        numel=1 << 20, dense_bytes=4 << 20, serialized_bytes=3 << 20, held_bytes=(3 << 20) + 65536,
        compressed_tensors=2, compressed_numel=1 << 19, compressed_dense_bytes=2 << 20,
    )  # fmt: skip
    summary = {
        "strategy": "NeuZipStrategy", "steps": 3, "train_loss": 1.5, "val_loss": None, "val_ppl": None,
        "wall_s": 1.0, "peak_rss": 100 << 20, "weights": sizes, "checkpoint": None, "output_dir": "/tmp/run",
    }  # fmt: skip
    text = _printed(report.print_summary, summary)
    assert "weights: dense" in text and "4.00 MiB (1,048,576 weights)" in text
    assert "weights: serialized (compressed)" in text and "3.00 MiB (0.750 of dense)" in text
    assert "bits per weight (serialized)" in text and "24.00" in text
    assert "weights: held in memory" in text and "3.06 MiB (incl. decoder tables)" in text
    assert "compressed tensors" in text and "2 (524,288 weights, 2.00 MiB dense)" in text
    assert "peak RSS (VmHWM)" in text and "100.00 MiB" in text and "val loss" not in text
    assert "weights" not in _printed(report.print_summary, summary | {"weights": None})


def test_eval_summary() -> None:
    metrics = {
        "eval/tokens": 1000.0, "eval/words": 200.0, "eval/token_ppl": 12.5, "eval/word_ppl": 3.0e7,
        "eval/weight_bytes": float(3 << 20), "eval/bf16_bytes": float(4 << 20), "eval/weight_ratio": 0.75,
    }  # fmt: skip
    summary = {
        "model": "m", "method": "neuzip lossless", "items": 4, "wall_s": 2.0, "peak_rss": 1 << 30,
        "peak_cuda": None, "output_dir": "/tmp/e", "metrics": metrics,
    }  # fmt: skip
    text = _printed(report.print_eval_summary, summary)
    assert "4 items, 1,000 tokens, 200 words" in text and "12.5000" in text and "3.0000e+07" in text
    assert "weights: serialized" in text and "0.750 of bf16 4.00 MiB" in text and "peak CUDA" not in text


def test_weight_probe_measures_the_module() -> None:
    module = torch.nn.Linear(8, 4)
    probe = run.WeightSizeProbe()
    assert probe.sizes is None
    probe.on_train_end(None, module)  # type: ignore[arg-type]
    assert probe.sizes == weight_sizes(module) and probe.sizes.numel == 36


def test_import_target() -> None:
    assert run.import_target("torch.nn.Linear") is torch.nn.Linear
    assert run.import_target("nz_lightning.NeuZipStrategy").__name__ == "NeuZipStrategy"
    with pytest.raises(ImportError, match=r"'nz_lightning\.no_such_module\.Thing' \(callbacks\.x\._target_\)"):
        run.import_target("nz_lightning.no_such_module.Thing", "callbacks.x")
    with pytest.raises(ImportError, match="no_such_package_xyz"):
        run.import_target("no_such_package_xyz.Thing")
