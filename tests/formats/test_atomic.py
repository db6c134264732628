"""atomic_write: errors name the destination, stale temporary files of killed writers are cleaned up."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nz_lightning.formats import atomic
from nz_lightning.formats.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[2]


def test_rename_error_names_the_destination(tmp_path: Path) -> None:
    dst = tmp_path / "out.bin"
    dst.mkdir()
    (dst / "keep").write_bytes(b"x")  # os.replace(file, non-empty dir) fails
    with pytest.raises(OSError) as info:
        with atomic_write(dst) as f:
            f.write(b"data")
    assert info.value.filename == str(dst) and ".tmp" not in str(info.value)
    assert str(dst) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_write_error_names_the_destination_and_keeps_errno(tmp_path: Path) -> None:
    dst = tmp_path / "out.bin"
    with pytest.raises(OSError) as info:
        with atomic_write(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and str(dst) in str(info.value) and ".tmp" not in str(info.value)
    with pytest.raises(OSError, match=rf"writing {dst} failed: disk full"):
        with atomic_write(dst):
            raise OSError("disk full")
    with pytest.raises(FileNotFoundError) as missing:  # an error naming another file (a source) is left alone
        with atomic_write(dst):
            open(tmp_path / "absent.bin", "rb")
    assert missing.value.filename == str(tmp_path / "absent.bin")
    assert os.listdir(tmp_path) == []


_KILLED_WRITER = """
import sys, time
from nz_lightning.formats.atomic import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"half")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def _temporaries(directory: Path, name: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(f".{name}.") and n.endswith(".tmp"))


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    dst = tmp_path / "model.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(dst)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (stale,) = _temporaries(tmp_path, "model.ckpt")
    assert f"-{proc.pid}." in stale

    with atomic_write(dst) as f:  # a fresh file of a dead writer is kept (grace period)
        f.write(b"one")
    assert _temporaries(tmp_path, "model.ckpt") == [stale]

    _age(tmp_path / stale, atomic.DEAD_WRITER_GRACE_S + 60)
    live = f".model.ckpt.{atomic._HOST}-{os.getpid()}.{'a' * 12}.tmp"  # a live writer (this process), idle 1 h
    legacy_old, legacy_new = f".model.ckpt.{'b' * 12}.tmp", f".model.ckpt.{'c' * 12}.tmp"
    foreign = f".model.ckpt.{'0' * 8}-1.{'d' * 12}.tmp"  # another host's writer, idle 2 h
    other_dst = f".other.ckpt.{atomic._HOST}-{proc.pid}.{'e' * 12}.tmp"
    for name, age in [(live, 3600), (legacy_old, atomic.STALE_TMP_AGE_S + 60), (legacy_new, 3600)]:
        (tmp_path / name).write_bytes(b"x")
        _age(tmp_path / name, age)
    for name in (foreign, other_dst):
        (tmp_path / name).write_bytes(b"x")
        _age(tmp_path / name, 7200)

    with atomic_write(dst) as f:
        f.write(b"two")
    assert dst.read_bytes() == b"two"
    assert _temporaries(tmp_path, "model.ckpt") == sorted([live, legacy_new, foreign])
    assert (tmp_path / other_dst).exists()
