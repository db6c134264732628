"""Reading checkpoint files without running code: ``torch.load(weights_only=True)`` with errors that say why."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator

__all__ = ["refuse_pickled_objects"]


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
