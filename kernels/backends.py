"""Backend registry: one set of codec ops, implemented by a pure-torch reference, numba (CPU) and Triton."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Literal

import torch

BackendName = Literal["torch", "cpu", "triton"]
BACKENDS: tuple[str, ...] = ("torch", "cpu", "triton")
_MODULES = {"torch": ".reference", "cpu": ".cpu", "triton": ".triton_backend"}


def default_backend(device: torch.device) -> str:
    """The backend used when none is forced: Triton for CUDA tensors, numba for CPU, torch otherwise."""
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "cpu"
    return "torch"


def get_backend(name: str | None, device: torch.device) -> ModuleType:
    """Resolve a backend name (or None for the default) to its module, checking it can run on ``device``.

    Raises:
        ValueError: Unknown backend name, or a backend that cannot run on this device.
    """
    chosen = default_backend(device) if name is None else name
    if chosen not in _MODULES:
        raise ValueError(f"unknown backend {chosen!r}; choose one of {', '.join(BACKENDS)}")
    if chosen == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors only, got a tensor on {device}")
    if chosen == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend 'triton' needs a CUDA tensor (got {device}); on CPU it runs only under TRITON_INTERPRET=1"
        )
    return importlib.import_module(_MODULES[chosen], __package__)
