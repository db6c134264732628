"""Static per-tensor frequency tables: quantization of symbol counts to a power-of-two total."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FreqTable:
    """A quantized frequency table: present symbols (ascending) and their frequencies summing to 2^prob_bits.

    Attributes:
        prob_bits: log2 of the frequency total.
        symbols: Present symbols, strictly ascending.
        freqs: Frequency of each present symbol, each >= 1.
    """

    prob_bits: int
    symbols: tuple[int, ...]
    freqs: tuple[int, ...]

    def dense(self, alphabet: int) -> tuple[list[int], list[int]]:
        """Frequencies and cumulative starts indexed by symbol (0 for absent symbols)."""
        freq, cum = self.dense_arrays(alphabet)
        return freq.tolist(), cum.tolist()

    def dense_arrays(self, alphabet: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`dense` as int64 numpy arrays (no Python loop over the alphabet: folded alphabets hold 1024)."""
        freq = np.zeros(alphabet, dtype=np.int64)
        freq[np.asarray(self.symbols, dtype=np.int64)] = self.freqs
        cum: np.ndarray = np.cumsum(freq) - freq
        return freq, cum

    def decode_tables(self, alphabet: int, device: torch.device | str) -> torch.Tensor:
        """Decoder tables packed in one int32 tensor: ``[lut (2^prob_bits) | freq (alphabet) | cum (alphabet)]``."""
        return torch.from_numpy(self.decode_tables_array(alphabet)).to(device)

    def decode_tables_array(self, alphabet: int) -> np.ndarray:
        """:meth:`decode_tables` as an int32 numpy array on the host (numpy's ``repeat`` builds the lookup table in
        microseconds, where ``torch.repeat_interleave`` on a CPU took milliseconds)."""
        freq, cum = self.dense_arrays(alphabet)
        lut = np.repeat(np.asarray(self.symbols, dtype=np.int32), np.asarray(self.freqs, dtype=np.int64))
        return np.concatenate([lut, freq.astype(np.int32), cum.astype(np.int32)])

    def cost_bits(self, counts: Sequence[int] | np.ndarray) -> float:
        """Ideal coded size in bits of symbols with these counts under this table."""
        # Summed over the table's symbols in ascending order: the present symbols' terms, in the order (and so with
        # the float rounding) of a sum over the whole histogram; absent symbols contribute nothing.
        pb = self.prob_bits
        if isinstance(counts, np.ndarray):  # a folded histogram has up to 1024 bins: read only the table's symbols
            at = counts[list(self.symbols)].tolist()
            return sum(c * (pb - math.log2(f)) for c, f in zip(at, self.freqs, strict=True) if c)
        return sum(counts[s] * (pb - math.log2(f)) for s, f in zip(self.symbols, self.freqs, strict=True) if counts[s])


def entropy_bits(counts: list[int]) -> float:
    """Shannon entropy (bits per symbol) of a histogram."""
    n = sum(counts)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in counts if c)


def quantize_counts(counts: Sequence[int] | np.ndarray, prob_bits: int) -> FreqTable:
    """Quantize a histogram to frequencies summing to ``2**prob_bits``, every present symbol >= 1.

    Deterministic (pure integer/float Python, ties broken by symbol), so every backend gets the same table. A numpy
    histogram gives the same table as its list (only the present symbols are visited in Python).
    Starts from proportional rounding, then moves single units where they cost the fewest coded bits.

    Raises:
        ValueError: More symbols are present than ``2**prob_bits`` can hold, or the histogram is empty.
    """
    total = 1 << prob_bits
    cnt: Sequence[int] | dict[int, int]
    if isinstance(counts, np.ndarray):  # the present symbols found by numpy, their counts as Python ints
        nonzero = np.flatnonzero(counts > 0)
        present = nonzero.tolist()
        cnt = dict(zip(present, counts[nonzero].tolist(), strict=True))
    else:
        cnt = counts
        present = [s for s, c in enumerate(counts) if c > 0]
    if not present:
        raise ValueError("cannot build a frequency table from an empty histogram")
    if len(present) > total:
        raise ValueError(f"{len(present)} distinct symbols do not fit a 2^{prob_bits} frequency table")
    n = sum(cnt[s] for s in present)
    freq = {s: max(1, (cnt[s] * total + n // 2) // n) for s in present}
    diff = total - sum(freq.values())
    if diff > 0:
        # Give units to the symbols whose coded size shrinks the most.
        gain = [(-cnt[s] * math.log2((freq[s] + 1) / freq[s]), s) for s in present]
        heapq.heapify(gain)
        for _ in range(diff):
            _, s = heapq.heappop(gain)
            freq[s] += 1
            heapq.heappush(gain, (-cnt[s] * math.log2((freq[s] + 1) / freq[s]), s))
    elif diff < 0:
        # Take units from the symbols whose coded size grows the least (never below 1).
        loss = [(cnt[s] * math.log2(freq[s] / (freq[s] - 1)), s) for s in present if freq[s] > 1]
        heapq.heapify(loss)
        for _ in range(-diff):
            _, s = heapq.heappop(loss)
            freq[s] -= 1
            if freq[s] > 1:
                heapq.heappush(loss, (cnt[s] * math.log2(freq[s] / (freq[s] - 1)), s))
    return FreqTable(prob_bits, tuple(present), tuple(freq[s] for s in present))
