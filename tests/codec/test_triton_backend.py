"""The Triton backend must produce byte-identical streams to the torch reference and decode them exactly.

Without CUDA the kernels run in the Triton interpreter (CPU tensors, small inputs); the ``gpu`` test runs a large
round trip on CUDA and compares its bytes with the reference run on CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nz_lightning.kernels import reference  # noqa: E402
from nz_lightning.kernels import triton_backend as tb  # noqa: E402
from nz_lightning.kernels.compressed import MODE_RANS, CompressedTensor, compress  # noqa: E402
from nz_lightning.kernels.freqtable import FreqTable, quantize_counts  # noqa: E402
from nz_lightning.kernels.spec import FloatSpec, spec_for  # noqa: E402
from nz_lightning.kernels.streams import Streams  # noqa: E402
from tests.helpers.generators import SPECIAL_BITS  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_DTYPE_IDS = ["bf16", "fp16", "fp32"]


def _from_bits(bits: list[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    spec = spec_for(dtype)
    b = torch.as_tensor(bits, dtype=torch.int64)
    return reference.from_bits(b & ((1 << spec.total_bits) - 1), spec)


def _make(dtype: torch.dtype, n: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        scale = torch.exp(torch.randn(n, generator=g) * 2)
        return (torch.randn(n, generator=g) * scale * 0.02).to(dtype)
    if kind == "bits":
        spec = spec_for(dtype)
        return _from_bits(torch.randint(0, 1 << spec.total_bits, (n,), generator=g), dtype)
    if kind == "special":
        x = _make(dtype, n, "normal", seed)
        sp = _from_bits(SPECIAL_BITS[dtype], dtype)
        pos = torch.randint(0, n, (max(1, n // 8),), generator=g)
        x[pos] = sp[torch.randint(0, sp.numel(), pos.shape, generator=g)]
        x[: min(n, sp.numel())] = sp[: min(n, sp.numel())]
        return x
    raise AssertionError(kind)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(spec_for(t.dtype).int_dtype).cpu()


def _assert_streams_equal(got: Streams, want: Streams) -> None:
    for name in ("states", "counts", "words", "sm"):
        a, b = getattr(got, name).cpu(), getattr(want, name).cpu()
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(a, b), f"{name} differs at {(a != b).nonzero()[:8].flatten().tolist()}"


def _round_trip(x: torch.Tensor, prob_bits: int = 12, steps: int = 2048) -> Streams:
    """Check histogram, encode and decode of ``x`` (CPU) against the reference; returns the streams."""
    spec = spec_for(x.dtype)
    xd = x.to(DEVICE)
    hist = tb.exponent_histogram(xd, spec)
    ref_hist = reference.exponent_histogram(x, spec)
    assert hist.dtype == torch.int64 and torch.equal(hist.cpu(), ref_hist)
    table = quantize_counts(ref_hist.tolist(), prob_bits)
    want = reference.encode(x, spec, table, steps)
    got = tb.encode(xd, spec, table, steps)
    _assert_streams_equal(got, want)
    out = torch.full_like(xd, 7.0)
    tb.decode(got, spec, table.decode_tables(spec.alphabet, DEVICE), prob_bits, steps, out)
    assert torch.equal(_bits(out), _bits(x))
    return want


@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS)
@pytest.mark.parametrize(
    ("n", "steps"),
    [(1, 2048), (100, 1), (31, 4), (33, 7), (1000, 4), (1000, 7), (4097, 4), (3000, 2048), (8000, 100), (20000, 7)],
)
def test_matches_reference(dtype: torch.dtype, n: int, steps: int) -> None:
    _round_trip(_make(dtype, n, "normal", seed=n + steps), steps=steps)


@settings(max_examples=12, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 2500),
    steps=st.integers(1, 40),
    prob_bits=st.integers(8, 15),
    kind=st.sampled_from(["normal", "special", "bits"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_property(
    dtype: torch.dtype, n: int, steps: int, prob_bits: int, kind: str, seed: int
) -> None:
    _round_trip(_make(dtype, n, kind, seed), prob_bits=prob_bits, steps=steps)


@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS)
def test_special_values(dtype: torch.dtype) -> None:
    x = _make(dtype, 2021, "special", seed=3)
    _round_trip(x, steps=7)


@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS)
@pytest.mark.parametrize("prob_bits", [8, 15])
def test_random_bit_patterns(dtype: torch.dtype, prob_bits: int) -> None:
    # Every exponent present: with prob_bits 8 and 256 symbols every frequency is 1.
    _round_trip(_make(dtype, 6000, "bits", seed=prob_bits), prob_bits=prob_bits, steps=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS)
@pytest.mark.parametrize("value", [0.0, -1.5, float("-inf"), float("nan")])
def test_constant_tensor(dtype: torch.dtype, value: float) -> None:
    # One symbol: freq == 2^prob_bits, so the renormalization threshold is 2^32 and no word is ever emitted.
    streams = _round_trip(torch.full((777,), value, dtype=dtype), steps=4)
    assert streams.words.numel() == 0


def test_skewed_two_symbols() -> None:
    # A symbol with frequency 2^pb - 1 next to one with frequency 1 (the extremes of the state arithmetic).
    x = torch.ones(5000, dtype=torch.bfloat16)
    x[1234] = 1e-30
    _round_trip(x, prob_bits=15, steps=7)


@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS)
def test_compress_api_bytes_match(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 1111, generator=torch.Generator().manual_seed(11)) * 0.02).to(dtype)
    t[1, :16] = _from_bits(SPECIAL_BITS[dtype], dtype)
    want = compress(t, backend="torch", steps_per_lane=64)
    got = compress(t.to(DEVICE), backend="triton", steps_per_lane=64)
    assert got.mode == want.mode == MODE_RANS
    blob = got.to_bytes()
    assert blob == want.to_bytes()
    back = CompressedTensor.from_bytes(blob, device=DEVICE).decompress(backend="triton")
    assert back.shape == t.shape and torch.equal(_bits(back), _bits(t))


def _coded(dtype: torch.dtype = torch.bfloat16, n: int = 3000, steps: int = 7) -> tuple[Streams, FloatSpec, FreqTable]:
    x = _make(dtype, n, "normal", seed=5)
    spec = spec_for(dtype)
    table = quantize_counts(reference.exponent_histogram(x, spec).tolist(), 12)
    return reference.encode(x, spec, table, steps), spec, table


def _decode_both(streams: Streams, spec: FloatSpec, table: FreqTable, n: int, steps: int) -> None:
    tables = table.decode_tables(spec.alphabet, "cpu")
    with pytest.raises(ValueError, match="corrupt blob"):
        reference.decode(streams, spec, tables, table.prob_bits, steps, torch.empty(n, dtype=spec.dtype))
    with pytest.raises(ValueError, match="corrupt blob"):
        tb.decode(
            streams.to(DEVICE),
            spec,
            tables.to(DEVICE),
            table.prob_bits,
            steps,
            torch.empty(n, dtype=spec.dtype, device=DEVICE),
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=_DTYPE_IDS)
@pytest.mark.parametrize("where", [0, 17, -1])
def test_corrupt_word_raises(dtype: torch.dtype, where: int) -> None:
    streams, spec, table = _coded(dtype)
    streams.words[where] ^= 0x1234
    _decode_both(streams, spec, table, 3000, 7)


@pytest.mark.parametrize("lane", [0, 5, -1])
def test_corrupt_state_raises(lane: int) -> None:
    streams, spec, table = _coded()
    streams.states[lane] ^= 0x00A50000
    _decode_both(streams, spec, table, 3000, 7)


def test_moved_word_count_raises() -> None:
    # Same total of words, split differently between two lanes: lane 3 reads past its stream.
    streams, spec, table = _coded()
    assert int(streams.counts[4]) > 0
    streams.counts[3] -= 1
    streams.counts[4] += 1
    _decode_both(streams, spec, table, 3000, 7)


def test_truncated_words_raise() -> None:
    streams, spec, table = _coded()
    streams.words = streams.words[:-1].clone()
    tables = table.decode_tables(spec.alphabet, DEVICE)
    with pytest.raises(ValueError, match="corrupt blob"):
        tb.decode(streams.to(DEVICE), spec, tables, 12, 7, torch.empty(3000, dtype=spec.dtype, device=DEVICE))


def test_wrong_lane_count_raises() -> None:
    streams, spec, table = _coded()
    streams.states = streams.states[:-32].clone()
    streams.counts = streams.counts[:-32].clone()
    tables = table.decode_tables(spec.alphabet, DEVICE)
    with pytest.raises(ValueError, match="corrupt blob"):
        tb.decode(streams.to(DEVICE), spec, tables, 12, 7, torch.empty(3000, dtype=spec.dtype, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="needs CUDA and compiled (not interpreted) Triton kernels")
def test_large_bf16_round_trip_cuda() -> None:
    n = 1 << 24
    steps = 2048
    x = _make(torch.bfloat16, n, "normal", seed=123)
    spec = spec_for(x.dtype)
    counts = reference.exponent_histogram(x, spec)
    xd = x.cuda()
    assert torch.equal(tb.exponent_histogram(xd, spec).cpu(), counts)
    table = quantize_counts(counts.tolist(), 12)
    want = reference.encode(x, spec, table, steps)
    got = tb.encode(xd, spec, table, steps)
    _assert_streams_equal(got, want)
    out = torch.empty_like(xd)
    tb.decode(got, spec, table.decode_tables(spec.alphabet, "cuda"), 12, steps, out)
    torch.cuda.synchronize()
    assert torch.equal(_bits(out), _bits(x))


def test_cpu_tensor_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.ones(10, dtype=torch.bfloat16)
    spec = spec_for(x.dtype)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tb.exponent_histogram(x, spec)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tb.decode(reference.encode(x, spec, FreqTable(12, (127,), (4096,)), 4), spec, torch.zeros(1), 12, 4, x)


def test_decode_plan_is_reused_and_follows_the_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode's checked launch arguments are kept on its streams and rebuilt whenever an array, the tables or the
    output change (a stale plan would decode old data)."""
    from nz_lightning.kernels import compressed as compressed_module

    monkeypatch.setattr(compressed_module, "CACHE_TABLES_MIN_NUMEL", 1)  # tables and plan cached as for a large block
    x = (torch.randn(64, 96) * 0.02).bfloat16()
    ct = compress(x, backend="triton")
    assert torch.equal(ct.decompress(backend="triton", check=False), x)
    st = ct.streams
    assert st is not None and isinstance(st.plan, tb._DecodePlan)
    plan = st.plan
    assert torch.equal(ct.decompress(backend="triton", check=False), x) and st.plan is plan  # reused
    st.states = st.states ^ 1  # another array: the plan must not decode the old one
    with pytest.raises(ValueError, match="corrupt"):
        ct.decompress(backend="triton")
    assert st.plan is not plan
    y = (torch.randn(64, 96) * 0.02).bfloat16()
    other = compress(y, backend="triton")
    assert torch.equal(other.decompress(backend="triton", check=False), y)  # its own plan, not ct's
    ct.drop_caches()
    assert st.plan is None
    monkeypatch.setattr(compressed_module, "CACHE_TABLES_MIN_NUMEL", 1 << 40)
    assert torch.equal(other.decompress(backend="triton"), y)
