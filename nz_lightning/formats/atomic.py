"""Atomic file writes: a temporary file in the destination's directory, fsync'd, then ``os.replace``'d.

The temporary file is ``.<name>.<host>-<pid>.<random>.tmp`` (``host``: 8 hex digits of the host name's CRC32).
A writer killed before its rename leaves it behind; the next write to the same destination removes such stale
files: those of a process of this host that is no longer running, once :data:`DEAD_WRITER_GRACE_S` old (the grace
covers a writer in another PID namespace of this host), and any (another host's, or an older naming) not modified
for :data:`STALE_TMP_AGE_S`. A concurrent writer's file is left alone: it is alive, or it is still being written.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import time
import zlib
from collections.abc import Iterator
from typing import BinaryIO

PathLike = str | os.PathLike

DEAD_WRITER_GRACE_S = 600.0
"""Seconds a temporary file of a dead writer on this host is kept (measured from its last modification)."""
STALE_TMP_AGE_S = 24 * 3600.0
"""Seconds after its last modification that any temporary file of the destination counts as abandoned."""

_HOST = f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFFFF:08x}"


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows); the rename is atomic anyway
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a writer's pid: treat as unknown
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(dst: PathLike, now: float | None = None) -> list[str]:
    """Remove temporary files that killed writers of ``dst`` left in its directory (see the module doc).

    Args:
        dst: The destination file.
        now: The current time (``time.time()`` by default).

    Returns:
        The paths removed.
    """
    path = os.path.abspath(os.fspath(dst))
    directory, name = os.path.split(path)
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:([0-9a-f]{{8}})-(\d+)\.)?[0-9a-f]{{12}}\.tmp")
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        host, pid = match.group(1), match.group(2)
        dead = host == _HOST and pid is not None and not _pid_alive(int(pid))
        if (dead and age > DEAD_WRITER_GRACE_S) or age > STALE_TMP_AGE_S:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed


def _naming(err: OSError, path: str) -> OSError:
    """``err`` reworded to name the destination ``path`` rather than the temporary file (same errno)."""
    if err.errno is not None:
        return OSError(err.errno, f"{err.strerror} (while writing {path})", path)
    return OSError(f"writing {path} failed: {err}")


@contextlib.contextmanager
def atomic_write(dst: PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``dst`` for binary writing; on success it replaces ``dst``.

    The temporary file (``.<name>.<host>-<pid>.<random>.tmp``) is flushed and fsynced before the rename, and the
    directory is fsynced after it. On any error the temporary file is removed and the exception re-raised, so an
    existing ``dst`` is left untouched; an ``OSError`` of the write or rename is re-raised naming ``dst`` (same
    ``errno``). Stale temporary files of earlier, killed writes to ``dst`` are removed first
    (:func:`remove_stale_temporaries`).
    """
    path = os.path.abspath(os.fspath(dst))
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{_HOST}-{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        remove_stale_temporaries(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename in (None, tmp):  # not, e.g., a read error naming a source
            raise _naming(err, path) from err
        raise
    _fsync_dir(directory)
