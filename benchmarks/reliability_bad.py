"""Bad inputs per entry point for ``benchmarks/reliability.py``: each case names the error type it expects."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> None:
    """Run the CLI in-process; raise ``SystemExit(rc)`` carrying its stderr if it fails."""
    from nz_lightning.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(args))
    if rc:
        raise SystemExit(f"exit {rc}: {err.getvalue().strip()[-300:]}")


def _train_ckpt(path: Path, work: Path) -> None:
    """``train.py`` resuming from ``path``; raise ``SystemExit`` with its last error line if it fails."""
    args = ["+strategy=neuzip", "trainer.max_steps=1", "trainer.limit_val_batches=0", "data.max_bytes=6000",
            "data.seq_len=64", "data.batch_size=4", "~callbacks.rich_progress_bar", "logger=none",
            f"hydra.run.dir={work}", f"ckpt_path={path}"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)  # fmt: skip
    if proc.returncode:
        lines = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln] or proc.stderr.splitlines()
        raise SystemExit(f"exit {proc.returncode}: {lines[-1][:300] if lines else ''}")


def cases(work: Path) -> list[tuple[str, str, Callable[[], Any]]]:
    """``(entry point and input, expected exception type, call)`` for every bad input."""
    import torch

    from nz_lightning.formats.model_file import load_compressed
    from nz_lightning.kernels import compress

    w = (torch.randn(64, 64) * 0.02).to(torch.bfloat16)
    ct = compress(w)
    empty, trunc, text = work / "empty.nzsf", work / "truncated.nzsf", work / "notes.txt"
    empty.write_bytes(b"")
    text.write_text("not a checkpoint\n")
    from nz_lightning.formats.model_file import save_compressed

    save_compressed(torch.nn.Linear(64, 64), work / "ok.nzsf")
    data = (work / "ok.nzsf").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    lin = torch.nn.Linear(64, 64)
    return [
        ("compress(int32 tensor)", "TypeError", lambda: compress(torch.zeros(8, dtype=torch.int32))),
        ("compress(float64 tensor)", "TypeError", lambda: compress(torch.zeros(8, dtype=torch.float64))),
        ("compress(complex64 tensor)", "TypeError", lambda: compress(torch.zeros(8, dtype=torch.complex64))),
        ("compress(list)", "TypeError", lambda: compress([1.0, 2.0])),  # type: ignore[arg-type]
        ("compress(bf16, mantissa_bits=7)", "ValueError", lambda: compress(w, mantissa_bits=7)),
        ("compress(bf16, mantissa_bits=-1)", "ValueError", lambda: compress(w, mantissa_bits=-1)),
        ("compress(bf16, mantissa_bits=3, block_size=48)", "ValueError",
         lambda: compress(w, mantissa_bits=3, block_size=48)),
        ("compress(bf16, mantissa_bits=3, block_size=0)", "ValueError",
         lambda: compress(w, mantissa_bits=3, block_size=0)),
        ("compress(prob_bits=20)", "ValueError", lambda: compress(w, prob_bits=20)),
        ("compress(steps_per_lane=0)", "ValueError", lambda: compress(w, steps_per_lane=0)),
        ("compress(backend='gpu')", "ValueError", lambda: compress(w, backend="gpu")),
        ("decompress(backend='gpu')", "ValueError", lambda: ct.decompress(backend="gpu")),
        ("decompress(out= wrong shape)", "ValueError", lambda: ct.decompress(out=torch.empty(32, 128, dtype=w.dtype))),
        ("decompress(out= wrong dtype)", "ValueError", lambda: ct.decompress(out=torch.empty(64, 64))),
        ("decompress(out= non-contiguous)", "ValueError",
         lambda: ct.decompress(out=torch.empty(64, 64, dtype=w.dtype).t())),
        ("CompressedTensor.from_bytes(b'')", "ValueError", lambda: type(ct).from_bytes(b"")),
        ("cli inspect <empty file>", "SystemExit", lambda: _cli("inspect", str(empty))),
        ("cli inspect <truncated NZSF>", "SystemExit", lambda: _cli("inspect", str(trunc))),
        ("cli decompress <truncated NZSF>", "SystemExit", lambda: _cli("decompress", str(trunc), str(work / "o"))),
        ("cli decompress <missing file>", "SystemExit",
         lambda: _cli("decompress", str(work / "nope"), str(work / "o"))),
        ("cli compress <text file>", "SystemExit", lambda: _cli("compress", str(text), str(work / "o.nzsf"))),
        ("load_compressed(<empty file>)", "ValueError", lambda: load_compressed(lin, empty)),
        ("load_compressed(<truncated NZSF>)", "ValueError", lambda: load_compressed(torch.nn.Linear(64, 64), trunc)),
        ("load_compressed(<text file>)", "ValueError", lambda: load_compressed(lin, text)),
        ("load_compressed(wrong model: Linear(4,4))", "ValueError",
         lambda: load_compressed(torch.nn.Linear(4, 4), work / "ok.nzsf")),
        ("train.py ckpt_path=<empty file>", "SystemExit", lambda: _train_ckpt(empty, work / "r1")),
        ("train.py ckpt_path=<text file>", "SystemExit", lambda: _train_ckpt(text, work / "r2")),
    ]  # fmt: skip


def bad_inputs(work: Path) -> list[dict[str, Any]]:
    """Run every case; record the expected and the actual exception type and message."""
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, expected, call in cases(work):
        try:
            call()
            got, message = "no error", ""
        except BaseException as e:  # noqa: BLE001 - recorded
            got, message = type(e).__name__, str(e)[:300]
        rows.append({"case": name, "expected": expected, "got": got, "message": message, "pass": got == expected})
        print(f"bad input {name}: {got}", flush=True)
    return rows
