"""The vectorized CPU decoder's 32-bit table (``kernels/cpu_decode.py``): one entry per slot, then a symbol map.

Layout (uint32): ``2^prob_bits`` entries ``(freq - 1) << 20 | bias << 8 | r`` with ``bias = slot - cum``, then 256
symbols ``map[r]``, then the mode. In base mode (0: the present symbols span at most 256 values, as for weights
without outliers) ``r = symbol - base`` and ``map[r] = base + r``, so the decoder adds ``map[0]`` and reads no map.
In map mode (1: a wider span, as when one exact zero sits below a Gaussian's exponents and folding multiplies the
span by four) ``r`` is the symbol's rank among the present symbols and the decoder gathers ``map[r]``. Either way
at most 256 symbols may be present and ``prob_bits <= 12`` (``freq - 1`` and the bias take 12 bits each).
"""

from __future__ import annotations

import numba
import numpy as np

from .freqtable import FreqTable

VECTOR_MAX_PROB_BITS = 12
"""Entries pack ``freq - 1`` and the bias in 12 bits each."""
MAP_SIZE = 256
"""Entries after the slots: the symbol map (the rank or offset in an entry has 8 bits)."""
MODE_BASE, MODE_MAP = 0, 1
"""The last value of the table: symbols are ``map[0] + r`` (base) or ``map[r]`` (map)."""


def vector_table_ok(table: FreqTable) -> bool:
    """Whether :func:`table32` can hold ``table``: ``prob_bits <= 12`` and at most 256 present symbols."""
    return table.prob_bits <= VECTOR_MAX_PROB_BITS and len(table.symbols) <= MAP_SIZE


def table32(table: FreqTable, alphabet: int) -> np.ndarray:
    """The decoder table of the module docstring (uint32, ``2^prob_bits + 257`` values).

    ``alphabet`` is not needed by the layout; it is kept for the callers' signature.

    Raises:
        ValueError: The table does not fit (see :func:`vector_table_ok`) or is malformed.
    """
    if not vector_table_ok(table):
        raise ValueError(
            f"32-bit decoder entries need prob_bits <= {VECTOR_MAX_PROB_BITS} and at most {MAP_SIZE} symbols"
        )
    if len(table.freqs) != len(table.symbols) or not table.symbols:
        raise ValueError("invalid frequency table: one frequency per symbol, at least one symbol")
    symbols = np.asarray(table.symbols, dtype=np.int64)
    freqs = np.asarray(table.freqs, dtype=np.int64)
    out: np.ndarray = _fill(symbols, freqs, table.prob_bits)  # rebuilt per decode of small tensors: jitted
    if out.size == 0:  # _fill checks the table as it goes (no Python loop per decode)
        raise ValueError("invalid frequency table: frequencies >= 1 summing to 2^prob_bits, symbols ascending")
    return out


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _fill(symbols: np.ndarray, freqs: np.ndarray, prob_bits: int) -> np.ndarray:  # pragma: no cover - jitted
    """The table, or an empty array if the frequencies are not all >= 1 summing to ``2^prob_bits`` or the symbols
    are not ascending from 0 or more (checked before each write: the writes are unchecked)."""
    total = 1 << prob_bits
    out = np.empty(total + MAP_SIZE + 1, dtype=np.uint32)
    base = symbols[0]
    nsym = symbols.size
    mapped = symbols[nsym - 1] - base >= MAP_SIZE
    slot = 0
    for i in range(nsym):
        f = freqs[i]
        if f < 1 or slot + f > total or (symbols[i] <= symbols[i - 1] if i else symbols[0] < 0):
            return np.empty(0, dtype=np.uint32)
        high = ((f - 1) << 20) | (i if mapped else symbols[i] - base)
        for b in range(f):
            out[slot + b] = np.uint32(high | (b << 8))
        slot += f
    if slot != total:
        return np.empty(0, dtype=np.uint32)
    for r in range(MAP_SIZE):
        if mapped:
            out[total + r] = np.uint32(symbols[min(r, nsym - 1)])
        else:
            out[total + r] = np.uint32(base + r)
    out[total + MAP_SIZE] = np.uint32(MODE_MAP if mapped else MODE_BASE)
    return out
