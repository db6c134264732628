"""Source rules that keep the numba kernels compiling on every Python the project supports.

numba 0.68's parfor pass fails on Python 3.12 (``AssertionError: unexpected cycle in lookup()`` in
``get_parfor_reductions``) when a ``prange`` loop of our decoders accumulated into a scalar (``bad += err``), while
Python 3.11 compiles the same source. CI runs one Python, so this check reads the source instead: no parallel kernel
may update a scalar defined outside its ``prange`` loop; per-iteration results go to an array indexed by the loop
variable, summed after the loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _parallel_kernels(tree: ast.Module) -> list[ast.FunctionDef]:
    def is_parallel(dec: ast.expr) -> bool:
        return isinstance(dec, ast.Call) and any(
            kw.arg == "parallel" and isinstance(kw.value, ast.Constant) and kw.value.value is True
            for kw in dec.keywords
        )

    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and any(map(is_parallel, n.decorator_list))]


def _prange_loops(fn: ast.FunctionDef) -> list[ast.For]:
    return [
        n
        for n in ast.walk(fn)
        if isinstance(n, ast.For) and isinstance(n.iter, ast.Call) and ast.unparse(n.iter.func).endswith("prange")
    ]


def scalar_reductions(source: str) -> list[str]:
    """``function: statement`` for every augmented assignment to a plain name bound outside its ``prange`` loop."""
    found = []
    for fn in _parallel_kernels(ast.parse(source)):
        for loop in _prange_loops(fn):
            inside = {
                t.id
                for n in ast.walk(loop)
                if isinstance(n, ast.Assign | ast.For)
                for t in ast.walk(n.targets[0] if isinstance(n, ast.Assign) else n.target)
                if isinstance(t, ast.Name)
            }
            for n in ast.walk(loop):
                if isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name) and n.target.id not in inside:
                    found.append(f"{fn.name}: {ast.unparse(n)}")
    return found


def test_the_rule_catches_a_scalar_reduction() -> None:
    source = (
        "@numba.njit(parallel=True)\n"
        "def f(n):\n"
        "    bad = 0\n"
        "    for g in numba.prange(n):\n"
        "        err = g & 1\n"
        "        x = 0\n"
        "        x += 1\n"  # bound inside the loop: fine
        "        bad += err\n"
        "    return bad\n"
    )
    assert scalar_reductions(source) == ["f: bad += err"]


def test_no_parallel_kernel_reduces_into_a_scalar() -> None:
    files = sorted((ROOT / "kernels").glob("*.py"))
    kernels = [f for f in files if "parallel=True" in f.read_text(encoding="utf-8")]
    assert kernels, "no parallel numba kernel found: the rule checks nothing"
    offenders = [f"{f.name}: {r}" for f in kernels for r in scalar_reductions(f.read_text(encoding="utf-8"))]
    assert not offenders, f"prange loops reducing into scalars (numba fails on Python 3.12): {offenders}"
