"""Ahead-of-time compilation of the Triton kernels for real NVIDIA GPUs, on a machine without one.

:func:`specializations` lists every (kernel, signature, constexprs, ``num_warps``) the Triton backend
(``kernels/triton_backend.py``) launches on a GPU, from the codec's layouts (dtypes, fp16 folds, lossy carriers,
prob_bits) and the backend's GPU launch constants mirrored below. :func:`compile_all` compiles them with
``triton.compile`` for :data:`ARCHS` (ptxas ships in the Triton wheel: no GPU or driver needed) and reads each cubin's
resources (``cuobjdump -res-usage``): the numbers the driver gives Triton's ``CompiledKernel`` on a device, ``n_regs``
and ``n_spills`` (local memory per thread / 4; ptxas spills to the stack frame), plus ``metadata.shared``.

Under ``TRITON_INTERPRET=1`` (the tests without CUDA) not only the kernels but Triton's own ``tl.standard`` functions
are interpreter objects, and Triton's compiler then refuses to load (its Gluon frontend asserts). So compiling always
happens in fresh worker processes started without ``TRITON_INTERPRET``, each running its own copy of
``triton_kernels.py`` (``JITFunction`` objects). Results are cached (:func:`default_cache_dir`), keyed by the Triton
version, the kernels' source hash and the specialization; Triton's own cache goes to a throwaway directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product
from pathlib import Path
from types import ModuleType
from typing import Any

from .compressed import FOLD_BITS
from .layout import MAX_PROB_BITS, MIN_PROB_BITS
from .lossy import carrier_spec
from .spec import SPECS, FloatSpec, folded, max_fold_bits


@dataclass(frozen=True)
class Arch:
    """A compile target: CUDA compute capability, the GPUs it stands for and its per-block limits."""

    capability: int
    gpus: str
    max_shared: int  # bytes of shared memory per block (the opt-in maximum)
    max_regs_per_block: int = 65536


ARCHS: dict[int, Arch] = {
    80: Arch(80, "A100", 166912),
    86: Arch(86, "A6000, RTX 3090, A10", 101376),
    89: Arch(89, "L40, RTX 4090", 101376),
    90: Arch(90, "H100, H200", 232448),
}
"""Targets by capability. The A6000 is sm_86 (Triton compiles for the device's own capability, and its shared
memory limit is 99 KiB, not sm_80's 163 KiB), so it is a target of its own."""

KERNELS = ("histogram_kernel", "pack_sm_kernel", "encode_kernel", "compact_kernel", "decode_kernel")
# GPU launch constants of kernels/triton_backend.py (the `gpu` branches); test_triton_compile.py records the real
# launches and checks they are all listed by `specializations`.
_HIST_BLOCK, _HIST_WARPS = 4096, 8
_PACK_BLOCK, _PACK_WARPS = 1024, 4
_LANES = (32, 64, 128)  # _lanes_per_program; num_warps = lanes // 32
_COMPACT_MAX_W, _COMPACT_TILE, _COMPACT_WARPS = 512, 2048, 4
_PROB_BITS = tuple(range(MIN_PROB_BITS, MAX_PROB_BITS + 1))
LOOP_ARGS = {"histogram_kernel": "num_blocks", "encode_kernel": "k", "compact_kernel": "k", "decode_kernel": "k"}
"""The integer argument that bounds each kernel's loop; Triton specializes it to a constexpr when it is 1."""
VARIANTS = ("i32", "i32/16", "i64", "k=1", "unaligned")
"""Argument specializations: 32-bit sizes, 32-bit sizes divisible by 16, 64-bit sizes (2^31 elements, bytes or words
and more; all sizes 64-bit, the widest case), the loop bound equal to 1 (``LOOP_ARGS``), and the float data (``x_ptr``
or ``out_ptr``: a user tensor, maybe a view such as a row block) not 16-byte aligned. Other pointers always are (the
backend's own allocations)."""
_BITS = "*bits"  # placeholder: the int view of the floats (int16 or int32)
_POINTERS = dict(x_ptr=_BITS, out_ptr=_BITS, sm_ptr="*u8", scratch_ptr="*i16", words_ptr="*i16", offsets_ptr="*i64")
"""Types of the pointer arguments (named ``*_ptr``) of all kernels; those not listed are ``*i32``."""


@dataclass(frozen=True)
class KernelSpec:
    """One compiled specialization of a kernel.

    Attributes:
        kernel: Name of the ``@triton.jit`` function in ``triton_kernels.py``.
        args: Every argument in order: its Triton type (``"*i16"``, ``"i32"``...) or its constexpr value.
        num_warps: Warps per program.
        variant: Which of :data:`VARIANTS` it is (``tt.divisibility`` 16 on pointers but unaligned float data, and on
            integers in ``i32/16``).
        layouts: The coding layouts that launch it (for reports; not part of equality).
    """

    kernel: str
    args: tuple[tuple[str, str | int], ...]
    num_warps: int
    variant: str = "i32"
    layouts: str = field(default="", compare=False)

    @property
    def signature(self) -> dict[str, str]:
        """``ASTSource`` signature: each argument's type, ``"constexpr"`` for constants."""
        return {name: v if isinstance(v, str) else "constexpr" for name, v in self.args}

    @property
    def constexprs(self) -> dict[str, int]:
        """The constexpr arguments' values."""
        return {name: v for name, v in self.args if isinstance(v, int)}

    @property
    def attrs(self) -> dict[tuple[int, ...], list[list[Any]]]:
        """``ASTSource`` attributes, as ``JITFunction.run`` builds them: 16-divisibility per argument."""
        out: dict[tuple[int, ...], list[list[Any]]] = {}
        for i, (name, v) in enumerate(self.args):
            if isinstance(v, str) and v.startswith("*"):
                hint = self.variant != "unaligned" or name not in ("x_ptr", "out_ptr")
            else:
                hint = isinstance(v, str) and self.variant == "i32/16"
            out[(i,)] = [["tt.divisibility", 16]] if hint else []
        return out


def kernel_params(kernel: str) -> list[tuple[str, bool]]:
    """(name, is constexpr) of each argument of a kernel, from its definition (interpreted or not)."""
    from . import triton_kernels

    fn = getattr(triton_kernels, kernel).fn
    return [(p.name, "constexpr" in str(p.annotation)) for p in inspect.signature(fn).parameters.values()]


def _make(kernel: str, consts: Mapping[str, int], bits: str, warps: int, variant: str, layouts: str) -> KernelSpec:
    args: list[tuple[str, str | int]] = []
    for name, const in kernel_params(kernel):
        if const:
            args.append((name, consts[name]))
        elif name.endswith("_ptr"):
            args.append((name, bits if _POINTERS.get(name) == _BITS else _POINTERS.get(name, "*i32")))
        elif variant == "k=1" and name == LOOP_ARGS.get(kernel):
            args.append((name, 1))
        else:
            args.append((name, "i64" if variant == "i64" else "i32"))
    return KernelSpec(kernel, tuple(args), warps, variant, layouts)


def _layouts(kernel: str) -> dict[tuple[int, ...], tuple[FloatSpec, str]]:
    """Coding layouts a kernel is launched with, keyed by the constexprs they set, with their merged names.

    Encoding (histogram, pack, encode) sees what ``compress`` codes: each dtype folded by 0 up to ``FOLD_BITS`` bits
    (the histogram only the widest fold) and the lossy carriers; decoding every fold a blob may hold
    (``max_fold_bits``: 0-2 for bf16 and fp32, 0-5 for fp16).
    """
    found: list[tuple[FloatSpec, str]] = []
    for spec in SPECS:
        name = str(spec.dtype).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp")
        widest = FOLD_BITS.get(spec.dtype, 0)
        every = range(max_fold_bits(spec) + 1)  # blobs may hold any fold; compress takes only the widest histogram
        folds = {"decode_kernel": every, "histogram_kernel": [widest]}.get(kernel, range(widest + 1))
        found += [(folded(spec, f), name + (f" fold {f}" if f else "")) for f in folds]
        found.append((carrier_spec(spec), f"lossy {name}"))
    out: dict[tuple[int, ...], tuple[FloatSpec, str]] = {}
    for spec, name in found:
        k = (spec.total_bits, spec.man_bits, spec.alphabet)
        out[k] = (spec, f"{out[k][1]}, {name}") if k in out else (spec, name)
    return out


def _groups(kernel: str) -> list[list[tuple[dict[str, int], str, int, str]]]:
    """Per layout (or compact width), its (constexprs but PB, bits pointer type, num_warps, layouts) per lane count."""
    if kernel == "compact_kernel":
        widths = [1 << i for i in range(_COMPACT_MAX_W.bit_length())]
        return [[({"LB": max(1, min(256, _COMPACT_TILE // w)), "W": w}, "", _COMPACT_WARPS, "all")] for w in widths]
    out = []
    for spec, names in _layouts(kernel).values():
        c = {"MAN_BITS": spec.man_bits, "ALPHABET": spec.alphabet, "TOTAL_BITS": spec.total_bits}
        bits = f"*i{spec.total_bits}"
        if kernel in ("histogram_kernel", "pack_sm_kernel"):
            block, warps = (_HIST_BLOCK, _HIST_WARPS) if kernel == "histogram_kernel" else (_PACK_BLOCK, _PACK_WARPS)
            out.append([({**c, "BLOCK": block}, bits, warps, names)])
        else:
            out.append([({**c, "LANES": lanes}, bits, lanes // 32, names) for lanes in _LANES])
    return out


def specializations(full: bool = True) -> list[KernelSpec]:
    """Every specialization the Triton backend can launch on a GPU, or a representative subset.

    Args:
        full: All of them (the product of layouts, block sizes / lanes, prob_bits and :data:`VARIANTS`). Otherwise
            a subset where every layout, variant and distinct constexpr value of each kernel appears: the decode
            kernel's layouts x variants with lanes and prob_bits cycled through, the other kernels' layouts x lanes
            with prob_bits and variants cycled through.
    """
    out: list[KernelSpec] = []
    for kernel in KERNELS:
        groups = _groups(kernel)
        params = dict(kernel_params(kernel))
        pbs: Sequence[int | None] = _PROB_BITS if params.get("PB") else (None,)
        variants = [v for v in VARIANTS if v != "k=1" or kernel in LOOP_ARGS]
        variants = [v for v in variants if v != "unaligned" or {"x_ptr", "out_ptr"} & set(params)]
        flat = [g for gs in groups for g in gs]
        if full:
            combos = list(product(flat, pbs, variants))
        elif kernel == "decode_kernel":
            combos = [(gs[j % len(gs)], pbs[j % len(pbs)], v) for j, (gs, v) in enumerate(product(groups, variants))]
        else:
            count = max(len(flat), len(pbs), len(variants))
            combos = [(flat[i % len(flat)], pbs[i % len(pbs)], variants[i % len(variants)]) for i in range(count)]
        for (consts, bits, warps, names), pb, variant in combos:
            out.append(_make(kernel, {**consts, "PB": pb or 0}, bits, warps, variant, names))
    return out


@dataclass
class CompileResult:
    """What compiling one :class:`KernelSpec` for one architecture (compute capability ``arch``) gave.

    ``n_regs``: registers per thread; ``n_spills``: local memory per thread / 4, as Triton reports it;
    ``spill_bytes``: stack frame plus local memory per thread; ``shared``: shared memory per program (Triton's
    ``metadata.shared``); ``seconds``: compile time; ``error``: the compile error, if any; ``cached``: read from the
    result cache.
    """

    spec: KernelSpec
    arch: int
    n_regs: int = 0
    n_spills: int = 0
    spill_bytes: int = 0
    shared: int = 0
    seconds: float = 0.0
    error: str | None = None
    cached: bool = False

    def metrics(self) -> dict[str, Any]:
        """The measured fields (what the cache stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[2:-1]}

    def to_json(self) -> dict[str, Any]:
        """Flat JSON-able record."""
        s = self.spec
        head = {"kernel": s.kernel, "arch": self.arch, "variant": s.variant, "num_warps": s.num_warps}
        return head | {"layouts": s.layouts, "constexprs": s.constexprs, "signature": s.signature} | self.metrics()


def problems(result: CompileResult) -> list[str]:
    """Why a compiled specialization would fail or be slow on its architecture (empty when fine).

    A compile error; spills in a decode kernel (the hot path); shared memory over the architecture's per-block limit;
    more registers than a block's register file holds (the launch would fail).
    """
    where = f"{result.spec.kernel} {result.spec.variant} {result.spec.constexprs} on sm_{result.arch}"
    if result.error is not None:
        return [f"{where}: compile error: {result.error}"]
    arch, out = ARCHS[result.arch], []
    if result.spec.kernel.startswith("decode") and result.spill_bytes:
        out.append(f"{where}: {result.spill_bytes} bytes of spills per thread ({result.n_regs} registers)")
    if result.shared > arch.max_shared:
        out.append(f"{where}: {result.shared} bytes of shared memory, over the {arch.max_shared} allowed")
    if result.n_regs * 32 * result.spec.num_warps > arch.max_regs_per_block:
        out.append(f"{where}: {result.n_regs} registers x {32 * result.spec.num_warps} threads exceed a block's")
    return out


@lru_cache(maxsize=1)
def _kernels() -> tuple[ModuleType, str]:
    """A copy of ``triton_kernels.py`` (``JITFunction`` objects in a worker) and the hash of the source it ran."""
    path = Path(__file__).with_name("triton_kernels.py")
    source = path.read_bytes()
    module = ModuleType(f"{__package__}._triton_kernels_aot")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module, hashlib.sha256(source).hexdigest()


_USAGE = re.compile(r"Function ([\w$.]+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(cubin: bytes, name: str, tmp: str) -> tuple[int, int]:
    """(registers, stack + local bytes) per thread of function ``name`` in a cubin."""
    from triton import knobs

    path = os.path.join(tmp, f"{name}.cubin")
    Path(path).write_bytes(cubin)
    cmd = [knobs.nvidia.cuobjdump.path, "-res-usage", path]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for m in _USAGE.finditer(text):
        if m.group(1) == name:
            return int(m.group(2)), int(m.group(3)) + int(m.group(5))
    raise RuntimeError(f"no resource usage for {name} in:\n{text}")


def _compile_batch(items: Sequence[tuple[KernelSpec, int]], cache_dir: Path | None, want: str) -> list[CompileResult]:
    """Compile in this process, caching each success when the source compiled is the one hashed ``want``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, source_hash = _kernels()
    # force_disable_fp_fusion is newer than Triton 3.6 (the GPU machines' version): absent means not forced
    fusion = bool(knobs.language.default_fp_fusion and not getattr(knobs.language, "force_disable_fp_fusion", False))
    out = []
    with tempfile.TemporaryDirectory(prefix="nz-triton-") as tmp, knobs.cache.scope():
        knobs.cache.dir = tmp  # Triton's own cache: ~0.1 MB per kernel, not worth keeping
        for spec, arch in items:
            start = time.perf_counter()
            result = CompileResult(spec, arch)
            try:
                src = ASTSource(getattr(module, spec.kernel), spec.signature, spec.constexprs, spec.attrs)
                options = {"num_warps": spec.num_warps, "enable_fp_fusion": fusion}
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                result.n_regs, result.spill_bytes = _resource_usage(kernel.asm["cubin"], kernel.metadata.name, tmp)
                result.n_spills, result.shared = result.spill_bytes // 4, int(kernel.metadata.shared)
            except Exception as exc:  # any failure is a result to report, not a crash of the whole run
                result.error = f"{type(exc).__name__}: {exc}"[:4000]
            result.seconds = round(time.perf_counter() - start, 3)
            out.append(result)
            if cache_dir is not None and result.error is None and source_hash == want:
                path = _cache_file(cache_dir, spec, arch, source_hash)
                tmp_path = path.with_suffix(f".{os.getpid()}.tmp")
                tmp_path.write_text(json.dumps(result.metrics()))
                tmp_path.replace(path)
    return out


def default_cache_dir() -> Path | None:
    """Result cache: ``$NZ_TRITON_COMPILE_CACHE`` (``0`` or empty: none), else ``<tmp>/nz_lightning-triton-compile``."""
    value = os.environ.get("NZ_TRITON_COMPILE_CACHE")
    if value is None:
        return Path(tempfile.gettempdir()) / "nz_lightning-triton-compile"
    return Path(value) if value not in ("", "0") else None


def _cache_file(cache_dir: Path, spec: KernelSpec, arch: int, source_hash: str) -> Path:
    import triton

    tools = [os.environ.get(k, "") for k in ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH")]
    key = [1, triton.__version__, tools, source_hash, spec.kernel, spec.args, spec.num_warps, spec.variant, arch]
    return cache_dir / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()}.json"


def compile_all(
    specs: Sequence[KernelSpec], archs: Sequence[int] = tuple(ARCHS), jobs: int = 2, cache_dir: Path | None = None
) -> list[CompileResult]:
    """Compile every specialization for every architecture.

    Args:
        specs: What to compile (from :func:`specializations`).
        archs: Compute capabilities (keys of :data:`ARCHS`).
        jobs: Worker processes (always at least one: this process may run Triton's interpreter).
        cache_dir: Where results are cached, as soon as each is compiled (errors never are); ``None``: no cache.

    Returns:
        One result per (architecture, spec), architecture-major, in the order given.
    """
    items = [(spec, arch) for arch in archs for spec in specs]
    source_hash = hashlib.sha256(Path(__file__).with_name("triton_kernels.py").read_bytes()).hexdigest()
    results: list[CompileResult | None] = [None] * len(items)
    for i, (spec, arch) in enumerate(items):
        path = None if cache_dir is None else _cache_file(cache_dir, spec, arch, source_hash)
        if path is not None and path.exists():
            results[i] = CompileResult(spec, arch, **json.loads(path.read_text()), cached=True)
    todo = [i for i, r in enumerate(results) if r is None]
    shards = [todo[j :: max(1, jobs)] for j in range(min(len(todo), max(1, jobs)))]
    if cache_dir is not None and todo:
        cache_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # see the module docstring
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with tempfile.TemporaryDirectory(prefix="nz-triton-compile-") as tmp:
        procs = []
        for j, shard in enumerate(shards):
            base = Path(tmp, str(j))
            base.with_suffix(".in").write_bytes(pickle.dumps(([items[i] for i in shard], cache_dir, source_hash)))
            cmd = [sys.executable, "-c", f"import {__name__} as m; m._worker()", str(base)]
            with base.with_suffix(".log").open("wb") as log:  # Triton prints a failing kernel's PTX to stdout
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        for j, (proc, shard) in enumerate(zip(procs, shards, strict=True)):
            base = Path(tmp, str(j))
            if proc.wait() != 0:
                log_tail = base.with_suffix(".log").read_text(errors="replace")[-4000:]
                raise RuntimeError(f"compile worker exited with status {proc.returncode}:\n{log_tail}")
            for i, result in zip(shard, pickle.loads(base.with_suffix(".out").read_bytes()), strict=True):
                results[i] = result
    return [r for r in results if r is not None]


def _worker() -> None:
    """A compile worker (a fresh process): ``<argv[1]>.in`` (pickled work) to ``<argv[1]>.out`` (results)."""
    if "TRITON_INTERPRET" in os.environ:
        raise RuntimeError("compile workers must run without TRITON_INTERPRET")
    base = Path(sys.argv[1])
    items, cache_dir, want = pickle.loads(base.with_suffix(".in").read_bytes())
    base.with_suffix(".out").write_bytes(pickle.dumps(_compile_batch(items, cache_dir, want)))
