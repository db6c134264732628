"""Helpers shared by the benchmarks: machine description, markdown block replacement, RSS probes (over
:mod:`nz_lightning.lm.memory`)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from nz_lightning.lm import memory


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, load, library versions, date, git commit and GPU name (if any)."""
    model, flags = "unknown", ""
    family_model: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value
            elif key.strip() in ("cpu family", "model") and key.strip() not in family_model:
                family_model[key.strip()] = value.strip()
    except OSError:
        model = platform.processor() or "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni")
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {
        "cpu_model": model,
        "cpu_family_model": f"{family_model.get('cpu family', '?')}/{family_model.get('model', '?')}",
        "cpu_flags": [f for f in wanted if f in flags.split()],
        "hypervisor": "hypervisor" in flags.split(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "load_avg_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": _version("numba"),
        "zipnn": _version("zipnn"),
        "transformers": _version("transformers"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": commit,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_line(m: dict[str, Any]) -> str:
    """One markdown line naming the machine a result came from."""
    return (
        f"Machine: {m['cpu_model']} (family/model {m['cpu_family_model']}, {m['usable_cores']} usable of "
        f"{m['logical_cores']} logical cores; {', '.join(m['cpu_flags']) or 'no AVX flags'}), "
        f"{m.get('memory_gib', '?')} GiB, Python {m['python']}, torch {m['torch']}, GPU: {m['gpu'] or 'none'}."
    )


def write_markdown_block(path: Path, block: str, begin: str, end: str) -> None:
    """Replace the text between ``begin`` and ``end`` markers in ``path`` (creating file or markers if absent).

    ``block`` must start with ``begin`` and end with ``end``.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    i, j = text.find(begin), text.find(end)
    if i != -1 and j > i:
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_results(result: dict[str, Any], out: Path, md: Path, block: str, begin: str, end: str) -> None:
    """Write ``result`` as JSON to ``out``, put ``block`` between the markers in ``md``, and print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    write_markdown_block(md, block, begin, end)
    print(block)


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (:func:`nz_lightning.lm.memory.reset_peak_rss`).

    Raises:
        RuntimeError: The kernel does not allow it (no writable ``/proc/self/clear_refs``): a peak measured after
            this call would include earlier peaks.
    """
    if not memory.reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS: /proc/self/clear_refs is missing or not writable")


def rss_kib(field: str = "VmRSS") -> int:
    """A memory field of ``/proc/self/status`` in KiB (``VmRSS`` or ``VmHWM``; :mod:`nz_lightning.lm.memory`).

    Raises:
        RuntimeError: ``/proc/self/status`` or the field is missing.
    """
    kib = memory.proc_status_kib(field)
    if kib is None:
        raise RuntimeError(f"{field} not found in /proc/self/status")
    return kib
