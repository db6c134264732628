"""No code path unpickles a user-supplied file: a source scan, and a hostile pickle fed to every file entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nz_lightning.formats.model_file import load_compressed
from nz_lightning.tensor.convert import compress_model

ROOT = Path(__file__).resolve().parents[2]
INTERNAL_PICKLES = {"kernels/triton_compile.py"}  # exchanges work with its own compile worker processes, not files


class RunsCode:
    """Unpickling this creates a marker file: stands for any code a hostile file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def _unsafe_loads(tree: ast.AST) -> list[int]:
    """Lines of ``torch.load`` calls without ``weights_only=True``, ``pickle.load(s)`` calls, and loads asked for
    with ``weights_only=False``."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = node.func.attr
        flags = {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}
        if (owner, name) == ("torch", "load") and flags.get("weights_only") is not True:
            lines.append(node.lineno)
        elif owner == "pickle" and name in ("load", "loads"):
            lines.append(node.lineno)
        elif "load" in name and flags.get("weights_only") is False:
            lines.append(node.lineno)
    return lines


def test_no_unsafe_load_in_the_sources() -> None:
    """Every ``torch.load`` reads with ``weights_only=True``; nothing else unpickles (but the compile workers)."""
    offenders = []
    for path in [*ROOT.glob("kernels/*.py"), *ROOT.glob("nz_lightning/**/*.py"), ROOT / "train.py"]:
        rel = path.relative_to(ROOT).as_posix()
        if rel not in INTERNAL_PICKLES:
            offenders += [f"{rel}:{line}" for line in _unsafe_loads(ast.parse(path.read_text()))]
    assert not offenders, offenders
    assert _unsafe_loads(ast.parse("torch.load(f)\npickle.loads(b)\nx.load_checkpoint(p, weights_only=False)")) == [
        1,
        2,
        3,
    ]


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"weight": torch.zeros(4, 4), "payload": RunsCode(marker)}, path)
    return path, marker


def test_load_compressed_refuses_a_pickle(hostile: tuple[Path, Path]) -> None:
    path, marker = hostile
    with pytest.raises(ValueError):
        load_compressed(nn.Linear(4, 4), path)
    assert not marker.exists()


def test_compress_model_weights_refuses_a_pickle(hostile: tuple[Path, Path]) -> None:
    path, marker = hostile
    with pytest.raises(ValueError, match="not a readable safetensors file.*never from pickles"):
        compress_model(nn.Linear(4, 4, device="meta"), weights=str(path))
    assert not marker.exists()


@pytest.mark.parametrize("command", ["inspect", "compress", "decompress"])
def test_cli_refuses_a_pickle(hostile: tuple[Path, Path], command: str, tmp_path: Path) -> None:
    path, marker = hostile
    args = [str(path)] if command == "inspect" else [str(path), str(tmp_path / "out.bin")]
    cli = "from nz_lightning.cli import main; raise SystemExit(main())"
    done = subprocess.run([sys.executable, "-c", cli, command, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("nz-lightning: error:") and "Traceback" not in done.stderr
    assert not marker.exists()


def test_resume_checks_the_checkpoint_file(hostile: tuple[Path, Path], tmp_path: Path) -> None:
    """``train.py ckpt_path=...`` (any strategy) names a bad file clearly instead of a KeyError or bare EOFError."""
    from nz_lightning.formats.safe_load import check_checkpoint_file

    path, marker = hostile
    with pytest.raises(ValueError, match="refusing to load"):
        check_checkpoint_file(path)
    assert not marker.exists()
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.ckpt is not a readable checkpoint"):
        check_checkpoint_file(empty)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        check_checkpoint_file(plain)
    with pytest.raises(ValueError, match="is not a file"):
        check_checkpoint_file(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 1}, tmp_path / "ok.ckpt")
    check_checkpoint_file(tmp_path / "ok.ckpt")
    check_checkpoint_file("last")
