"""nz_lightning: NeuZip compressed training and inference for PyTorch Lightning.

The public names below are re-exported lazily (PEP 562), so ``from nz_lightning import compress`` loads only the
codec (``nz_lightning.kernels``) and torch, never Lightning. Sub-packages, one concern each:

* ``nz_lightning.kernels``: the codec (the top-level ``kernels/`` folder of the source tree).
* ``nz_lightning.tensor``: compressed parameters, the decode workspace, model conversion, weight sizes.
* ``nz_lightning.optim``: fused in-backward optimizers.
* ``nz_lightning.distributed``: FSDP2 with compressed weight shards and compressed all-gather.
* ``nz_lightning.lightning``: the Lightning strategies, optimizer translation, callbacks, checkpoint IO.
* ``nz_lightning.formats``: the NZSF container, whole-model files, atomic writes.
* ``nz_lightning.lm``: the language-model application (LightningModules, data, evaluation, baselines, runs).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nz_lightning.formats.model_file import ModelFileReport, load_compressed, save_compressed
    from nz_lightning.kernels import CompressedTensor, compress
    from nz_lightning.lightning.callbacks import NeuZipStats
    from nz_lightning.lightning.fsdp_strategy import NeuZipFSDPStrategy
    from nz_lightning.lightning.strategy import NeuZipStrategy
    from nz_lightning.optim import FusedOptimizer, fused_optimizer
    from nz_lightning.tensor.convert import compress_model, compressed_parameters, decompress_model
    from nz_lightning.tensor.parameter import NZParameter, is_compressed
    from nz_lightning.tensor.workspace import CODEC_STATS

_EXPORTS: dict[str, str] = {
    "CODEC_STATS": "nz_lightning.tensor.workspace",
    "CompressedTensor": "nz_lightning.kernels",
    "FusedOptimizer": "nz_lightning.optim",
    "ModelFileReport": "nz_lightning.formats.model_file",
    "NZParameter": "nz_lightning.tensor.parameter",
    "NeuZipStats": "nz_lightning.lightning.callbacks",
    "NeuZipFSDPStrategy": "nz_lightning.lightning.fsdp_strategy",
    "NeuZipStrategy": "nz_lightning.lightning.strategy",
    "compress": "nz_lightning.kernels",
    "compress_model": "nz_lightning.tensor.convert",
    "compressed_parameters": "nz_lightning.tensor.convert",
    "decompress_model": "nz_lightning.tensor.convert",
    "fused_optimizer": "nz_lightning.optim",
    "is_compressed": "nz_lightning.tensor.parameter",
    "load_compressed": "nz_lightning.formats.model_file",
    "save_compressed": "nz_lightning.formats.model_file",
}
__all__ = [
    "CODEC_STATS",
    "CompressedTensor",
    "FusedOptimizer",
    "ModelFileReport",
    "NZParameter",
    "NeuZipFSDPStrategy",
    "NeuZipStats",
    "NeuZipStrategy",
    "compress",
    "compress_model",
    "compressed_parameters",
    "decompress_model",
    "fused_optimizer",
    "is_compressed",
    "load_compressed",
    "save_compressed",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (keeps ``import nz_lightning`` free of Lightning)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nz_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if "lightning.pytorch" in sys.modules:
    # Lightning is already loaded: register the "neuzip" and "lomo" strategies now, so that
    # ``import lightning; import nz_lightning; Trainer(strategy="neuzip")`` works as it always has.
    importlib.import_module("nz_lightning.lightning.strategy")
