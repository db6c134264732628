"""The backend contract: registry, device checks, required ops, lossy capability, shared decoder tables."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from nz_lightning.kernels import compress, compressed
from nz_lightning.kernels.backends import BACKENDS, CodecBackend, LossyOps, default_backend, get_backend
from nz_lightning.kernels.freqtable import FreqTable, quantize_counts
from nz_lightning.kernels.spec import FloatSpec, spec_for
from nz_lightning.kernels.streams import Streams
from tests.helpers.generators import DTYPES

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every backend can run on CPU tensors here (Triton in its interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _ops(protocol: type) -> list[str]:
    return sorted(name for name, value in vars(protocol).items() if not name.startswith("_") and callable(value))


def _assert_same_signature(impl: Callable[..., Any], declared: Callable[..., Any]) -> None:
    """``impl`` (bound) takes exactly the parameters of the protocol method ``declared`` (unbound), same types."""
    got = inspect.signature(impl)
    want = inspect.signature(declared)
    want = want.replace(parameters=list(want.parameters.values())[1:])  # drop self
    assert got == want, f"{impl.__qualname__}{got} != {declared.__qualname__}{want}"


def test_backend_names_are_listed_once_in_registry_order() -> None:
    assert BACKENDS == ("torch", "cpu", "triton")
    assert {default_backend(torch.device(d)) for d in ("cpu", "cuda", "meta")} == set(BACKENDS)


def test_the_contract_declares_every_op() -> None:
    assert _ops(CodecBackend) == [
        "decode",
        "decode_flagged",
        "decode_tables",
        "encode",
        "encode_bounded",
        "exponent_histogram",
        "lossy_ops",
    ]
    assert CodecBackend.__abstractmethods__ == {"decode", "encode", "exponent_histogram"}
    assert _ops(LossyOps) == ["decode_exponents", "fields", "merge", "quantize"]
    assert LossyOps.__abstractmethods__ == set(_ops(LossyOps))


@pytest.mark.parametrize("name", BACKENDS)
def test_every_registered_backend_implements_every_op(name: str) -> None:
    backend = get_backend(name, CPU)
    assert isinstance(backend, CodecBackend) and backend.name == name
    assert not getattr(type(backend), "__abstractmethods__", set())
    for op in _ops(CodecBackend):
        _assert_same_signature(getattr(backend, op), getattr(CodecBackend, op))
    assert get_backend(name, CPU) is backend  # loaded once


def test_a_backend_missing_an_op_cannot_be_built() -> None:
    class NoDecode(CodecBackend):
        name = "partial"

        def exponent_histogram(self, x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
            return torch.zeros(spec.alphabet, dtype=torch.int64)

        def encode(self, x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int) -> Streams:
            raise NotImplementedError

    with pytest.raises(TypeError, match="decode"):
        NoDecode()  # type: ignore[abstract]


@pytest.mark.parametrize("name", ["numpy", "", "Torch"])
def test_unknown_backend_names_the_choices(name: str) -> None:
    message = f"unknown backend {name!r}; choose one of torch, cpu, triton"
    with pytest.raises(ValueError, match=message):
        get_backend(name, CPU)
    with pytest.raises(ValueError, match=message):
        compress(torch.ones(8, dtype=torch.bfloat16), backend=name)


def test_backends_refuse_devices_they_cannot_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="backend 'cpu' runs on CPU tensors only, got a tensor on meta"):
        get_backend("cpu", meta)
    assert get_backend(None, meta).name == "torch"  # the reference runs anywhere
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend 'triton' needs a CUDA tensor"):
        get_backend("triton", meta)
    with pytest.raises(ValueError, match="on CPU it runs only under TRITON_INTERPRET=1"):
        get_backend("triton", CPU)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        compress(torch.ones(8, dtype=torch.bfloat16), backend="triton")


@pytest.mark.parametrize("dtype", DTYPES)
def test_lossy_capability(dtype: torch.dtype) -> None:
    spec = spec_for(dtype)
    assert get_backend("torch", CPU).lossy_ops(spec) is None
    assert get_backend("triton", CPU).lossy_ops(spec) is None
    ops = get_backend("cpu", CPU).lossy_ops(spec)
    assert isinstance(ops, LossyOps)
    for op in _ops(LossyOps):
        _assert_same_signature(getattr(ops, op), getattr(LossyOps, op))


def test_lossy_codec_runs_the_backends_own_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = get_backend("cpu", CPU).lossy_ops(spec_for(torch.bfloat16))
    assert ops is not None
    calls: list[str] = []
    for op in _ops(LossyOps):
        original = getattr(type(ops), op)

        def spy(self: LossyOps, *args: Any, _op: str = op, _original: Any = original) -> Any:
            calls.append(_op)
            return _original(self, *args)

        monkeypatch.setattr(type(ops), op, spy)
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    reference = compress(x, backend="torch", mantissa_bits=2)
    assert calls == []
    fast = compress(x, backend="cpu", mantissa_bits=2)
    assert calls == ["quantize", "fields"] and fast.to_bytes() == reference.to_bytes()
    decoded = fast.decompress(backend="cpu")
    assert calls[2:] == ["decode_exponents", "merge"]
    assert torch.equal(decoded.view(torch.int16), reference.decompress(backend="torch").view(torch.int16))


def test_torch_and_triton_share_the_reference_tables() -> None:
    spec = spec_for(torch.bfloat16)
    table = quantize_counts([0] * 120 + [5, 40, 300, 90, 7] + [0] * 131, 12)
    want = table.decode_tables(spec.alphabet, CPU)
    assert want.dtype == torch.int32 and want.numel() == (1 << 12) + 2 * spec.alphabet
    for name in ("torch", "triton"):
        backend = get_backend(name, CPU)
        assert type(backend).decode_tables is CodecBackend.decode_tables  # inherited, not copied
        assert torch.equal(backend.decode_tables(table, spec, CPU), want)
    cpu = get_backend("cpu", CPU)
    assert type(cpu).decode_tables is not CodecBackend.decode_tables  # its own per-slot entries
    assert cpu.decode_tables(table, spec, CPU).numel() == (1 << 12) + 256 + 1  # entries, the symbol map, the mode


def test_decoder_tables_are_cached_per_backend_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compressed, "CACHE_TABLES_MIN_NUMEL", 1)
    x = (torch.randn(3000, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    c = compress(x, backend="torch")
    for name in BACKENDS:
        assert torch.equal(c.decompress(backend=name).view(torch.int16), x.view(torch.int16))
    assert sorted(c._tables) == sorted(BACKENDS)
    assert c.decoder_tables(get_backend("cpu", CPU)) is c._tables["cpu"]


def test_numba_and_triton_load_only_when_chosen() -> None:
    script = (
        "import sys, torch\n"
        "from nz_lightning.kernels import compress\n"
        "x = torch.randn(5000).to(torch.bfloat16)\n"
        "for k in (None, 2):\n"
        "    compress(x, backend='torch', mantissa_bits=k).decompress(backend='torch')\n"
        "assert 'numba' not in sys.modules and 'triton' not in sys.modules, 'torch backend'\n"
        "compress(x).decompress()\n"
        "assert 'numba' in sys.modules and 'triton' not in sys.modules, 'default CPU backend'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
