"""Fast CPU backend: numba-compiled loops, byte-identical to the torch reference.

Encoding runs each segment in reverse, 8 lanes per SIMD step (``kernels.cpu_encode``; a scalar lane loop
here for ``prob_bits < 10``). Decoding is vectorized the same way for ``prob_bits <= 12``
(``kernels.cpu_decode``); the scalar decoder here runs the 32 interleaved lanes of a segment
together (32 independent dependency chains for the CPU to overlap), merging each decoded exponent with
its sign+mantissa field and writing the float bits directly into the output buffer. Segments decode in
parallel (``numba.prange``) when numba has more than one thread; set ``NUMBA_NUM_THREADS`` or
``numba.set_num_threads`` to control it. torch's own thread count is left as it was (numba's OpenMP layer would
otherwise leave its count in the shared OpenMP runtime).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .cpu_decode import MAP_SIZE, PACKED_WIDTHS, table32, vector_table_ok
from .cpu_decode import decode_lanes as decode_lanes_vector
from .cpu_encode import VECTOR_MIN_PROB_BITS
from .cpu_encode import encode_lanes as encode_lanes_vector
from .cpu_merge import merge_fields, merge_fp16, sm_bf16, sm_fp32
from .cpu_pack import pack_sm16, pack_sm32
from .freqtable import FreqTable
from .layout import LANES_PER_SEGMENT, STATE_LOWER, effective_steps, num_segments
from .spec import FloatSpec, spec_for
from .streams import Streams

_W = LANES_PER_SEGMENT
_L = STATE_LOWER


def _bits_array(x: torch.Tensor, spec: FloatSpec) -> np.ndarray:
    """Flat numpy view of the bit patterns as uint16 / uint32 (shares memory)."""
    arr: np.ndarray = x.reshape(-1).view(spec.int_dtype).numpy()
    return arr.view(np.uint16 if spec.total_bits == 16 else np.uint32)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _histogram(bits: np.ndarray, shift: int, mask: int, alphabet: int) -> np.ndarray:  # pragma: no cover - jitted
    hist = np.zeros((4, alphabet), dtype=np.int64)
    n = bits.size
    body = n - n % 4
    for i in range(0, body, 4):
        hist[0, (bits[i] >> shift) & mask] += 1
        hist[1, (bits[i + 1] >> shift) & mask] += 1
        hist[2, (bits[i + 2] >> shift) & mask] += 1
        hist[3, (bits[i + 3] >> shift) & mask] += 1
    for i in range(body, n):
        hist[0, (bits[i] >> shift) & mask] += 1
    return hist.sum(axis=0)


def exponent_histogram(x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """Counts of each exponent symbol (int64, ``[alphabet]``)."""
    hist = _histogram(_bits_array(x, spec), spec.man_bits, spec.alphabet - 1, spec.alphabet)
    return torch.from_numpy(hist)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _encode_lanes(
    bits: np.ndarray, shift: int, mask: int, freq: np.ndarray, cum: np.ndarray, pb: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - jitted
    u = np.uint64
    n = bits.size
    seg = _W * k
    nseg = (n + seg - 1) // seg
    states = np.empty(nseg * _W, dtype=np.uint32)
    counts = np.empty(nseg * _W, dtype=np.int32)
    cap = max(n // 4, 1024)
    words = np.empty(cap, dtype=np.uint16)
    scratch = np.empty((_W, k + 1), dtype=np.uint16)
    x = np.empty(_W, dtype=np.uint64)
    pos = np.empty(_W, dtype=np.uint64)
    length = np.empty(_W, dtype=np.int64)
    top = u(32 - pb)
    upb = u(pb)
    wp = 0
    for g in range(nseg):
        base = g * seg
        rest = min(seg, n - base)
        full = rest // _W
        for j in range(_W):
            x[j] = _L
            pos[j] = k + 1
            length[j] = (rest - j + _W - 1) // _W if j < rest else 0
        for s in range((rest + _W - 1) // _W - 1, -1, -1):
            row = base + s * _W
            for jj in range(_W):
                if s >= full and s >= length[jj]:
                    continue
                lj = u(jj)  # unsigned indices: no negative-index wraparound code in the hot loop
                sym = (u(bits[u(row) + lj]) >> u(shift)) & u(mask)
                f = u(freq[sym])
                xs = x[lj]
                emit = u(xs >= (f << top))
                pj = pos[lj] - u(1)
                scratch[lj, pj] = np.uint16(xs & u(0xFFFF))
                pos[lj] = pj + u(1) - emit
                xs >>= emit << u(4)
                x32 = np.uint32(xs)
                f32 = np.uint32(f)
                q = x32 // f32
                x[lj] = (u(q) << upb) + u(x32 - q * f32) + u(cum[sym])
        for j in range(_W):
            lane = g * _W + j
            states[lane] = np.uint32(x[j])
            first = int(pos[j])
            cnt = k + 1 - first
            counts[lane] = cnt
            if wp + cnt > words.size:
                grown = np.empty(max(2 * words.size, wp + cnt), dtype=np.uint16)
                grown[:wp] = words[:wp]
                words = grown
            words[wp : wp + cnt] = scratch[j, first : k + 1]
            wp += cnt
    return states, counts, words[:wp].copy()


def encode(x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int) -> Streams:
    """rANS-encode the exponents of contiguous CPU ``x`` and pack its sign+mantissa fields."""
    bits = _bits_array(x, spec)
    freq, cum = table.dense_arrays(spec.alphabet)
    k = effective_steps(bits.size, steps)
    freq_a = freq.astype(np.uint32)
    cum_a = cum.astype(np.uint32)
    if table.prob_bits >= VECTOR_MIN_PROB_BITS:
        packed = (cum_a << np.uint32(16)) | freq_a
        states, counts, words = encode_lanes_vector(bits, spec.man_bits, spec.alphabet - 1, packed, table.prob_bits, k)
    else:
        states, counts, words = _encode_lanes(bits, spec.man_bits, spec.alphabet - 1, freq_a, cum_a, table.prob_bits, k)
    sm = pack_sm32(bits) if spec.total_bits == 32 else pack_sm16(bits, spec.man_bits, spec.sm_bits)
    return Streams(
        states=torch.from_numpy(states.view(np.int32)),
        counts=torch.from_numpy(counts),
        words=torch.from_numpy(words.view(np.int16)),
        sm=torch.from_numpy(sm),
    )


@numba.njit(inline="always", nogil=True, boundscheck=False)
def _advance(
    x: np.ndarray,
    p: np.ndarray,
    j: int,
    dtab: np.ndarray,
    words: np.ndarray,
    slot_mask: np.uint64,
    pb: np.uint64,
    lim: np.uint64,
) -> np.uint64:  # pragma: no cover - jitted
    """One rANS decoding step of lane ``j`` (state ``x[j]``, word cursor ``p[j]``); returns the slot's table entry."""
    u = np.uint64
    xs = x[j]
    e = dtab[xs & slot_mask]
    xn = (e >> u(48)) * (xs >> pb) + (e & u(0xFFFF))
    nu = u(xn < u(_L))
    pj = p[j]
    w = u(words[min(pj, lim)])
    x[j] = (xn << (nu << u(4))) | (w & (u(0) - nu))
    p[j] = pj + nu
    return e


@numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def _decode_lanes(
    out: np.ndarray,
    sm: np.ndarray,
    states: np.ndarray,
    offsets: np.ndarray,
    words: np.ndarray,
    dtab: np.ndarray,
    pb_: int,
    k: int,
    code: int,
) -> int:  # pragma: no cover - jitted
    """Decode all segments (in parallel) into ``out``; returns the number of inconsistent segments."""
    u = np.uint64
    n = out.size
    seg = _W * k
    nseg = (n + seg - 1) // seg
    pb = u(pb_)
    slot_mask = (u(1) << pb) - u(1)
    lim = u(words.size - 1)
    bad = np.zeros(nseg, dtype=np.uint8)  # per segment, not a `+=` reduction: numba's parfor pass fails on that
    for g in numba.prange(nseg):  # under Python 3.12 ("unexpected cycle in lookup()")
        base = g * seg
        rest = min(seg, n - base)
        x = np.empty(_W, dtype=np.uint64)
        p = np.empty(_W, dtype=np.uint64)
        steps_j = np.empty(_W, dtype=np.int64)
        for j in range(_W):
            x[j] = u(states[g * _W + j])
            p[j] = u(offsets[g * _W + j])
            steps_j[j] = (rest - j + _W - 1) // _W if j < rest else 0
        full = rest // _W
        nsteps = (rest + _W - 1) // _W
        # One loop per dtype (the merge differs); the rANS step itself is shared and inlined.
        if code == 0:  # exponent bits only
            for s in range(nsteps):
                for j in range(_W):
                    if s < full or s < steps_j[j]:
                        e = _advance(x, p, j, dtab, words, slot_mask, pb, lim)
                        out[u(base + s * _W + j)] = (e >> u(16)) & u(0xFFFFFFFF)
        elif code == 1:
            for s in range(nsteps):
                for j in range(_W):
                    if s < full or s < steps_j[j]:
                        e = _advance(x, p, j, dtab, words, slot_mask, pb, lim)
                        r = u(base + s * _W + j)
                        out[r] = sm_bf16(sm, r) | ((e >> u(16)) & u(0xFFFFFFFF))
        elif code == 2:  # each row of 32 exponents, then its 11-bit fields merged 8 at a time (11 whole bytes)
            for s in range(nsteps):
                for j in range(_W):
                    if s < full or s < steps_j[j]:
                        e = _advance(x, p, j, dtab, words, slot_mask, pb, lim)
                        out[u(base + s * _W + j)] = (e >> u(16)) & u(0xFFFFFFFF)
                if s < full:
                    merge_fp16(out, sm, base + s * _W, _W)
            if rest > full * _W:
                merge_fp16(out, sm, base + full * _W, rest - full * _W)
        else:
            for s in range(nsteps):
                for j in range(_W):
                    if s < full or s < steps_j[j]:
                        e = _advance(x, p, j, dtab, words, slot_mask, pb, lim)
                        r = u(base + s * _W + j)
                        out[r] = sm_fp32(sm, r) | ((e >> u(16)) & u(0xFFFFFFFF))
        err = 0
        for j in range(_W):
            if x[j] != u(_L) or p[j] != u(offsets[g * _W + j + 1]):
                err = 1
        bad[g] = err
    return int(bad.sum())


def decode_tables(table: FreqTable, spec: FloatSpec, device: torch.device) -> torch.Tensor:
    """Per-slot decoder entries. For ``prob_bits <= 12`` and at most 256 present symbols: 32-bit entries of the
    vectorized decoder and its symbol map (int32, :func:`kernels.cpu_decode.table32`). Otherwise 64-bit entries of
    the scalar decoder (int64)::

        freq << 48 | (symbol << man_bits) << 16 | (slot - cum)

    One lookup per decoded symbol gives the frequency, the exponent already shifted into place, and the bias.
    """
    if vector_table_ok(table):
        return torch.from_numpy(table32(table, spec.alphabet).view(np.int32))
    m = 1 << table.prob_bits
    freq_i, cum_i = table.dense_arrays(spec.alphabet)
    freq = freq_i.astype(np.uint64)
    cum = cum_i.astype(np.uint64)
    lut = np.repeat(np.asarray(table.symbols, dtype=np.uint64), table.freqs)
    bias = np.arange(m, dtype=np.uint64) - cum[lut]
    entries = (freq[lut] << np.uint64(48)) | ((lut << np.uint64(spec.man_bits)) << np.uint64(16)) | bias
    return torch.from_numpy(entries.view(np.int64))


def decode(
    streams: Streams,
    spec: FloatSpec,
    tables: torch.Tensor,
    prob_bits: int,
    steps: int,
    out: torch.Tensor,
    *,
    fields: bool = True,
) -> None:
    """Decode into the flat contiguous CPU float tensor ``out`` (``tables`` from :func:`decode_tables`).

    With ``fields=False`` only the exponent bits are written and ``streams.sm`` is not read (the lossy mode's
    carrier decode).

    Raises:
        ValueError: A lane reads past its words, or does not end in the initial state with all words used.
    """
    n = out.numel()
    counts = streams.counts.numpy()
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    words = streams.words.numpy().view(np.uint16)
    if words.size == 0:
        words = np.zeros(1, dtype=np.uint16)
    k = effective_steps(n, steps)
    if streams.states.numel() != _W * num_segments(n, k):
        raise ValueError("corrupt blob: lane count does not match the tensor size")
    bits = _bits_array(out, spec)
    args = (bits, streams.sm.numpy(), streams.states.numpy().view(np.uint32), offsets, words)
    vector = tables.dtype == torch.int32  # 32-bit entries: the vectorized decoder (see decode_tables)
    native = spec == spec_for(spec.dtype)
    # Layouts the decode loops merge themselves; any other (folded fields of other widths, or folded fields in the
    # scalar decoder) is decoded as exponent bits and merged afterwards.
    width = spec.sm_bits
    fused_merge = native or (vector and (width == 8 or width in PACKED_WIDTHS[spec.total_bits]))
    code = spec.code if fields and fused_merge else 0
    torch_threads = torch.get_num_threads()
    if vector:
        if tables.numel() != (1 << prob_bits) + MAP_SIZE + 1:
            raise ValueError(f"decoder table of {tables.numel()} entries does not match prob_bits {prob_bits}")
        bad = decode_lanes_vector(*args, tables.numpy().view(np.uint32), prob_bits, k, code, spec.man_bits)
    else:
        bad = _decode_lanes(*args, tables.numpy().view(np.uint64), prob_bits, k, code)
    if torch.get_num_threads() != torch_threads:
        # numba's OpenMP threading layer sets the process-wide OpenMP thread count (which torch shares) to its own
        # at a parallel launch; give torch its count back, or its later ops (their summation order) would change
        torch.set_num_threads(torch_threads)
    if fields and not fused_merge:
        merge_fields(bits, args[1], 0, n, spec.man_bits, spec.total_bits)
    if bad:
        raise ValueError(f"corrupt blob: {bad} segment(s) of rANS lanes do not decode consistently")
