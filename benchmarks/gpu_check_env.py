"""Environment of the GPU check: run from a plain checkout, report versions and say clearly what is missing.

A GPU machine may have no network, so ``make setup`` (which installs torch from an index) cannot run there; its own
``python3`` (a CUDA build of torch, Triton, transformers, Lightning) runs the check straight from the checkout.
:func:`ensure_importable` then maps the top-level ``kernels/`` folder to ``nz_lightning.kernels``, as the editable
install does, so nothing needs installing.

Commands (run from the repository root):

* ``python -m benchmarks.gpu_check_env pytest [ARGS...]``: pytest with that mapping in place (``make test-gpu``).
* ``python -m benchmarks.gpu_check_env stage --result PATH [--dry-run]``: the ``env`` stage of
  ``benchmarks/gpu_check.py`` (versions, device, driver, what is missing) as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "[gpu-check]"
"""Children print their progress lines with this prefix; the driver echoes them live."""
NUMBA_MIN = (0, 68)


def ensure_importable() -> str:
    """Make ``nz_lightning`` (and its codec, ``nz_lightning.kernels``) importable from this checkout.

    Returns:
        ``"installed"`` when the package (editable or not) already provides ``nz_lightning.kernels``, else
        ``"checkout"`` after registering the checkout's ``kernels/`` folder under that name.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        found = importlib.util.find_spec("nz_lightning.kernels") is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return "installed"
    import nz_lightning

    spec = importlib.util.spec_from_file_location(
        "nz_lightning.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the codec from {ROOT / 'kernels'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nz_lightning.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["nz_lightning.kernels"]
        raise
    nz_lightning.kernels = module
    return "checkout"


def progress(stage: str, message: str) -> None:
    """Print one progress line of a stage (flushed, so the driver can echo it while the stage runs)."""
    print(f"{PREFIX} {stage}: {message}", flush=True)


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a stage's (possibly partial) result as JSON, atomically, so a killed stage leaves a readable file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)


def version(package: str) -> str | None:
    """The installed version of a distribution, or ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_tuple(text: str | None) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in (text or "").split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def driver_info() -> dict[str, Any]:
    """NVIDIA driver version and the CUDA version it supports (pynvml, else ``nvidia-smi``); empty without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            cuda = pynvml.nvmlSystemGetCudaDriverVersion()
            drv = pynvml.nvmlSystemGetDriverVersion()
            return {
                "driver": drv.decode() if isinstance(drv, bytes) else str(drv),
                "driver_cuda": f"{cuda // 1000}.{cuda % 1000 // 10}",
                "source": "pynvml",
            }
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any failure falls back to nvidia-smi
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    first = [f.strip() for f in out.splitlines()[0].split(",")] if out else []
    return {"driver": first[0] if first else None, "nvidia_smi": out, "source": "nvidia-smi"}


def describe(dry_run: bool) -> dict[str, Any]:
    """Versions, device and driver, how ``nz_lightning`` was found, and what a GPU run lacks.

    Args:
        dry_run: The check runs on the CPU on purpose (no CUDA device is expected, interpreted Triton is).

    Returns:
        A JSON-able dict; ``missing`` lists, in words, each thing a real (not dry) GPU run needs and lacks, and
        ``blocking`` is the part of it that stops every GPU stage (no CUDA torch or device, no Triton, the package
        not importable); ``ready`` is true when nothing is missing.
    """
    try:
        import torch
    except ImportError as err:
        why = f"torch is not importable with {sys.executable} ({err}): run the check with a Python that has torch"
        return {
            "python": platform.python_version(),
            "executable": sys.executable,
            "torch": None,
            "missing": [why],
            "blocking": [why],
            "notes": [],
            "ready": False,
        }

    missing: list[str] = []
    blocking: list[str] = []  # the subset of ``missing`` that stops every GPU stage
    notes: list[str] = []
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "versions": {
            p: version(p)
            for p in ("triton", "numba", "transformers", "lightning", "bitsandbytes", "pytest", "hypothesis", "numpy")
        },
    }
    try:
        info["nz_lightning_from"] = ensure_importable()
    except Exception as err:  # noqa: BLE001 - reported, not raised
        info["nz_lightning_from"] = None
        blocking.append(f"nz_lightning is not importable from {ROOT}: {type(err).__name__}: {err}")
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "count": torch.cuda.device_count(),
        }
    info.update(driver_info())
    vers = info["versions"]
    if not dry_run:
        if torch.version.cuda is None:
            blocking.append(
                f"torch {torch.__version__} is a CPU-only build: run the check with a CUDA build of torch (on the "
                "GPU machine, its own python3: `python3 benchmarks/gpu_check.py`)"
            )
        elif not info["cuda_available"]:
            blocking.append(
                f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: check the driver "
                f"(nvidia-smi) and CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"
            )
        if info["triton_interpret"] == "1":
            missing.append("TRITON_INTERPRET=1 is set: unset it so that the Triton kernels compile for the GPU")
    if vers["triton"] is None:
        blocking.append("triton is not installed: the codec's CUDA backend (and the dry run's interpreter) needs it")
    if vers["numba"] is None or _version_tuple(vers["numba"]) < NUMBA_MIN:
        missing.append(
            f"numba>=0.68 is needed (found {vers['numba']}): the GPU tests compare with the CPU backend's bytes"
        )
    for package in ("transformers", "lightning", "pytest"):
        if vers[package] is None:
            missing.append(f"{package} is not installed (the training stages and the test suite need it)")
    if vers["hypothesis"] is None:
        missing.append("hypothesis is not installed (tests/conftest.py imports it)")
    if vers["bitsandbytes"] is None:
        notes.append("bitsandbytes is not installed: its baseline tests are skipped")
    try:
        from benchmarks.common import machine_info

        info["machine"] = machine_info()
    except Exception as err:  # noqa: BLE001 - optional
        notes.append(f"machine_info failed: {type(err).__name__}: {err}")
    info["missing"], info["blocking"], info["notes"] = blocking + missing, blocking, notes
    info["ready"] = not info["missing"]
    return info


def _stage(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check_env stage")
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    info = describe(args.dry_run)
    info["ok"] = bool(info["ready"])
    if not info["ok"]:
        info["error"] = "missing: " + "; ".join(info["missing"])
    write_result(args.result, info)
    device = info.get("device", {}).get("name", "no CUDA device")
    progress("env", f"{device}; torch {info['torch']} (CUDA {info.get('torch_cuda')}); driver {info.get('driver')}")
    for line in info["missing"]:
        progress("env", f"MISSING: {line}")
    return 0 if info["ok"] else 1


class ResultLog:
    """pytest plugin: append each test's outcome to a JSON-lines file as it finishes (kept if the run is killed).

    Failures are also printed as progress lines. Enabled by the ``GPU_CHECK_TEST_LOG`` environment variable.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def pytest_runtest_logreport(self, report: Any) -> None:
        """Record the call phase of every test, and any setup or teardown phase that did not pass."""
        if report.when != "call" and report.outcome == "passed":
            return
        if report.when == "setup" and report.outcome == "skipped":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        else:
            reason = str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""
        entry = {"test": report.nodeid, "when": report.when, "outcome": report.outcome, "message": reason}
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if report.outcome == "failed":
            progress("pytest", f"FAILED {report.nodeid} ({report.when}): {reason}")


def _pytest(argv: list[str]) -> int:
    ensure_importable()
    import pytest

    log = os.environ.get("GPU_CHECK_TEST_LOG")
    return int(pytest.main(argv, plugins=[ResultLog(Path(log))] if log else []))


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``pytest ARGS...`` or ``stage ...`` (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "pytest":
        return _pytest(args[1:])
    if args and args[0] == "stage":
        return _stage(args[1:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
