"""Reading checkpoint files without running code: ``torch.load(weights_only=True)`` with errors that say why."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator

__all__ = ["LIGHTNING_CKPT_ALIASES", "check_checkpoint_file", "refuse_pickled_objects"]


@contextlib.contextmanager
def refuse_pickled_objects(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn the failures of a ``torch.load(..., weights_only=True)`` of ``path`` inside the block into clear errors.

    Raises:
        ValueError: The file holds objects other than tensors and plain containers (unpickling them could run
            code), or it is not a readable checkpoint (empty, truncated, another format); the message names ``path``.
    """
    try:
        yield
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers, and unpickling "
            f"them could run code (checkpoints are read with torch.load(weights_only=True)): {err}"
        ) from err
    except (EOFError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable checkpoint file: {err}") from err


LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")
"""``ckpt_path`` values that Lightning resolves itself (not file names)."""


def check_checkpoint_file(path: str | os.PathLike[str]) -> None:
    """Check that ``path`` is a Lightning checkpoint readable without unpickling objects, before a run resumes.

    The file is memory-mapped, not read into memory. Lightning's aliases (``"last"``, ``"best"``, ...) pass.

    Raises:
        ValueError: Missing, empty, truncated or not a checkpoint (no ``state_dict``), or holding pickled objects;
            the message names ``path``.
    """
    import torch

    if str(path) in LIGHTNING_CKPT_ALIASES:
        return
    if not os.path.isfile(path):
        raise ValueError(f"ckpt_path {os.fspath(path)} is not a file")
    with refuse_pickled_objects(path):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{os.fspath(path)} is not a Lightning checkpoint (it has no 'state_dict')")
