"""Importing bitsandbytes for the quantized baselines: a clear error when it is missing, and no clash with our codec.

bitsandbytes' CPU backend probes Hugging Face's ``kernels`` package at import time; from the repository root that
name finds this project's ``kernels/`` folder (see :func:`import_bitsandbytes`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

__all__ = ["INSTALL_HINT", "import_bitsandbytes"]

INSTALL_HINT = "pip install 'nz-lightning[qlora]' (or: pip install 'bitsandbytes>=0.49')"
"""How to install the optional dependency (named in every error about it)."""


def _our_codec_shadows_hub_kernels() -> bool:
    """Whether ``import kernels`` would give this project's codec sources (the repo-root ``kernels/`` folder, importable
    when the repository root is on ``sys.path``, or already imported under that name, e.g. by transformers' own probe
    for the hub package) instead of Hugging Face's ``kernels`` package."""
    ours = importlib.util.find_spec("nz_lightning.kernels")
    if ours is None or ours.origin is None:
        return False
    loaded = sys.modules.get("kernels")
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
    else:
        try:
            spec = importlib.util.find_spec("kernels")
        except (ImportError, ValueError):
            return False
        origin = None if spec is None else spec.origin
    return origin is not None and Path(origin).resolve() == Path(ours.origin).resolve()


class _DropRecords(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_INT8_CAST_NOTE = _DropRecords("MatMul8bitLt: inputs will be cast from")
"""LLM.int8 logs this on every eval-mode forward with bf16 / fp32 inputs (its int8 GEMM quantizes fp16 inputs):
expected with a bf16 compute dtype, so it is dropped (Lightning's plugin filters the same message)."""


@contextlib.contextmanager
def _hide_repo_kernels() -> Iterator[None]:
    """While bitsandbytes is imported, make ``import kernels`` fail when it would import our codec sources.

    bitsandbytes' CPU backend probes Hugging Face's ``kernels`` package (for a hub-downloaded GEMM) at import time on
    CPUs with AVX-512 BF16. From the repository root, that import finds this project's ``kernels/`` folder (the
    codec, installed as ``nz_lightning.kernels``) and would load a second copy of it under the wrong name, then log a
    misleading warning. Blocking the name for the duration of the import (and dropping that one log record) leaves
    bitsandbytes on its own CPU kernels, exactly as on a machine without the hub package.
    """
    if not _our_codec_shadows_hub_kernels():
        yield
        return
    loaded = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]  # makes `import kernels` raise ImportError
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    drop = _DropRecords("kernels-community")
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)
        if sys.modules.get("kernels", 0) is None:
            if loaded is None:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = loaded


def import_bitsandbytes() -> ModuleType:
    """Import ``bitsandbytes``, or fail naming the package and how to install it.

    Returns:
        The ``bitsandbytes`` module.

    Raises:
        ImportError: bitsandbytes is not installed (or its import fails; the cause is chained).
    """
    if sys.modules.get("bitsandbytes") is None and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"the bitsandbytes quantization baselines need the bitsandbytes package: {INSTALL_HINT}")
    try:
        with _hide_repo_kernels():
            import bitsandbytes
    except Exception as e:  # a broken install: name the package, chain the real error
        raise ImportError(f"bitsandbytes is installed but cannot be imported ({e!r}): {INSTALL_HINT}") from e
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if _INT8_CAST_NOTE not in log.filters:
        log.addFilter(_INT8_CAST_NOTE)
    return bitsandbytes
