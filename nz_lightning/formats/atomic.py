"""Atomic file writes: a temporary file in the destination's directory, fsync'd, then ``os.replace``'d."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import BinaryIO

PathLike = str | os.PathLike


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows); the rename is atomic anyway
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(dst: PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``dst`` for binary writing; on success it replaces ``dst``.

    The temporary file (``.<name>.<random>.tmp``) is flushed and fsynced before the rename, and the directory is
    fsynced after it. On any error the temporary file is removed and the exception re-raised, so an existing
    ``dst`` is left untouched.
    """
    path = os.path.abspath(os.fspath(dst))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
