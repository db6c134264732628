"""nz_lightning.lm.memory: current and peak RSS, reset of the peak, and the benchmarks' wrappers over it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import common
from nz_lightning.lm import memory

linux_proc = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")


@linux_proc
def test_rss_and_peak_from_proc() -> None:
    current, peak = memory.current_rss_bytes(), memory.peak_rss_bytes()
    assert 0 < current <= peak
    assert current % 1024 == 0 and memory.proc_status_kib("VmRSS") is not None
    assert memory.proc_status_kib("NoSuchField") is None
    assert common.rss_kib() > 0 and common.rss_kib("VmHWM") * 1024 >= current
    with pytest.raises(RuntimeError, match="NoSuchField"):
        common.rss_kib("NoSuchField")


@linux_proc
def test_reset_lowers_the_peak_to_the_current_rss() -> None:
    block = bytearray(64 * 2**20)  # touch 64 MiB, then free it
    block[::4096] = b"\x01" * len(block[::4096])
    del block
    if not memory.reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    after = memory.peak_rss_bytes()
    assert after <= memory.current_rss_bytes() + 16 * 2**20
    common.reset_peak_rss()  # the benchmarks' name still works


def test_fallbacks_without_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_STATUS", tmp_path / "missing" / "status")
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    assert memory.proc_status_kib("VmRSS") is None
    assert memory.peak_rss_bytes() > 2**20  # ru_maxrss: at least this interpreter
    with pytest.raises(RuntimeError, match="VmRSS"):
        memory.current_rss_bytes()
    assert memory.reset_peak_rss() is False
    with pytest.raises(RuntimeError, match="clear_refs"):
        common.reset_peak_rss()
    with pytest.raises(RuntimeError, match="VmHWM"):
        common.rss_kib("VmHWM")


def test_ru_maxrss_units(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ru_maxrss is KiB on Linux and bytes on macOS."""

    class Usage:
        ru_maxrss = 5000

    monkeypatch.setattr(memory, "_STATUS", tmp_path / "missing")
    monkeypatch.setattr(memory.resource, "getrusage", lambda who: Usage())
    monkeypatch.setattr(sys, "platform", "linux")
    assert memory.peak_rss_bytes() == 5000 * 1024
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory.peak_rss_bytes() == 5000
