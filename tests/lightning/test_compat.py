"""Lightning drift: every private Lightning name the layer uses exists, and Lightning is inside the tested range.

The names are listed in ``nz_lightning/lightning/compat.py``. A failure here means the installed Lightning changed
what nz_lightning relies on: read the message, compare the Lightning source with compat.py's docstring, then fix
the use or the pin (``pyproject.toml`` and ``compat.LIGHTNING_TESTED`` together).
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from nz_lightning.lightning import compat

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "nz_lightning" / "lightning"
DRIFT = (
    "Lightning drifted: check the private names listed in nz_lightning/lightning/compat.py against the installed "
    "Lightning source, fix their uses, then update pyproject.toml's lightning pin and compat.LIGHTNING_TESTED"
)


def _pinned_lightning() -> SpecifierSet:
    """The ``lightning`` specifier of ``[project] dependencies`` in pyproject.toml."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = [Requirement(dep).specifier for dep in project["dependencies"] if Requirement(dep).name == "lightning"]
    assert len(specs) == 1, f"pyproject.toml should list lightning once in [project] dependencies, found {len(specs)}"
    return specs[0]


def test_tested_range_matches_pyproject() -> None:
    pinned = _pinned_lightning()
    assert SpecifierSet(compat.LIGHTNING_TESTED) == pinned, (
        f"compat.LIGHTNING_TESTED ({compat.LIGHTNING_TESTED}) differs from pyproject.toml's pin (lightning{pinned}): "
        "change both together, after checking the private names"
    )


def test_installed_lightning_in_tested_range() -> None:
    installed = metadata.version("lightning")
    pinned = _pinned_lightning()
    assert pinned.contains(Version(installed), prereleases=True), (
        f"installed lightning {installed} is outside the tested range lightning{pinned}. {DRIFT}"
    )
    assert compat.lightning_version() == installed


@pytest.mark.parametrize(("module", "name"), compat.PRIVATE_SYMBOLS, ids=lambda v: str(v))
def test_private_symbol_exists(module: str, name: str) -> None:
    version = metadata.version("lightning")
    found = importlib.import_module(module)
    assert hasattr(found, name), f"lightning {version} has no {module}.{name}. {DRIFT}"
    assert getattr(compat, name) is getattr(found, name)


def test_private_symbols_all_listed() -> None:
    """Every private Lightning name that compat.py imports is in PRIVATE_SYMBOLS, and the other way round."""
    imported = {
        (node.module, alias.name)
        for node in ast.walk(ast.parse((LAYER / "compat.py").read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning")
        for alias in node.names
        if alias.name.startswith("_")
    }
    assert imported == set(compat.PRIVATE_SYMBOLS)
    assert set(compat.missing_symbols()) == set()


def test_layer_imports_private_lightning_names_from_compat_only() -> None:
    """The other Lightning-layer modules import no private name from Lightning directly."""
    direct = [
        f"{path.name}: from {node.module} import {alias.name}"
        for path in sorted(LAYER.glob("*.py"))
        if path.name != "compat.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("lightning", "pytorch_lightning")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert direct == [], "import these from nz_lightning.lightning.compat (and list them there)"


def _instances() -> dict[tuple[str, str], Callable[[], Any]]:
    """A builder of an object of each class in PRIVATE_ATTRIBUTES (a class for class-level attributes)."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    def optimizer() -> LightningOptimizer:
        return LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))

    return {
        ("lightning.pytorch.core.module", "LightningModule"): LightningModule,
        ("lightning.pytorch.strategies.parallel", "ParallelStrategy"): DDPStrategy,
        ("lightning.pytorch.strategies.strategy", "Strategy"): lambda: SingleDeviceStrategy("cpu"),
        ("lightning.pytorch.core.optimizer", "LightningOptimizer"): optimizer,
        ("lightning.pytorch.plugins.io.wrapper", "_WrappingCheckpointIO"): lambda: compat._WrappingCheckpointIO,
    }


def test_private_attributes_have_builders() -> None:
    assert {(m, c) for m, c, _ in compat.PRIVATE_ATTRIBUTES} == set(_instances())


@pytest.mark.parametrize(("module", "cls", "attr"), compat.PRIVATE_ATTRIBUTES, ids=lambda v: str(v))
def test_private_attribute_exists(module: str, cls: str, attr: str) -> None:
    version = metadata.version("lightning")
    kind = getattr(importlib.import_module(module), cls, None)
    assert isinstance(kind, type), f"lightning {version} has no class {module}.{cls}. {DRIFT}"
    obj = _instances()[(module, cls)]()
    assert isinstance(obj, kind) or obj is kind
    assert hasattr(obj, attr), f"lightning {version}: {cls} objects have no attribute {attr!r}. {DRIFT}"


def test_wrapping_checkpoint_io_setter() -> None:
    """``ReplicaStrategy`` sets ``checkpoint_io`` on a wrapper plugin: it must stay a settable property."""
    prop = vars(compat._WrappingCheckpointIO).get("checkpoint_io")
    assert isinstance(prop, property) and prop.fset is not None, (
        f"lightning {metadata.version('lightning')}: _WrappingCheckpointIO.checkpoint_io is no longer a settable "
        f"property. {DRIFT}"
    )


def test_drift_message_names_symbol_version_and_range() -> None:
    message = compat.drift_message(["lightning.pytorch.trainer.call._call_callback_hooks"])
    assert "_call_callback_hooks" in message
    assert metadata.version("lightning") in message
    assert compat.LIGHTNING_TESTED in message


def test_missing_symbol_raises_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Lightning without one of the symbols: importing compat fails with an ImportError naming it."""
    import lightning.pytorch.trainer.call as call

    monkeypatch.delattr(call, "_call_callback_hooks")
    monkeypatch.delitem(sys.modules, "nz_lightning.lightning.compat")
    with pytest.raises(ImportError) as raised:
        importlib.import_module("nz_lightning.lightning.compat")
    message = str(raised.value)
    assert "lightning.pytorch.trainer.call._call_callback_hooks" in message
    assert metadata.version("lightning") in message and compat.LIGHTNING_TESTED in message
