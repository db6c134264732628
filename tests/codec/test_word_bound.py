"""The upper bound on rANS words that lets the Triton encoder size its output without a host sync."""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend runs on CPU tensors (set before it is imported)

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nz_lightning.kernels import quantize_counts, reference
from nz_lightning.kernels.compressed import word_bound
from nz_lightning.kernels.spec import folded, spec_for
from nz_lightning.tensor.sync_count import count_host_syncs


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6000),
    scale=st.sampled_from([1e-3, 0.02, 1.0, 1e4]),
    prob_bits=st.integers(8, 15),
    steps=st.sampled_from([1, 2, 17, 256, 2048]),
    fold=st.integers(0, 2),
    skew=st.booleans(),
)
def test_words_never_exceed_the_bound(
    seed: int, n: int, scale: float, prob_bits: int, steps: int, fold: int, skew: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    if skew:  # one dominant value with rare others: symbols of frequency 1 next to one of nearly 2^p
        x = torch.where(torch.rand(n, generator=g) < 0.98, torch.full_like(x, 0.75), x)
    x = x.to(torch.bfloat16)
    spec = folded(spec_for(torch.bfloat16), fold)
    counts = reference.exponent_histogram(x, spec).tolist()
    if sum(1 for c in counts if c) > 1 << prob_bits:
        return
    table = quantize_counts(counts, prob_bits)
    words = reference.encode(x, spec, table, steps).words.numel()
    assert words <= word_bound(table, counts, n) <= n


def test_bounded_triton_encode_is_trimmed_lazily_and_checked() -> None:
    from nz_lightning.kernels import triton_backend as tb

    x = (torch.randn(20_000, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    spec = folded(spec_for(torch.bfloat16), 1)
    counts = reference.exponent_histogram(x, spec).tolist()
    table = quantize_counts(counts, 12)
    want = reference.encode(x, spec, table, 64)
    bound = word_bound(table, counts, x.numel())
    with count_host_syncs() as syncs:
        got = tb.encode_bounded(x, spec, table, 64, bound)
    assert syncs.total == 0, syncs.summary()
    assert got.used is not None and got.words.numel() == bound > want.words.numel()
    out = torch.empty_like(x)
    assert not bool(tb.decode_flagged(got, spec, table.decode_tables(spec.alphabet, "cpu"), 12, 64, out))
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))  # decodes from the untrimmed buffer
    got.settle()
    assert got.used is None and torch.equal(got.words, want.words) and torch.equal(got.states, want.states)
    short = tb.encode_bounded(x, spec, table, 64, want.words.numel() - 5)  # a wrong bound loses words ...
    bad = tb.decode_flagged(short, spec, table.decode_tables(spec.alphabet, "cpu"), 12, 64, out)
    assert bad is not None and bool(bad)  # ... which the decode check reports
    with pytest.raises(ValueError, match="overflowed"):
        short.settle()


def test_settle_streams_reads_every_pending_total_at_once() -> None:
    from nz_lightning.kernels import settle_streams
    from nz_lightning.kernels import triton_backend as tb

    spec = folded(spec_for(torch.bfloat16), 2)
    pending, exact = [], []
    for seed in range(3):
        x = (torch.randn(5_000, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)
        counts = reference.exponent_histogram(x, spec).tolist()
        table = quantize_counts(counts, 12)
        pending.append(tb.encode_bounded(x, spec, table, 32, word_bound(table, counts, x.numel())))
        exact.append(reference.encode(x, spec, table, 32))
    with count_host_syncs() as syncs:
        settle_streams([pending[0], None, exact[0], pending[1], pending[2]])
    assert syncs.total == 1, syncs.summary()
    for got, want in zip(pending, exact, strict=True):
        assert got.used is None and torch.equal(got.words, want.words)
    with count_host_syncs() as again:
        settle_streams(pending)
    assert again.total == 0
