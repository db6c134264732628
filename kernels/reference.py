"""Pure-torch reference backend: the oracle every other backend must match byte for byte.

Vectorized over lanes (one torch op per decoding step for all lanes); slow but simple and device-agnostic.
"""

from __future__ import annotations

import torch

from .backends import FunctionBackend
from .freqtable import FreqTable
from .layout import LANES_PER_SEGMENT, STATE_LOWER, WORD_BITS, effective_steps, lane_lengths, num_segments
from .spec import FloatSpec
from .streams import Streams, word_offsets

_MASK32 = (1 << 32) - 1


def to_bits(x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """Unsigned bit patterns of a contiguous float tensor as int64, flattened."""
    raw = x.reshape(-1).view(spec.int_dtype).to(torch.int64)
    return raw & ((1 << spec.total_bits) - 1)


def from_bits(bits: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """Inverse of :func:`to_bits`: int64 bit patterns to a flat float tensor."""
    signed = bits - ((bits >> (spec.total_bits - 1)) << spec.total_bits)
    return signed.to(spec.int_dtype).view(spec.dtype)


def split_fields(bits: torch.Tensor, spec: FloatSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponent symbols and sign+mantissa fields (both int64) of bit patterns."""
    m = spec.man_bits
    exp = (bits >> m) & (spec.alphabet - 1)
    sm = ((bits >> (spec.total_bits - 1)) << m) | (bits & ((1 << m) - 1))
    return exp, sm


def merge_fields(exp: torch.Tensor, sm: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """Bit patterns (int64) from exponent symbols and sign+mantissa fields."""
    m = spec.man_bits
    return ((sm >> m) << (spec.total_bits - 1)) | (exp << m) | (sm & ((1 << m) - 1))


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``width``-bit values LSB-first: value ``i`` occupies stream bits ``[i*width, (i+1)*width)``."""
    n = values.numel()
    nbytes = (n * width + 7) // 8
    if width % 8 == 0:
        per = width // 8
        return values.reshape(-1, 1).view(torch.uint8).reshape(n, 8)[:, :per].reshape(-1).clone()
    j = torch.arange(nbytes, dtype=torch.int64, device=values.device)
    first = (8 * j) // width
    out = torch.zeros(nbytes, dtype=torch.int64, device=values.device)
    for t in range(-(-8 // width) + 1):
        i = first + t
        valid = (i < n) & (i * width < 8 * j + 8)
        v = values[torch.clamp(i, max=max(n - 1, 0))]
        shift = i * width - 8 * j
        part = torch.where(shift >= 0, v << shift.clamp(min=0), v >> (-shift).clamp(min=0))
        out |= torch.where(valid, part & 0xFF, 0)
    return out.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` values (int64) from a packed uint8 stream."""
    data = packed.to(torch.int64)
    if width % 8 == 0:
        per = width // 8
        cols = data.reshape(n, per)
        return sum((cols[:, k] << (8 * k) for k in range(per)), torch.zeros(n, dtype=torch.int64, device=data.device))
    i = torch.arange(n, dtype=torch.int64, device=data.device)
    first = (i * width) // 8
    out = torch.zeros(n, dtype=torch.int64, device=data.device)
    for t in range((width + 7) // 8 + 1):
        j = first + t
        valid = (j < data.numel()) & (8 * j < i * width + width)
        b = data[torch.clamp(j, max=max(data.numel() - 1, 0))]
        shift = 8 * j - i * width
        part = torch.where(shift >= 0, b << shift.clamp(min=0), b >> (-shift).clamp(min=0))
        out |= torch.where(valid, part, 0)
    return out & ((1 << width) - 1)


def _lane_matrix(flat: torch.Tensor, n: int, steps: int) -> torch.Tensor:
    """Arrange per-symbol values as ``[num_lanes, steps]`` (zero-padded) following the lane layout."""
    nseg = num_segments(n, steps)
    padded = torch.zeros(nseg * LANES_PER_SEGMENT * steps, dtype=flat.dtype, device=flat.device)
    padded[:n] = flat
    return padded.reshape(nseg, steps, LANES_PER_SEGMENT).permute(0, 2, 1).reshape(-1, steps)


def _from_lane_matrix(mat: torch.Tensor, n: int, steps: int) -> torch.Tensor:
    """Inverse of :func:`_lane_matrix`."""
    nseg = mat.shape[0] // LANES_PER_SEGMENT
    return mat.reshape(nseg, LANES_PER_SEGMENT, steps).permute(0, 2, 1).reshape(-1)[:n]


def exponent_histogram(x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """Counts of each exponent symbol (int64, ``[alphabet]``)."""
    exp, _ = split_fields(to_bits(x, spec), spec)
    return torch.bincount(exp, minlength=spec.alphabet)


def encode(x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int) -> Streams:
    """rANS-encode the exponents of contiguous ``x`` and pack its sign+mantissa fields."""
    n = x.numel()
    device = x.device
    exp, sm = split_fields(to_bits(x, spec), spec)
    freq_l, cum_l = table.dense(spec.alphabet)
    freq = torch.tensor(freq_l, dtype=torch.int64, device=device)
    cum = torch.tensor(cum_l, dtype=torch.int64, device=device)
    pb = table.prob_bits
    k = effective_steps(n, steps)
    sym = _lane_matrix(exp, n, k)
    lengths = lane_lengths(n, k, device)
    nl = sym.shape[0]
    x_state = torch.full((nl,), STATE_LOWER, dtype=torch.int64, device=device)
    emitted = torch.zeros((nl, k), dtype=torch.bool, device=device)
    words = torch.zeros((nl, k), dtype=torch.int64, device=device)
    for s in range(k - 1, -1, -1):
        active = lengths > s
        f = freq[sym[:, s]]
        c = cum[sym[:, s]]
        emit = active & (x_state >= (f << (32 - pb)))
        emitted[:, s] = emit
        words[:, s] = x_state & 0xFFFF
        x_state = torch.where(emit, x_state >> WORD_BITS, x_state)
        fs = torch.clamp(f, min=1)
        coded = ((x_state // fs) << pb) + (x_state % fs) + c
        x_state = torch.where(active, coded, x_state)
    flat_words = words[emitted]
    return Streams(
        states=_as_int32(x_state),
        counts=emitted.sum(1).to(torch.int32),
        words=(flat_words - ((flat_words >> 15) << 16)).to(torch.int16),
        sm=pack_bits(sm, spec.sm_bits),
    )


def _as_int32(u32: torch.Tensor) -> torch.Tensor:
    return (u32 - ((u32 >> 31) << 32)).to(torch.int32)


def decode(
    streams: Streams, spec: FloatSpec, tables: torch.Tensor, prob_bits: int, steps: int, out: torch.Tensor
) -> None:
    """Decode into the flat contiguous float tensor ``out`` (``numel`` = n; ``tables`` from
    :meth:`CodecBackend.decode_tables`) and check it (one host sync).

    Raises:
        ValueError: A lane reads past its words, or does not end in the initial state with all words used.
    """
    _decode(streams, spec, tables, prob_bits, steps, out, check=True)


def decode_flagged(
    streams: Streams,
    spec: FloatSpec,
    tables: torch.Tensor,
    prob_bits: int,
    steps: int,
    out: torch.Tensor,
    flag: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`decode` without the host check: returns a boolean scalar, true when the data was inconsistent (and
    ``out`` holds garbage), or ORs it into the int32 ``flag`` and returns ``None``."""
    bad = _decode(streams, spec, tables, prob_bits, steps, out, check=False)
    if flag is None:
        return bad
    flag.bitwise_or_(bad.to(flag.dtype))
    return None


def _decode(
    streams: Streams,
    spec: FloatSpec,
    tables: torch.Tensor,
    prob_bits: int,
    steps: int,
    out: torch.Tensor,
    *,
    check: bool,
) -> torch.Tensor:
    n = out.numel()
    device = out.device
    m = 1 << prob_bits
    alphabet = spec.alphabet
    tab = tables.to(torch.int64)
    lut, freq, cum = tab[:m], tab[m : m + alphabet], tab[m + alphabet :]
    k = effective_steps(n, steps)
    lengths = lane_lengths(n, k, device)
    x_state = streams.states.to(torch.int64) & _MASK32
    counts = streams.counts.to(torch.int64)
    offsets = word_offsets(streams.counts)[:-1]
    words = streams.words.to(torch.int64) & 0xFFFF
    nw = words.numel()
    ptr = torch.zeros_like(counts)
    overrun = torch.zeros_like(counts, dtype=torch.bool)
    sym = torch.zeros((x_state.numel(), k), dtype=torch.int64, device=device)
    for s in range(k):
        active = lengths > s
        slot = x_state & (m - 1)
        sy = lut[slot]
        nxt = freq[sy] * (x_state >> prob_bits) + slot - cum[sy]
        need = active & (nxt < STATE_LOWER)
        overrun |= need & (ptr >= counts)
        w = words[torch.clamp(offsets + ptr, max=max(nw - 1, 0))] if nw else torch.zeros_like(ptr)
        nxt = torch.where(need, (nxt << WORD_BITS) | w, nxt)
        x_state = torch.where(active, nxt, x_state)
        ptr += need.to(torch.int64)
        sym[:, s] = sy
    bad = overrun.any() | (x_state != STATE_LOWER).any() | (ptr != counts).any()
    if check and bool(bad):
        raise ValueError("corrupt blob: rANS lanes do not decode consistently")
    exp = _from_lane_matrix(sym, n, k)
    sm = unpack_bits(streams.sm, spec.sm_bits, n)
    out.copy_(from_bits(merge_fields(exp, sm, spec), spec))
    return bad


BACKEND = FunctionBackend("torch", exponent_histogram, encode, decode, decode_flagged)
"""The ``"torch"`` entry of the backend registry."""
