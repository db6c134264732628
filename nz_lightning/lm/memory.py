"""Resident memory of this process: current and peak RSS, and a reset of the peak (Linux ``/proc``).

The one place that reads these figures: the run summaries of ``train.py`` (:mod:`nz_lightning.lm.run`) and the
benchmarks (``benchmarks/common.py`` wraps these functions under its old names ``rss_kib`` / ``reset_peak_rss``).

* Current RSS is ``VmRSS`` of ``/proc/self/status`` (Linux only).
* Peak RSS is ``VmHWM`` (the high-water mark, which :func:`reset_peak_rss` can lower); where ``/proc`` is missing,
  ``getrusage``'s ``ru_maxrss`` (the lifetime peak, which cannot be reset).
* :func:`reset_peak_rss` writes ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), which sets ``VmHWM`` to the
  current RSS, so that a later :func:`peak_rss_bytes` measures the peak of what ran in between.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

__all__ = ["current_rss_bytes", "peak_rss_bytes", "proc_status_kib", "reset_peak_rss"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def proc_status_kib(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` in KiB.

    Args:
        field: The field name without the colon, e.g. ``VmRSS``, ``VmHWM``, ``VmSwap``.

    Returns:
        The value in KiB, or None where ``/proc/self/status`` or the field is missing (not Linux).
    """
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def current_rss_bytes() -> int:
    """The resident set size of this process now (``VmRSS``).

    Raises:
        RuntimeError: ``/proc/self/status`` is not available (not Linux).
    """
    kib = proc_status_kib("VmRSS")
    if kib is None:
        raise RuntimeError("the current RSS needs /proc/self/status (VmRSS), which this system lacks")
    return kib * 1024


def peak_rss_bytes() -> int:
    """The peak resident set size of this process.

    Returns:
        ``VmHWM`` in bytes (the peak since the start or since the last :func:`reset_peak_rss`); where ``/proc`` is
        missing, ``ru_maxrss`` (the lifetime peak; KiB on Linux, bytes on macOS).
    """
    kib = proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak_rss() -> bool:
    """Lower the peak RSS (``VmHWM``) to the current RSS, where the kernel allows it.

    Returns:
        True when the peak was reset; False where ``/proc/self/clear_refs`` is missing or not writable (not Linux,
        or a restricted container): then :func:`peak_rss_bytes` keeps reporting the earlier peak.
    """
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True
