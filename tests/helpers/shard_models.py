"""Small models and checksums shared by the torch-level FSDP workers (tests/distributed/worker_*.py)."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MlpBlock(nn.Module):
    """Pre-norm MLP block of width ``dim`` (hidden ``4 * dim``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


def digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the names and raw bytes of ``tensors`` (sorted by name): equal iff bit-identical."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
