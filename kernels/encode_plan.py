"""The lossless encoder's plan: the exponent histogram it reads from the device (:func:`exponent_counts`) and the
choices it makes from it on the host: fold, frequency table and word-stream bound.

Every backend shares the choices (deterministic Python over the histogram's counts), so every backend makes the same
ones and writes the same bytes.
"""

from __future__ import annotations

import math

import torch

from . import blob_table
from .backends import CodecBackend
from .freqtable import FreqTable, quantize_counts
from .spec import FloatSpec, folded, spec_for

FOLD_BITS = {torch.bfloat16: 2, torch.float16: 3}
"""Most top mantissa bits the lossless encoder tries coding together with the exponent, per dtype: it takes one
histogram of the widest layout and keeps whichever fold (0 up to this) its size estimate prefers. bf16 symbols grow
from 8 to at most 10 bits, fp16 from 5 to 8 (docs/FORMAT.md §1.1). fp32 is not folded (decoders accept it)."""


def fold_histograms(widest: list[int], bits: int) -> list[list[int]]:
    """Histograms of every fold from 0 to ``bits``, from the histogram of the widest (``bits``-folded) layout.

    Entry ``f`` counts the symbols ``s >> (bits - f)`` (the exponent and its top ``f`` mantissa bits).
    """
    out = [widest]
    for _ in range(bits):
        prev = out[0]
        out.insert(0, [prev[i] + prev[i + 1] for i in range(0, len(prev), 2)])
    return out


def choose_fold(layouts: list[list[int]], spec: FloatSpec, n: int, prob_bits: int) -> tuple[float, int, FreqTable]:
    """The fold whose blob the size estimate says is smallest: ``(estimated bytes, fold, table)``.

    The estimate of a fold is its table section plus the ideal coded size of its symbols under the quantized
    table plus its raw sign+mantissa fields (lane states and counts are the same for every fold). Folds with more
    present symbols than ``2^prob_bits`` cannot be coded and are skipped (fold 0 always fits: at most 256 symbols).
    """
    best: tuple[float, int, FreqTable] | None = None
    for bits, cnt in enumerate(layouts):
        if sum(1 for c in cnt if c) > 1 << prob_bits:
            continue
        table = quantize_counts(cnt, prob_bits)
        size = blob_table.table_nbytes(table) + table.cost_bits(cnt) / 8 + n * folded(spec, bits).sm_bits / 8
        if best is None or size < best[0]:
            best = (size, bits, table)
    assert best is not None
    return best


def word_bound(table: FreqTable, counts: list[int], n: int) -> int:
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
