"""The Triton kernels compile for real GPUs (sm_80, sm_86, sm_89, sm_90) without one, within each GPU's limits.

The compile test covers a representative set (:func:`specializations` with ``full=False``: every kernel, layout,
variant and distinct constexpr value, for every architecture); ``benchmarks/triton_compile.py`` compiles the
full product. Results are cached in ``/tmp`` by Triton version and kernel source (``NZ_TRITON_COMPILE_CACHE=0``: no
cache). The cross-check runs the backend's GPU code paths (a CUDA device, or the interpreter pretending to be one)
and checks every launch it makes is one of the enumerated specializations.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from nz_lightning.kernels import MODE_RAW, compress, reference  # noqa: E402
from nz_lightning.kernels import triton_compile as tc  # noqa: E402
from nz_lightning.kernels.compressed import FOLD_BITS  # noqa: E402
from nz_lightning.kernels.freqtable import quantize_counts  # noqa: E402
from nz_lightning.kernels.spec import SPECS, folded, max_fold_bits  # noqa: E402

GPU = torch.cuda.is_available()
CAN_RUN = GPU or os.environ.get("TRITON_INTERPRET") == "1"
_PTR = {torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8"}


@pytest.fixture(scope="module")
def compiled() -> list[tc.CompileResult]:
    """The representative set compiled for every architecture (two worker processes, or the cache)."""
    return tc.compile_all(tc.specializations(full=False), jobs=2, cache_dir=tc.default_cache_dir())


@pytest.mark.parametrize("arch", list(tc.ARCHS))
@pytest.mark.parametrize("kernel", tc.KERNELS)
def test_compiles_within_limits(compiled: list[tc.CompileResult], kernel: str, arch: int) -> None:
    """No compile error, no spills in the decode kernel, shared memory and registers within the GPU's limits."""
    results = [r for r in compiled if r.spec.kernel == kernel and r.arch == arch]
    assert results
    found = [p for r in results for p in tc.problems(r)]
    assert not found, "\n".join(found)
    assert all(0 < r.n_regs <= 255 for r in results)


def test_cache_gives_the_same_results(compiled: list[tc.CompileResult]) -> None:
    cache = tc.default_cache_dir()
    if cache is None:
        pytest.skip("result cache disabled (NZ_TRITON_COMPILE_CACHE=0)")
    again = tc.compile_all(tc.specializations(full=False), cache_dir=cache)  # all cached: no worker starts
    assert all(r.cached for r in again)
    assert [r.metrics() | {"seconds": 0} for r in again] == [r.metrics() | {"seconds": 0} for r in compiled]


def test_subset_covers_every_value() -> None:
    """The default run meets every layout, variant, num_warps and distinct constexpr value of every kernel."""
    full, subset = tc.specializations(full=True), tc.specializations(full=False)
    assert len(set(full)) == len(full) > len(subset)

    def values(specs: list[tc.KernelSpec], kernel: str) -> set[tuple[str, object]]:
        chosen = [s for s in specs if s.kernel == kernel]
        out = {(name, v) for s in chosen for name, v in s.constexprs.items() if name != tc.LOOP_ARGS.get(kernel)}
        return out | {(k, getattr(s, k)) for s in chosen for k in ("variant", "layouts", "num_warps")}

    for kernel in tc.KERNELS:
        assert values(subset, kernel) == values(full, kernel), kernel
    decode = {(s.layouts, s.variant) for s in subset if s.kernel == "decode_kernel"}
    assert len(decode) == len({s.layouts for s in full if s.kernel == "decode_kernel"}) * len(tc.VARIANTS)


def test_specializations_follow_the_kernel_signatures() -> None:
    """Every public kernel, its argument names and order; pointers typed, the prob_bits range, every fp16 fold."""
    from nz_lightning.kernels import triton_kernels

    jitted = {name for name, obj in vars(triton_kernels).items() if hasattr(obj, "fn") and not name.startswith("_")}
    assert jitted == set(tc.KERNELS)
    for spec in tc.specializations():
        params = tc.kernel_params(spec.kernel)
        assert [name for name, _ in spec.args] == [name for name, _ in params]
        for (name, value), (_, const) in zip(spec.args, params, strict=True):
            assert const == isinstance(value, int) or (name == tc.LOOP_ARGS[spec.kernel] and value == 1)
            assert name.endswith("_ptr") == str(value).startswith("*")
    decode = [s for s in tc.specializations() if s.kernel == "decode_kernel"]
    assert {s.constexprs["PB"] for s in decode} == set(range(8, 16))
    assert {s.constexprs["LANES"] for s in decode} == {32, 64, 128}
    alphabets = {(s.constexprs["TOTAL_BITS"], s.constexprs["ALPHABET"]) for s in decode}
    for spec in SPECS:  # every fold a blob may hold: bf16 / fp32 up to 2 bits, fp16 up to 5 (10-bit symbols)
        assert {(spec.total_bits, folded(spec, f).alphabet) for f in range(max_fold_bits(spec) + 1)} <= alphabets
    encoders = [s for s in tc.specializations() if s.kernel == "encode_kernel"]
    encode = {(s.constexprs["ALPHABET"], s.constexprs["MAN_BITS"]) for s in encoders}
    for spec in SPECS:  # every fold compress may choose
        chosen = [folded(spec, f) for f in range(FOLD_BITS.get(spec.dtype, 0) + 1)]
        assert {(c.alphabet, c.man_bits) for c in chosen} <= encode


def test_problems_are_reported() -> None:
    decode = next(s for s in tc.specializations(False) if s.kernel == "decode_kernel")
    encode = next(s for s in tc.specializations(False) if s.kernel == "encode_kernel")
    assert tc.problems(tc.CompileResult(decode, 90, n_regs=40)) == []
    assert tc.problems(tc.CompileResult(encode, 90, n_regs=40, spill_bytes=8)) == []  # spills matter in decode
    assert tc.problems(tc.CompileResult(decode, 90, n_regs=40, spill_bytes=8))
    assert tc.problems(tc.CompileResult(decode, 89, n_regs=40, shared=101377))
    assert not tc.problems(tc.CompileResult(decode, 90, n_regs=40, shared=101377))
    assert tc.problems(tc.CompileResult(decode, 80, error="PTXASError: boom"))
    assert tc.problems(tc.CompileResult(dataclasses.replace(decode, num_warps=32), 90, n_regs=65))  # 65 x 1024


# -- cross-check: what the backend launches on a GPU is enumerated -----------------------------------------------


def _launch_spec(kernel: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tc.KernelSpec:
    """The specialization of a launch ``kernel[grid](*args, **kwargs)``, alignment (16-divisibility) left out.

    An integer equal to 1 other than the loop bound counts as ``i32``: Triton makes it a constexpr, which only folds
    that one value into code that is compiled anyway.
    """
    options = dict(kwargs)
    num_warps = int(options.pop("num_warps", 4))
    params = tc.kernel_params(kernel)
    values = dict(zip([name for name, _ in params], args, strict=False)) | options
    assert set(values) == {name for name, _ in params}, f"{kernel}: launch arguments {sorted(values)}"
    spec: list[tuple[str, str | int]] = []
    for name, const in params:
        v = values[name]
        if isinstance(v, torch.Tensor):
            spec.append((name, _PTR[v.dtype]))
        elif const or (v == 1 and name == tc.LOOP_ARGS.get(kernel)):
            spec.append((name, int(v)))
        else:
            spec.append((name, "i32" if v < 2**31 else "i64"))
    loop_one = any(name == tc.LOOP_ARGS.get(kernel) and v == 1 for name, v in spec)
    variant = "k=1" if loop_one else "i64" if any(v == "i64" for _, v in spec) else "i32"
    return tc.KernelSpec(kernel, tuple(spec), num_warps, variant)


class _Recorder:
    """Stands in for a kernel: records each launch's specialization, then launches the kernel."""

    def __init__(self, name: str, kernel: Any, log: list[tc.KernelSpec]) -> None:
        self.name, self.kernel, self.log, self.fn = name, kernel, log, kernel.fn

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        launch = self.kernel[grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            self.log.append(_launch_spec(self.name, args, kwargs))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def gpu_launches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tc.KernelSpec]]:
    """Record the Triton backend's launches, its GPU branches taken even in the interpreter (one SM)."""
    if not CAN_RUN:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from nz_lightning.kernels import triton_backend as tb

    log: list[tc.KernelSpec] = []
    for name in tc.KERNELS:
        monkeypatch.setattr(tb.tk, name, _Recorder(name, getattr(tb.tk, name), log))
    monkeypatch.setattr(tb, "_check_device", lambda device: True)
    monkeypatch.setattr(tb, "_sm_count", lambda device: 1)  # 32, 64 or 128 lanes from 32, 256 or 512 lanes on
    yield log


def test_backend_launches_are_enumerated(gpu_launches: list[tc.KernelSpec]) -> None:
    from nz_lightning.kernels import triton_backend as tb

    device = torch.device("cuda" if GPU else "cpu")
    g = torch.Generator().manual_seed(0)
    for spec in SPECS:
        x = (torch.randn(8192, generator=g) * 0.02).to(spec.dtype)
        tb.exponent_histogram(x.to(device), spec)  # two blocks (one block below: the k=1 variant)
        for kwargs in ({}, {"mantissa_bits": 2, "prob_bits": 15}):  # the public paths: fold choice, lossy carrier
            c = compress(x[:2048].to(device), backend="triton", **kwargs)
            assert c.mode != MODE_RAW
            out = c.decompress(backend="triton").cpu()
            assert kwargs or torch.equal(out.view(spec.int_dtype), x[:2048].view(spec.int_dtype))
        compress(torch.full((100,), 1.5, dtype=spec.dtype, device=device), backend="triton")  # constant mode
        for fold in range(max_fold_bits(spec) + 1):
            coding = folded(spec, fold)
            for n, steps in ((1024, 2), (512, 2), (64, 1)):  # 128, 64 and 32 lanes per program; k = 1
                v = x[:n]
                table = quantize_counts(reference.exponent_histogram(v, coding).tolist(), 8 + fold)
                if fold <= FOLD_BITS.get(spec.dtype, 0):  # layouts compress encodes
                    streams = tb.encode(v.to(device), coding, table, steps)
                else:  # layouts only a blob may hold
                    streams = reference.encode(v, coding, table, steps).to(device)
                out = torch.empty(n, dtype=spec.dtype, device=device)
                tb.decode(streams, coding, table.decode_tables(coding.alphabet, device), 8 + fold, steps, out)
                assert torch.equal(out.cpu().view(spec.int_dtype), v.view(spec.int_dtype))
    aligned = ("i32/16", "unaligned")  # alignment is not recorded: both compile the same arguments as "i32"
    enumerated = {dataclasses.replace(s, variant="i32") if s.variant in aligned else s for s in tc.specializations()}
    missing = sorted({s for s in gpu_launches if s not in enumerated}, key=str)
    assert not missing, "launched but not enumerated:\n" + "\n".join(map(str, missing))
    assert {s.kernel for s in gpu_launches} == set(tc.KERNELS)
    assert {s.constexprs.get("LANES") for s in gpu_launches} == {None, 32, 64, 128}
    assert {s.variant for s in gpu_launches} == {"i32", "k=1"}
