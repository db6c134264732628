"""The compact frequency-table section of version-3 blobs (docs/FORMAT.md §1.4): runs of symbols, varint frequencies.

Weight-like tensors use a few contiguous ranges of exponent symbols, so the present symbols are written as runs
(a gap and a length each) instead of one or two bytes per symbol, and the frequencies as LEB128 varints (one byte
below 128, which most tail symbols are). For a 4096-element tensor this halves the table; for folded bf16 symbols
(9-10 bits, twice to four times as many present) it is what keeps folding worth its table.
"""

from __future__ import annotations

from .freqtable import FreqTable

MAX_VARINT_BYTES = 3
"""Varints here hold values below 2^21 (frequencies up to 2^15, symbol gaps and lengths up to 2^10)."""


def varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant first, high bit set on every byte but the last."""
    if not 0 <= value < 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError(f"varint value {value} out of range")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def runs(symbols: tuple[int, ...]) -> list[tuple[int, int]]:
    """Maximal runs ``(first, length)`` of consecutive values in a strictly ascending tuple."""
    out: list[tuple[int, int]] = []
    for s in symbols:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


def encode_table(table: FreqTable) -> bytes:
    """The table section: ``varint r``, ``r x (varint gap, varint length - 1)``, ``t x varint freq``."""
    parts = [varint(len(rs := runs(table.symbols)))]
    end = 0
    for first, length in rs:
        parts += [varint(first - end), varint(length - 1)]
        end = first + length
    parts += [varint(f) for f in table.freqs]
    return b"".join(parts)


def _varint_len(value: int) -> int:
    return 1 if value < 1 << 7 else 2 if value < 1 << 14 else 3


def table_nbytes(table: FreqTable) -> int:
    """Length of :func:`encode_table`'s output (computed without building it)."""
    rs = runs(table.symbols)
    size, end = _varint_len(len(rs)), 0
    for first, length in rs:
        size += _varint_len(first - end) + _varint_len(length - 1)
        end = first + length
    return size + sum(1 if f < 1 << 7 else 2 if f < 1 << 14 else 3 for f in table.freqs)


class _Cursor:
    def __init__(self, data: memoryview, pos: int) -> None:
        self.data, self.pos = data, pos

    def varint(self, what: str) -> int:
        value = 0
        for i in range(MAX_VARINT_BYTES):
            if self.pos >= len(self.data):
                raise ValueError(f"truncated blob: {what} runs past the end")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i:
                    raise ValueError(f"corrupt blob: {what} is not a minimal varint")
                return value
        raise ValueError(f"corrupt blob: {what} is a varint longer than {MAX_VARINT_BYTES} bytes")


def decode_table(data: memoryview, pos: int, nsym: int, prob_bits: int, alphabet: int) -> tuple[FreqTable, int]:
    """Parse and validate a table section starting at ``data[pos]``; returns the table and the position after it.

    Raises:
        ValueError: Truncated, non-minimal varints, runs that are empty, overlap, touch (not maximal) or leave the
            alphabet, a symbol count other than ``nsym``, or frequencies below 1 or not summing to ``2^prob_bits``.
    """
    if not 1 <= nsym <= alphabet:
        raise ValueError(f"corrupt blob: {nsym} table symbols for an alphabet of {alphabet}")
    cur = _Cursor(data, pos)
    nruns = cur.varint("table run count")
    if not 1 <= nruns <= nsym:
        raise ValueError(f"corrupt blob: {nruns} symbol runs for {nsym} symbols")
    symbols: list[int] = []
    end = 0
    for i in range(nruns):
        gap, length = cur.varint("table run gap"), cur.varint("table run length") + 1
        if i and gap < 1:
            raise ValueError("corrupt blob: table symbol runs touch (runs must be maximal)")
        first = end + gap
        end = first + length
        if end > alphabet or len(symbols) + length > nsym:
            raise ValueError("corrupt blob: table symbol runs leave the alphabet or exceed the symbol count")
        symbols.extend(range(first, end))
    if len(symbols) != nsym:
        raise ValueError(f"corrupt blob: table runs hold {len(symbols)} symbols, the header says {nsym}")
    freqs = [cur.varint("table frequency") for _ in range(nsym)]
    if min(freqs) < 1 or sum(freqs) != 1 << prob_bits:
        raise ValueError(f"corrupt blob: table frequencies do not sum to 2^{prob_bits}")
    return FreqTable(prob_bits, tuple(symbols), tuple(freqs)), cur.pos
