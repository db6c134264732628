"""The encoder's fold choice: pruning by the entropy bound picks what an exhaustive search picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nz_lightning.kernels import blob_table
from nz_lightning.kernels.encode_plan import choose_fold, fold_histograms
from nz_lightning.kernels.freqtable import FreqTable, quantize_counts
from nz_lightning.kernels.spec import folded, spec_for


def _exhaustive(layouts: list[np.ndarray], dtype: torch.dtype, n: int, pb: int) -> tuple[float, int, FreqTable]:
    spec, best = spec_for(dtype), None
    for bits, cnt in enumerate(layouts):
        if np.count_nonzero(cnt) > 1 << pb:
            continue
        table = quantize_counts(cnt.tolist(), pb)
        size = blob_table.table_nbytes(table) + table.cost_bits(cnt.tolist()) / 8 + n * folded(spec, bits).sm_bits / 8
        if best is None or size < best[0]:
            best = (size, bits, table)
    assert best is not None
    return best


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    pb=st.integers(8, 14),
    spread=st.integers(1, 64),
    skew=st.floats(0.0, 3.0),
    mantissa_bias=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_pruned_choice_equals_exhaustive(
    dtype: torch.dtype, pb: int, spread: int, skew: float, mantissa_bias: float, seed: int
) -> None:
    # Weight-like histograms (a peak with a geometric tail), with top mantissa bits anywhere from uniform (folding
    # does not pay) to strongly skewed (it does), so every fold wins somewhere and close calls occur.
    rng = np.random.default_rng(seed)
    fold_bits = {torch.bfloat16: 2, torch.float16: 3}[dtype]
    alphabet = spec_for(dtype).alphabet
    spread = min(spread, alphabet)
    exps = np.zeros(alphabet, dtype=np.float64)
    mode = int(rng.integers(spread - 1, alphabet))
    exps[mode - spread + 1 : mode + 1] = np.exp(-skew * np.arange(spread))[::-1]
    sub = np.linspace(1.0, 1.0 - mantissa_bias, 1 << fold_bits)
    probs = (exps[:, None] * sub[None, :]).reshape(-1)
    widest = rng.multinomial(int(rng.integers(1, 2_000_000)), probs / probs.sum())
    layouts = fold_histograms(widest, fold_bits)
    n = int(widest.sum())
    got = choose_fold(layouts, spec_for(dtype), n, pb)
    want = _exhaustive(layouts, dtype, n, pb)
    assert got[1] == want[1] and got[2] == want[2] and got[0] == want[0]


def test_folds_that_do_not_fit_are_skipped() -> None:
    widest = np.ones(1024, dtype=np.int64)  # 1024 folded symbols cannot fit a 2^8 table; 256 exponents can
    size, fold, table = choose_fold(fold_histograms(widest, 2), spec_for(torch.bfloat16), 1024, 8)
    assert fold == 0 and len(table.symbols) == 256


def test_folds_that_cannot_win_are_not_quantized(monkeypatch: pytest.MonkeyPatch) -> None:
    # Gaussian-like bf16 weights: folding two bits wins by far, so only the chosen fold's table is built.
    from nz_lightning.kernels import encode_plan

    calls: list[int] = []
    real = encode_plan.quantize_counts

    def counting(counts: np.ndarray, prob_bits: int) -> FreqTable:
        calls.append(len(counts))
        return real(counts, prob_bits)

    monkeypatch.setattr(encode_plan, "quantize_counts", counting)
    x = (torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    ints = x.view(torch.int16).to(torch.int64) & 0xFFFF
    widest = torch.bincount((ints >> 5) & 1023, minlength=1024).numpy()
    _, fold, _ = choose_fold(fold_histograms(widest, 2), spec_for(torch.bfloat16), x.numel(), 12)
    assert fold == 2 and calls == [1024]
