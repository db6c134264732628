"""Frequency quantization: exact totals, every present symbol kept, cost close to the entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nz_lightning.kernels import entropy_bits, quantize_counts
from nz_lightning.kernels.encode_plan import fold_histograms


@given(
    counts=st.lists(st.integers(0, 10**9), min_size=1, max_size=256).filter(lambda c: any(c)),
    pb=st.integers(8, 15),
)
def test_quantized_table_is_valid(counts: list[int], pb: int) -> None:
    present = [s for s, c in enumerate(counts) if c]
    if len(present) > 1 << pb:
        with pytest.raises(ValueError):
            quantize_counts(counts, pb)
        return
    t = quantize_counts(counts, pb)
    assert list(t.symbols) == present
    assert sum(t.freqs) == 1 << pb
    assert min(t.freqs) >= 1
    freq, cum = t.dense(len(counts))
    assert cum[-1] + freq[-1] == 1 << pb


def test_cost_close_to_entropy_for_weight_like_histogram() -> None:
    # Exponent histogram shape of N(0, 0.02) bf16 weights: a geometric-ish tail below the mode.
    counts = [0] * 256
    for e in range(60, 125):
        counts[e] = int(1e6 * 2 ** (-(abs(119 - e)) * 0.9)) + 1
    n = sum(counts)
    h = entropy_bits(counts)
    cost = quantize_counts(counts, 12).cost_bits(counts) / n
    assert h <= cost < h + 0.02


def test_single_symbol() -> None:
    t = quantize_counts([0, 0, 5, 0], 12)
    assert t.symbols == (2,) and t.freqs == (4096,)
    assert math.isclose(t.cost_bits([0, 0, 5, 0]), 0.0)


def test_empty_histogram_is_rejected() -> None:
    with pytest.raises(ValueError):
        quantize_counts([0, 0], 12)


@given(
    counts=st.lists(st.integers(0, 10**12), min_size=1, max_size=1024).filter(lambda c: any(c)),
    pb=st.integers(8, 15),
)
def test_numpy_histogram_gives_the_same_table_and_cost(counts: list[int], pb: int) -> None:
    # The encoder passes numpy histograms (up to 1024 bins); the table and cost must equal those of the list.
    if sum(1 for c in counts if c) > 1 << pb:
        return
    arr = np.asarray(counts, dtype=np.int64)
    t = quantize_counts(counts, pb)
    assert quantize_counts(arr, pb) == t
    assert t.cost_bits(arr) == t.cost_bits(counts)  # the same float sum, term by term


def test_fold_histograms_sum_pairs() -> None:
    widest = list(range(1024))
    layouts = fold_histograms(widest, 2)
    assert [len(x) for x in layouts] == [256, 512, 1024]
    assert layouts[1].tolist() == [widest[2 * i] + widest[2 * i + 1] for i in range(512)]
    assert layouts[0].tolist() == [sum(widest[4 * i : 4 * i + 4]) for i in range(256)]
