"""The CPU backend's sign+mantissa packers and 32-bit decoder tables equal their straightforward definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nz_lightning.kernels import reference
from nz_lightning.kernels.cpu_decode_table import MAP_SIZE, MODE_BASE, MODE_MAP, VECTOR_MAX_PROB_BITS, table32
from nz_lightning.kernels.cpu_pack import pack_sm16, pack_sm32
from nz_lightning.kernels.freqtable import FreqTable, quantize_counts


def _fields(bits: np.ndarray, man_bits: int, total_bits: int) -> torch.Tensor:
    b = torch.from_numpy(bits.astype(np.int64))
    return ((b >> (total_bits - 1)) << man_bits) | (b & ((1 << man_bits) - 1))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), width=st.sampled_from([6, 7, 8, 9, 10, 11]), seed=st.integers(0, 2**32 - 1))
def test_pack_sm16_matches_reference_packing(n: int, width: int, seed: int) -> None:
    # Every length around the 8-field groups (and their unaligned 8-byte stores), every 16-bit field width.
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=n, dtype=np.uint16)
    want = reference.pack_bits(_fields(bits, width - 1, 16), width).numpy()
    got = pack_sm16(bits, width - 1, width)
    assert got.dtype == np.uint8 and got.tobytes() == want.tobytes()


def test_pack_sm16_large_folded_fields() -> None:
    bits = np.random.default_rng(7).integers(0, 1 << 16, size=100_003, dtype=np.uint16)
    for width in (6, 7):
        want = reference.pack_bits(_fields(bits, width - 1, 16), width).numpy()
        assert pack_sm16(bits, width - 1, width).tobytes() == want.tobytes()


def test_pack_sm32_matches_reference_packing() -> None:
    bits = np.random.default_rng(3).integers(0, 1 << 32, size=1001, dtype=np.uint32)
    want = reference.pack_bits(_fields(bits, 23, 32), 24).numpy()
    assert pack_sm32(bits).tobytes() == want.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    pb=st.integers(8, VECTOR_MAX_PROB_BITS),
    lo=st.integers(0, 500),
    stride=st.sampled_from([1, 2]),
    picks=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 10**6)), min_size=1, max_size=200),
)
def test_table32_entries(pb: int, lo: int, stride: int, picks: list[tuple[int, int]]) -> None:
    # stride 2 spreads the symbols over up to 511 values: the map mode (ranks in the entries)
    counts = np.zeros(1024, dtype=np.int64)
    for off, c in picks[: 1 << pb]:
        counts[lo + stride * off] = c
    table = quantize_counts(counts, pb)
    got = table32(table, 1024)
    nslots = 1 << pb
    assert got.dtype == np.uint32 and got.size == nslots + MAP_SIZE + 1
    base = table.symbols[0]
    mapped = table.symbols[-1] - base >= MAP_SIZE
    want = []
    for rank, (s, f) in enumerate(zip(table.symbols, table.freqs, strict=True)):
        want += [(f - 1) << 20 | b << 8 | (rank if mapped else s - base) for b in range(f)]
    assert got[:nslots].tolist() == want
    assert int(got[-1]) == (MODE_MAP if mapped else MODE_BASE)
    symbol_map = got[nslots : nslots + MAP_SIZE].tolist()
    if mapped:
        assert symbol_map[: len(table.symbols)] == list(table.symbols)
    else:
        assert symbol_map == [base + r for r in range(MAP_SIZE)]


def test_pack_sm16_reads_strided_input_as_its_values() -> None:
    bits = np.random.default_rng(5).integers(0, 1 << 16, size=2_001, dtype=np.uint16)
    for width in (6, 7):
        want = reference.pack_bits(_fields(bits[::2].copy(), width - 1, 16), width).numpy()
        assert pack_sm16(bits[::2], width - 1, width).tobytes() == want.tobytes()


@pytest.mark.parametrize(
    "table",
    [
        FreqTable(12, (3, 9), (1000, 1000)),  # frequencies sum below 2^12
        FreqTable(12, (3, 9), (4095, 2)),  # above: would write past the entries
        FreqTable(12, (9, 3), (2048, 2048)),  # symbols not ascending
        FreqTable(12, (3, 9), (4096, 0)),  # a zero frequency
    ],
)
def test_table32_rejects_malformed_tables(table: FreqTable) -> None:
    with pytest.raises(ValueError, match="invalid frequency table"):
        table32(table, 1024)
