"""The vectorized CPU rANS decoder decodes exactly what the scalar one does, and rejects corrupt lanes safely."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nz_lightning.kernels import cpu, cpu_decode
from nz_lightning.kernels.backends import get_backend
from nz_lightning.kernels.compressed import MODE_RANS, compress
from nz_lightning.kernels.freqtable import quantize_counts
from nz_lightning.kernels.layout import DEFAULT_STEPS_PER_LANE, MIN_PROB_BITS, effective_steps
from nz_lightning.kernels.spec import FloatSpec, folded, spec_for
from nz_lightning.kernels.streams import Streams
from tests.helpers.generators import DTYPES, float_tensors

CPU_BACKEND = get_backend("cpu", torch.device("cpu"))


def _scalar_tables(c: object, spec: FloatSpec) -> torch.Tensor:
    """The 64-bit entries of the scalar decoder, whatever prob_bits is."""
    table = c.table  # type: ignore[attr-defined]
    freq_l, cum_l = table.dense(spec.alphabet)
    freq = np.asarray(freq_l, dtype=np.uint64)
    cum = np.asarray(cum_l, dtype=np.uint64)
    lut = np.repeat(np.asarray(table.symbols, dtype=np.uint64), table.freqs)
    bias = np.arange(1 << table.prob_bits, dtype=np.uint64) - cum[lut]
    entries = (freq[lut] << np.uint64(48)) | ((lut << np.uint64(spec.man_bits)) << np.uint64(16)) | bias
    return torch.from_numpy(entries.view(np.int64))


def _decode_both(c: object, streams: Streams) -> tuple[object, object]:
    """Run both decoders on ``streams``; each result is the decoded tensor or the ValueError message."""
    spec = c.coding_spec  # type: ignore[attr-defined]
    results = []
    for tables in (cpu.decode_tables(c.table, spec, torch.device("cpu")), _scalar_tables(c, spec)):  # type: ignore[attr-defined]
        out = torch.empty(c.shape, dtype=c.dtype)  # type: ignore[attr-defined]
        try:
            cpu.decode(streams, spec, tables, c.table.prob_bits, c.steps_per_lane, out.view(-1))  # type: ignore[attr-defined]
            results.append(out)
        except ValueError as err:
            results.append(str(err))
    return results[0], results[1]


@settings(max_examples=60, deadline=None)
@given(
    x=float_tensors(max_size=5000),
    prob_bits=st.integers(MIN_PROB_BITS, cpu_decode.VECTOR_MAX_PROB_BITS),
    steps=st.sampled_from([1, 2, 7, 33, DEFAULT_STEPS_PER_LANE]),
)
def test_vector_decoder_is_bit_exact(x: torch.Tensor, prob_bits: int, steps: int) -> None:
    c = compress(x, backend="cpu", prob_bits=prob_bits, steps_per_lane=steps)
    if c.mode != MODE_RANS:
        return
    # the vectorized decoder is the one used, unless more than 256 (folded) symbols are present
    assert (c.decoder_tables(CPU_BACKEND).dtype == torch.int32) == cpu_decode.vector_table_ok(c.table)
    vector, scalar = _decode_both(c, c.streams)  # type: ignore[arg-type]
    want = x.contiguous().view(c.spec.int_dtype)
    assert isinstance(vector, torch.Tensor) and isinstance(scalar, torch.Tensor)
    assert torch.equal(vector.view(c.spec.int_dtype), want) and torch.equal(scalar.view(c.spec.int_dtype), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2_049, 4_097, 100_003])
def test_wide_symbol_span_decodes_with_the_symbol_map(dtype: torch.dtype, n: int) -> None:
    # One exact zero (exponent 0) below Gaussian weights: with bf16's two folded bits the present symbols span
    # ~500 values, so the table maps ranks to symbols. Lengths with a partial last row (the scalar tail) included.
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 0.02).to(dtype)
    x[n // 3] = 0.0
    x[-1] = -0.0
    c = compress(x, backend="cpu")
    assert c.mode == MODE_RANS and c.table is not None
    tables = c.decoder_tables(CPU_BACKEND)
    assert tables.dtype == torch.int32
    wide = c.table.symbols[-1] - c.table.symbols[0] >= cpu_decode.MAP_SIZE
    assert int(tables[-1]) == (cpu_decode.MODE_MAP if wide else 0)
    if dtype == torch.bfloat16 and n == 100_003:  # folded (smaller tensors may not fold: a narrower span)
        assert wide
    vector, scalar = _decode_both(c, c.streams)  # type: ignore[arg-type]
    want = x.view(c.spec.int_dtype)
    assert isinstance(vector, torch.Tensor) and isinstance(scalar, torch.Tensor)
    assert torch.equal(vector.view(c.spec.int_dtype), want) and torch.equal(scalar.view(c.spec.int_dtype), want)


@pytest.mark.parametrize("n", [256 * 40 + 5, 33 * 64])
def test_symbol_map_with_256_symbols_over_1024_values(n: int) -> None:
    # Exactly 256 present symbols spread over the whole 10-bit folded alphabet: ranks up to 255, in the vector rows
    # and in the scalar tail of a partial last row (n not a multiple of 32), each decoded back to its symbol.
    spec = folded(spec_for(torch.bfloat16), 2)
    symbols = torch.arange(256) * 4 + 1
    sym = symbols[torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n))]
    sym[:256] = symbols  # every symbol present
    fields = torch.randint(0, 1 << spec.sm_bits, (n,), generator=torch.Generator().manual_seed(1))
    bits = ((fields >> (spec.sm_bits - 1)) << 15) | (sym << spec.man_bits) | (fields & ((1 << spec.man_bits) - 1))
    x = bits.to(torch.int16).view(torch.bfloat16)
    table = quantize_counts(cpu.exponent_histogram(x, spec).tolist(), 12)
    assert len(table.symbols) == 256 and table.symbols[-1] - table.symbols[0] >= cpu_decode.MAP_SIZE
    streams = cpu.encode(x, spec, table, 64)
    tables = cpu.decode_tables(table, spec, torch.device("cpu"))
    assert tables.dtype == torch.int32 and int(tables[-1]) == cpu_decode.MODE_MAP
    out = torch.empty_like(x)
    cpu.decode(streams, spec, tables, 12, 64, out.view(-1))
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))
    with pytest.raises(ValueError, match="does not match prob_bits"):
        cpu.decode(streams, spec, tables, 11, 64, out.view(-1))


def test_more_than_256_symbols_use_the_scalar_decoder() -> None:
    # 120 exponents, each with all four top-mantissa patterns in skewed proportions: folding pays and leaves 480
    # present symbols, more than the 32-bit entries can name.
    g = torch.Generator().manual_seed(3)
    n = 200_000
    exps = torch.randint(60, 180, (n,), generator=g)
    top = torch.multinomial(torch.tensor([0.7, 0.2, 0.07, 0.03]), n, replacement=True, generator=g)
    low = torch.randint(0, 32, (n,), generator=g)
    bits = ((exps << 7) | (top << 5) | low).to(torch.int16)
    x = bits.view(torch.bfloat16)
    c = compress(x, backend="cpu", prob_bits=12)
    assert c.mode == MODE_RANS and c.table is not None and len(c.table.symbols) > cpu_decode.MAP_SIZE
    assert c.decoder_tables(CPU_BACKEND).dtype == torch.int64
    assert torch.equal(c.decompress().view(torch.int16), bits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prob_bits_above_12_use_the_scalar_decoder(dtype: torch.dtype) -> None:
    x = (torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
    c = compress(x, backend="cpu", prob_bits=14)
    assert c.decoder_tables(CPU_BACKEND).dtype == torch.int64
    assert torch.equal(c.decompress().view(c.spec.int_dtype), x.view(c.spec.int_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_corrupt_words_are_rejected_like_the_scalar_decoder(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(70_001, generator=g) * 0.02).to(dtype)
    c = compress(x, backend="cpu", steps_per_lane=512)
    assert c.streams is not None
    rejected = 0
    for trial in range(20):
        words = c.streams.words.clone()
        idx = torch.randint(0, words.numel(), (1 + trial % 3,), generator=g)
        words[idx] ^= torch.randint(1, 1 << 15, (idx.numel(),), generator=g, dtype=torch.int64).to(torch.int16)
        corrupt = Streams(states=c.streams.states, counts=c.streams.counts, words=words, sm=c.streams.sm)
        vector, scalar = _decode_both(c, corrupt)
        if isinstance(vector, str):
            assert isinstance(scalar, str) and "corrupt" in vector
            rejected += 1
        else:
            assert isinstance(scalar, torch.Tensor) and torch.equal(vector.view(torch.uint8), scalar.view(torch.uint8))
    assert rejected >= 18


def test_lanes_without_words_never_read_out_of_bounds() -> None:
    """Counts claiming no words for the last segment (words cut short): reads stay inside the array, and it raises."""
    x = (torch.randn(3 * 32 * 64, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    c = compress(x, backend="cpu", steps_per_lane=64)
    assert c.streams is not None
    k = effective_steps(x.numel(), 64)
    counts = c.streams.counts.clone()
    last = counts[-32:].sum()
    counts[-32:] = 0
    words = c.streams.words[: c.streams.words.numel() - int(last)].clone()
    corrupt = Streams(states=c.streams.states, counts=counts, words=words, sm=c.streams.sm)
    vector, scalar = _decode_both(c, corrupt)
    assert isinstance(vector, str) and isinstance(scalar, str) and "corrupt" in vector
    assert k == 64


def test_decode_leaves_torch_thread_count_alone() -> None:
    """numba's OpenMP layer must not leave its thread count in torch (it changes torch's summation order).

    It happens at the first parallel launch of a process, so the check runs in a fresh one.
    """
    import subprocess
    import sys

    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread: its parallel launch cannot change the count")
    script = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from nz_lightning.kernels import compress\n"
        "compress(torch.randn(512, 512).to(torch.bfloat16), backend='cpu').decompress()\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split()[-1] == "1"
