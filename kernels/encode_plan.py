"""The lossless encoder's plan: the exponent histogram it reads from the device (:func:`exponent_counts`) and the
choices it makes from it on the host: fold, frequency table and word-stream bound.

Every backend shares the choices (deterministic Python over the histogram's counts), so every backend makes the same
ones and writes the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from . import blob_table
from .backends import CodecBackend
from .freqtable import FreqTable, quantize_counts
from .spec import FloatSpec, folded, spec_for

FOLD_BITS = {torch.bfloat16: 2, torch.float16: 3}
"""Most top mantissa bits the lossless encoder tries coding together with the exponent, per dtype: it takes one
histogram of the widest layout and keeps whichever fold (0 up to this) its size estimate prefers. bf16 symbols grow
from 8 to at most 10 bits, fp16 from 5 to 8 (docs/FORMAT.md §1.1). fp32 is not folded (decoders accept it)."""


def fold_histograms(widest: Sequence[int] | np.ndarray, bits: int) -> list[np.ndarray]:
    """Histograms of every fold from 0 to ``bits``, from the histogram of the widest (``bits``-folded) layout.

    Entry ``f`` counts the symbols ``s >> (bits - f)`` (the exponent and its top ``f`` mantissa bits), as int64 numpy
    arrays (a folded histogram has up to 1024 bins: summed by numpy, not a Python loop).
    """
    out = [np.asarray(widest, dtype=np.int64)]
    for _ in range(bits):
        out.insert(0, out[0].reshape(-1, 2).sum(axis=1))
    return out


def choose_fold(
    layouts: Sequence[Sequence[int] | np.ndarray], spec: FloatSpec, n: int, prob_bits: int
) -> tuple[float, int, FreqTable]:
    """The fold whose blob the size estimate says is smallest: ``(estimated bytes, fold, table)``.

    The estimate of a fold is its table section plus the ideal coded size of its symbols under the quantized
    table plus its raw sign+mantissa fields (lane states and counts are the same for every fold). Folds with more
    present symbols than ``2^prob_bits`` cannot be coded and are skipped (fold 0 always fits: at most 256 symbols).
    Ties go to the fewest folded bits.

    Quantizing a table is Python work, so folds are visited in the order of a lower bound on their estimate (the
    histogram's entropy, which no table's ideal cost goes below, one byte per present symbol plus three for the table,
    and the raw fields), and a fold whose bound already exceeds the best estimate found is not quantized: the choice
    is the one an exhaustive search makes.
    """
    candidates = []
    for bits, cnt in enumerate(layouts):
        counts = np.asarray(cnt, dtype=np.int64)
        present = np.count_nonzero(counts)
        if present > 1 << prob_bits:
            continue
        raw_fields = n * folded(spec, bits).sm_bits / 8
        candidates.append((_entropy_bytes(counts) + present + 3 + raw_fields, bits, counts, raw_fields))
    best: tuple[float, int, FreqTable] | None = None
    for low, bits, counts, raw_fields in sorted(candidates, key=lambda c: (c[0], c[1])):
        if best is not None and low * (1 - 1e-9) > best[0]:
            break  # this fold and every later one (larger bounds) cost more than the best
        table = quantize_counts(counts, prob_bits)
        size = blob_table.table_nbytes(table) + table.cost_bits(counts) / 8 + raw_fields
        if best is None or (size, bits) < (best[0], best[1]):
            best = (size, bits, table)
    assert best is not None
    return best


def _entropy_bytes(counts: np.ndarray) -> float:
    """``sum(c * log2(total / c)) / 8``: the least any frequency table can code these symbols in (Gibbs)."""
    c = counts[counts > 0].astype(np.float64)
    return float((c * np.log2(c.sum() / c)).sum()) / 8


def word_bound(table: FreqTable, counts: Sequence[int] | np.ndarray, n: int) -> int:
    """An upper bound on the rANS words of ``n`` symbols with these counts under ``table`` (every lane layout).

    A lane starts in state ``L = 2^16`` and ends in a state ``>= L``; each word it emits takes 16 bits off
    ``log2(state)``, and coding a symbol of frequency ``f`` adds at most ``p - log2(f) + log2(1 + 2^(p-16))`` (the
    state is at least ``f * 2^(16-p)`` when it is coded). So the words number less than the table's ideal cost
    plus ``n * log2(1 + 2^(p-16))`` bits, over 16 (about 0.5% above the ideal at ``p = 12``); a relative 1e-9 and
    one word of margin cover float rounding.
    """
    slack = n * math.log2(1 + 2.0 ** (table.prob_bits - 16))
    return min(n, int((table.cost_bits(counts) + slack) * (1 + 1e-9) / 16) + 1)


def exponent_counts(x: torch.Tensor, impl: CodecBackend, *, uniform_flag: bool) -> torch.Tensor:
    """The lossless encoder's input from the device: the histogram of the widest fold of contiguous ``x`` (int64, on
    ``x``'s device), followed, if ``uniform_flag``, by 1 if every element of ``x`` has the same bit pattern, else 0."""
    spec = spec_for(x.dtype)
    counts = impl.exponent_histogram(x, folded(spec, FOLD_BITS.get(x.dtype, 0))).to(torch.int64)
    if not uniform_flag:
        return counts
    ints = x.reshape(-1).view(spec.int_dtype)
    return torch.cat([counts, (ints == ints[0]).all().to(torch.int64).reshape(1)])
