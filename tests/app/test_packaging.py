"""Packaging: the codec installs as ``nz_lightning.kernels`` only, side by side with Hugging Face's ``kernels``.

Hugging Face publishes a PyPI package whose import name is exactly ``kernels``. The codec's source is the top-level
``kernels/`` folder, mapped to ``nz_lightning.kernels`` by pyproject's package-dir; before that mapping, installing
their package overwrote our ``kernels/__init__.py`` and ``kernels/backends.py`` and uninstalling it deleted them.
These tests build our wheel and a stand-in for theirs, install both in both orders in a throwaway venv and check
that each package stays importable and byte-identical to its RECORD. They also check that the lazy public API does
not import Lightning and that ``nz_lightning/kernels.pyi`` (mypy's view of the codec) matches its ``__all__``.

Offline: the wheels are built from local files (``--no-build-isolation``) and installed with ``--no-index
--no-deps``; the throwaway venv borrows the test venv's packages (torch...) through a ``.pth`` file.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LIGHTNING_MODULES = ("lightning", "pytorch_lightning", "lightning_fabric")
FAKE_MARKER = "hugging-face-kernels-stand-in"
# Entries of the test venv's site-packages that the throwaway venv does not see (the packages under test).
SHADOWED = ("nz_lightning", "__editable__", "kernels", "__pycache__")

# Hugging Face's package, as far as the collision goes: a top-level ``kernels`` package with the two file names that
# used to collide with the codec's, and a ``kernels`` console script.
FAKE_KERNELS = {
    "kernels/__init__.py": (
        '"""Stand-in for Hugging Face\'s ``kernels`` (tests/app/test_packaging.py)."""\n\n'
        "from kernels.backends import BACKENDS_MARKER\n\n"
        f"MARKER = {FAKE_MARKER!r}\n"
        '__all__ = ["BACKENDS_MARKER", "MARKER", "get_kernel"]\n\n\n'
        "def get_kernel(repo_id: str) -> None:\n"
        "    raise NotImplementedError(repo_id)\n"
    ),
    "kernels/backends.py": f"BACKENDS_MARKER = {FAKE_MARKER + '/backends'!r}\n",
    "kernels/cli.py": "def main() -> int:\n    return 0\n",
}

# Run by the throwaway venv's interpreter (``-I``: no current directory or PYTHONPATH on sys.path): what it can
# import, from where, and whether the installed files still match their RECORDs. Prints one JSON object.
PROBE = r"""
import base64, hashlib, json, sys
from importlib import metadata
from pathlib import Path

site, with_codec = sys.argv[1], sys.argv[2] == "codec"
out = {}


def record(name):
    dists = list(metadata.distributions(name=name, path=[site]))
    if not dists:
        return None
    files, bad = [], []
    for f in dists[0].files or []:
        files.append(f.as_posix())
        if f.hash is None:
            continue
        path = Path(f.locate())
        if not path.is_file():
            bad.append(f"{f.as_posix()}: missing")
            continue
        digest = hashlib.new(f.hash.mode, path.read_bytes()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != f.hash.value:
            bad.append(f"{f.as_posix()}: changed")
    return {"files": files, "bad": bad}


try:
    import nz_lightning
except ImportError as err:
    out["nz"] = {"error": repr(err)}
else:
    out["nz"] = {"file": nz_lightning.__file__}
    if with_codec:  # imports torch: the slow part
        import torch

        import nz_lightning.kernels as codec

        out["nz"]["codec_file"] = codec.__file__

        g = torch.Generator().manual_seed(0)
        t = (torch.randn(64, 64, generator=g) * 0.02).to(torch.bfloat16)
        t[0, :4] = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan")])
        c = codec.compress(t, backend="torch")
        back = c.decompress(backend="torch")
        out["nz"]["rans"] = c.mode == codec.MODE_RANS
        out["nz"]["roundtrip"] = (
            back.dtype == t.dtype and back.shape == t.shape and torch.equal(back.view(torch.int16), t.view(torch.int16))
        )
try:
    import kernels
    import kernels.backends
except ImportError as err:
    out["kernels"] = {"error": repr(err)}
else:
    out["kernels"] = {
        "file": kernels.__file__,
        "marker": getattr(kernels, "MARKER", None),
        "backends_marker": getattr(kernels.backends, "BACKENDS_MARKER", None),
    }
top = metadata.packages_distributions()
out["packages_distributions"] = {k: top.get(k) for k in ("kernels", "nz_lightning")}
out["records"] = {name: record(name) for name in ("nz-lightning", "kernels")}
print(json.dumps(out))
"""


def _sha256(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_wheel(out_dir: Path, name: str, version: str, files: dict[str, str], entry_points: str) -> Path:
    """Write a pure-Python wheel by hand (PEP 427: files, METADATA, WHEEL, top_level.txt, RECORD)."""
    info = f"{name}-{version}.dist-info"
    contents = {path: text.encode() for path, text in files.items()}
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: nz-lightning-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    contents[f"{info}/top_level.txt"] = "".join(f"{top}\n" for top in sorted({p.split("/")[0] for p in files})).encode()
    contents[f"{info}/entry_points.txt"] = entry_points.encode()
    record = "".join(f"{path},{_sha256(data)},{len(data)}\n" for path, data in contents.items())
    contents[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    wheel = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in contents.items():
            zf.writestr(path, data)
    return wheel


@dataclass(frozen=True)
class Wheels:
    """The two wheels under test."""

    nz_lightning: Path
    kernels: Path


def _need_build_tools() -> None:
    """Skip (with the fix) where the offline build or the cross-venv install cannot run."""
    try:
        pip = Version(metadata.version("pip"))
        setuptools = Version(metadata.version("setuptools"))
    except metadata.PackageNotFoundError as err:
        pytest.skip(f"needs pip>=22.3 and setuptools>=77 in the test venv (missing {err.name})")
    if pip < Version("22.3") or setuptools < Version("77"):
        pytest.skip(f"needs pip>=22.3 (--python) and setuptools>=77 (offline build), have {pip} / {setuptools}")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheels:
    """Our wheel, built offline from a copy of the sources (no build/ or egg-info in the checkout), and the fake."""
    _need_build_tools()
    base = tmp_path_factory.mktemp("wheels")
    src = base / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc", "*.egg-info")
    for folder in ("kernels", "nz_lightning"):
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = base / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, src],
        capture_output=True,
        text=True,
        env=_pip_env(),
    )
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    (ours,) = out.glob("nz_lightning-*.whl")
    fake = _write_wheel(base, "kernels", "0.10.0", FAKE_KERNELS, "[console_scripts]\nkernels = kernels.cli:main\n")
    return Wheels(ours, fake)


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_NO_CACHE_DIR": "1"}


class Venv:
    """A throwaway venv (no pip of its own) that sees the test venv's packages, except nz-lightning and kernels.

    Its site-packages holds a ``.pth`` naming a folder of links to the test venv's site-packages entries (torch,
    numba...). nz-lightning's editable install, its ``.pth`` files and any ``kernels`` are left out, so pip never sees
    an nz-lightning or kernels installed outside this venv and every import of them comes from this venv.
    """

    def __init__(self, root: Path) -> None:
        self.tmp = root
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
        bindir = "Scripts" if os.name == "nt" else "bin"
        self.python = root / "venv" / bindir / ("python.exe" if os.name == "nt" else "python")
        self.site = Path(self._run("-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()).resolve()
        shared = root / "shared-site-packages"
        shared.mkdir()
        for outer in dict.fromkeys(Path(sysconfig.get_path(key)) for key in ("purelib", "platlib")):
            for entry in outer.iterdir():
                name = entry.name.lower()
                if entry.suffix == ".pth" or name.startswith(SHADOWED):
                    continue
                if not (shared / entry.name).exists():
                    (shared / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        (self.site / "test-venv-packages.pth").write_text(f"{shared}\n")
        (root / "probe.py").write_text(PROBE)

    def _run(self, *args: str | Path, env: dict[str, str] | None = None) -> str:
        done = subprocess.run([self.python, "-I", *args], capture_output=True, text=True, cwd=self.tmp, env=env)
        assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def pip(self, *args: str | Path) -> None:
        """Run the test venv's pip on this venv (``pip --python``), offline."""
        cmd = [sys.executable, "-m", "pip", "--python", self.python, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.tmp, env=_pip_env())
        assert done.returncode == 0, f"pip {' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"

    def install(self, wheel: Path) -> None:
        self.pip("install", "--no-deps", "--no-index", wheel)

    def uninstall(self, name: str) -> None:
        self.pip("uninstall", "-y", name)

    def probe(self, codec: bool) -> dict[str, Any]:
        """What this venv imports (see PROBE); ``codec``: also import the codec and round-trip a bf16 tensor.

        numba's cache goes outside site-packages, so that uninstalling leaves no folder behind.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["NUMBA_CACHE_DIR"] = str(self.tmp / "numba-cache")
        out = self._run(self.tmp / "probe.py", self.site, "codec" if codec else "-", env=env)
        result: dict[str, Any] = json.loads(out)
        return result


@pytest.fixture
def venv(tmp_path: Path) -> Venv:
    return Venv(tmp_path)


def _assert_nz(state: dict[str, Any], venv: Venv, codec: bool = True) -> None:
    nz = state["nz"]
    assert "error" not in nz, f"nz_lightning does not import: {nz['error']}"
    assert Path(nz["file"]).resolve() == venv.site / "nz_lightning" / "__init__.py", f"imported {nz['file']}"
    if codec:
        assert Path(nz["codec_file"]).resolve() == venv.site / "nz_lightning" / "kernels" / "__init__.py"
        assert nz["rans"], "the test tensor was not rANS-coded"
        assert nz["roundtrip"], "compress/decompress of a bf16 tensor is not bit-exact in the installed package"
    rec = state["records"]["nz-lightning"]
    assert rec is not None and rec["bad"] == [], f"nz-lightning's installed files differ from its RECORD: {rec}"
    assert not [f for f in rec["files"] if f.split("/")[0] == "kernels"], "nz-lightning installed a top-level kernels"
    assert {"nz_lightning/kernels/__init__.py", "nz_lightning/kernels/backends.py"} <= set(rec["files"])
    assert state["packages_distributions"]["nz_lightning"] == ["nz-lightning"]


def _assert_kernels(state: dict[str, Any], venv: Venv) -> None:
    hf = state["kernels"]
    assert "error" not in hf, f"the kernels package does not import: {hf['error']}"
    assert Path(hf["file"]).resolve() == venv.site / "kernels" / "__init__.py"
    assert (hf["marker"], hf["backends_marker"]) == (FAKE_MARKER, FAKE_MARKER + "/backends")
    owners = state["packages_distributions"]["kernels"]
    assert owners == ["kernels"], f"the import name kernels belongs to the distributions {owners}"
    rec = state["records"]["kernels"]
    assert rec is not None and rec["bad"] == [], f"kernels' installed files differ from its RECORD: {rec}"


def _assert_no_nz(state: dict[str, Any]) -> None:
    assert "ModuleNotFoundError" in state["nz"].get("error", ""), f"nz_lightning still imports: {state['nz']}"
    assert state["records"]["nz-lightning"] is None
    assert state["packages_distributions"]["nz_lightning"] is None


def _assert_no_kernels(state: dict[str, Any]) -> None:
    assert "ModuleNotFoundError" in state["kernels"].get("error", ""), f"kernels imports: {state['kernels']}"
    assert state["records"]["kernels"] is None
    assert state["packages_distributions"]["kernels"] is None


def test_wheel_installs_nothing_top_level_but_nz_lightning(wheels: Wheels) -> None:
    with zipfile.ZipFile(wheels.nz_lightning) as zf:
        names = zf.namelist()
        info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        record = zf.read(f"{info}/RECORD").decode().splitlines()
        top_level = zf.read(f"{info}/top_level.txt").decode().split() if f"{info}/top_level.txt" in names else None
    assert {n.split("/")[0] for n in names} == {"nz_lightning", info}
    assert {line.split(",")[0].split("/")[0] for line in record if line} == {"nz_lightning", info}
    assert {"nz_lightning/kernels/__init__.py", "nz_lightning/kernels/backends.py"} <= set(names)
    assert top_level in (None, ["nz_lightning"]), f"top_level.txt names {top_level}"


def test_hf_kernels_installed_after_nz_lightning(wheels: Wheels, venv: Venv) -> None:
    venv.install(wheels.nz_lightning)
    state = venv.probe(codec=False)
    _assert_nz(state, venv, codec=False)
    _assert_no_kernels(state)  # nothing importable as a top-level ``kernels``

    venv.install(wheels.kernels)
    state = venv.probe(codec=True)
    _assert_nz(state, venv)
    _assert_kernels(state, venv)

    venv.uninstall("kernels")
    state = venv.probe(codec=True)
    _assert_nz(state, venv)
    _assert_no_kernels(state)


def test_nz_lightning_installed_after_hf_kernels(wheels: Wheels, venv: Venv) -> None:
    venv.install(wheels.kernels)
    state = venv.probe(codec=False)
    _assert_kernels(state, venv)
    _assert_no_nz(state)  # not even from the checkout through the test venv's editable install

    venv.install(wheels.nz_lightning)
    state = venv.probe(codec=True)
    _assert_nz(state, venv)
    _assert_kernels(state, venv)

    venv.uninstall("nz-lightning")
    state = venv.probe(codec=False)
    _assert_kernels(state, venv)
    _assert_no_nz(state)


def _python(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the test venv's Python in ``cwd``, outside the checkout (its source ``kernels/`` is not on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done


def _is_lightning(module: str) -> bool:
    return module.split(".")[0] in LIGHTNING_MODULES


def test_compress_import_loads_no_lightning(tmp_path: Path) -> None:
    """``-X importtime`` reports no Lightning module, nor does ``sys.modules`` afterwards.

    ``-X importtime`` logs ``import`` statements but not ``importlib.import_module`` calls (the lazy API's), hence
    the second check.
    """
    code = "from nz_lightning import compress; import json, sys; print(json.dumps(sorted(sys.modules)))"
    done = _python(tmp_path, "-X", "importtime", "-c", code)
    timed = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    readable = {"nz_lightning", "torch"} <= set(timed) and any(m.startswith("nz_lightning.kernels.") for m in timed)
    assert readable, f"unexpected -X importtime report: {timed[:20]}"
    assert [m for m in timed if _is_lightning(m)] == []
    loaded = json.loads(done.stdout)
    assert "nz_lightning.kernels" in loaded
    assert [m for m in loaded if _is_lightning(m)] == []


def test_import_nz_lightning_alone_then_nz_lightning_lightning(tmp_path: Path) -> None:
    """``import nz_lightning`` alone loads no Lightning; ``import nz_lightning.lightning`` then registers strategies.

    One interpreter for both (Lightning's import is the slow part): Lightning is not loaded when ``nz_lightning``
    is imported, so the registration comes from ``nz_lightning.lightning``.
    """
    code = (
        "import json, sys, nz_lightning\n"
        "alone = sorted(sys.modules)\n"
        "import nz_lightning.lightning\n"
        "from lightning.pytorch.strategies import StrategyRegistry as R\n"
        "print(json.dumps([alone, 'neuzip' in R, 'lomo' in R]))\n"
    )
    alone, neuzip, lomo = json.loads(_python(tmp_path, "-c", code).stdout)
    assert "nz_lightning" in alone
    assert [m for m in alone if _is_lightning(m)] == []
    assert (neuzip, lomo) == (True, True)


def test_strategies_registered_when_lightning_imported_first(tmp_path: Path) -> None:
    """``import lightning.pytorch; import nz_lightning`` registers "neuzip" and "lomo" (nz_lightning/__init__.py)."""
    code = (
        "import json, lightning.pytorch\n"
        "from lightning.pytorch.strategies import StrategyRegistry as R\n"
        "before = 'neuzip' in R\n"
        "import nz_lightning\n"
        "print(json.dumps([before, 'neuzip' in R, 'lomo' in R]))\n"
    )
    assert json.loads(_python(tmp_path, "-c", code).stdout) == [False, True, True]


def test_kernels_stub_matches_all() -> None:
    """``nz_lightning/kernels.pyi`` re-exports exactly ``kernels/__init__.py``'s ``__all__`` (``X as X``)."""
    import nz_lightning.kernels

    source = ast.parse((ROOT / "kernels" / "__init__.py").read_text(encoding="utf-8"))
    (declared,) = [
        ast.literal_eval(node.value)
        for node in ast.walk(source)  # (inside the branch that runs when imported as nz_lightning.kernels)
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["__all__"]
    ]
    assert list(nz_lightning.kernels.__all__) == declared
    tree = ast.parse((ROOT / "nz_lightning" / "kernels.pyi").read_text(encoding="utf-8"))
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert node.module == "kernels" and node.level == 0, ast.unparse(node)
            for alias in node.names:
                assert alias.asname == alias.name, f"{ast.unparse(node)}: write `{alias.name} as {alias.name}`"
                names.append(alias.name)
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            raise AssertionError(f"unexpected statement in kernels.pyi: {ast.unparse(node)}")
    assert len(names) == len(set(names)), "kernels.pyi imports a name twice"
    assert sorted(names) == sorted(declared), "make nz_lightning/kernels.pyi import exactly kernels.__all__"


def test_repo_kernels_folder_never_shadows_the_kernels_package() -> None:
    """From the repository root ``import kernels`` finds this codec's folder first; it must hand over the installed
    ``kernels`` package (Hugging Face's, which transformers imports) or read as not installed (no ``__file__``), and
    the codec must still import as ``nz_lightning.kernels`` in the same process."""
    code = (
        "import json, sys\n"
        "import kernels\n"
        "got = kernels.__file__ or 'missing'\n"
        "import nz_lightning.kernels as codec\n"
        "print(json.dumps([got, codec.__file__, callable(codec.compress), sys.path[0]]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got, codec_file, ok, first = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first == "" and ok  # the repository root (the current directory) comes first on sys.path
    assert Path(codec_file).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    try:
        metadata.distribution("kernels")
        installed = True
    except metadata.PackageNotFoundError:
        installed = False
    if installed:
        assert not got.startswith("missing") and Path(got).resolve().parent != (ROOT / "kernels").resolve(), got
    else:
        assert got == "missing", got


HIDE_INSTALLED_KERNELS = """
import importlib.machinery, importlib.metadata, os, sys
ROOT = os.getcwd()
_find = importlib.machinery.PathFinder.find_spec.__func__
_version = importlib.metadata.version


def find_spec(cls, name, path=None, target=None):
    if name == "kernels":  # as if Hugging Face's package were not installed: only the repository root has one
        path = [p for p in (sys.path if path is None else path) if os.path.abspath(p or os.curdir) == ROOT]
    return _find(cls, name, path, target)


def version(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)


importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
importlib.metadata.version = version
"""


def test_repo_kernels_folder_reads_as_not_installed_without_the_kernels_package() -> None:
    """With no other ``kernels`` package, the folder imported by its own name is an inert module that libraries
    probing for Hugging Face's package take as absent: transformers (5.17-5.25) imports a ``kernels`` it finds but has
    no distribution for, and crashed on the ImportError this module used to raise; it needs no ``__file__`` and no
    ``__version__``. Nothing of the codec is reachable under that name, and ``nz_lightning.kernels`` still works."""
    code = HIDE_INSTALLED_KERNELS + (
        "import importlib, importlib.util, json\n"
        "found = importlib.util.find_spec('kernels') is not None\n"  # the folder: what transformers finds first
        "mod = importlib.import_module('kernels')\n"
        "probe = [getattr(mod, '__version__', 'N/A'), getattr(mod, '__file__', None)]\n"
        "try:\n"
        "    mod.compress\n"
        "    attr = 'reachable'\n"
        "except AttributeError as e:\n"
        "    attr = str(e)\n"
        "try:\n"
        "    import kernels.backends\n"
        "    sub = 'reachable'\n"
        "except ModuleNotFoundError as e:\n"
        "    sub = str(e)\n"
        "from transformers.utils import import_utils\n"
        "check = getattr(import_utils, '_is_package_available', None)\n"
        "hf = list(check('kernels', return_version=True)) if check else None\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"  # imports transformers' hub-kernels integration
        "import nz_lightning.kernels as codec\n"
        "print(json.dumps([found, probe, attr, sub, hf, codec.__file__, callable(codec.compress)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found, probe, attr, sub, hf, codec_file, ok = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found and probe == ["N/A", None], probe
    assert attr.startswith("module 'kernels' has no attribute 'compress'") and "nz_lightning.kernels" in attr, attr
    assert sub == "No module named 'kernels.backends'", sub
    assert hf in (None, [False, "N/A"]), hf
    assert Path(codec_file).resolve() == (ROOT / "kernels" / "__init__.py").resolve() and ok
