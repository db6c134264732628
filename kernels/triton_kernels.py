"""Triton kernels of the codec (see ``kernels/triton_backend.py`` for the host side and ``kernels/reference.py`` for
the specification they reproduce bit for bit).

Conventions shared by every kernel:

* Float values are read and written through signed integer views of the same width (int16 / int32); bit
  manipulation is done on int32 / uint32 values only (no float arithmetic, which also keeps the kernels exact in
  the Triton interpreter, where bf16 arithmetic is broken).
* Every index is int64 so that tensors with 2^31 elements or more work.
* rANS states are uint32; the renormalization test ``x >= f << (32 - PB)`` is evaluated as
  ``(x >> (32 - PB)) >= f``, which is equivalent and does not overflow when ``f == 2^PB``.
* Lane layout: lane ``l`` is lane ``j = l % 32`` of segment ``g = l // 32``; its symbol at step ``s`` is element
  ``g * 32 * k + s * 32 + j``, and it holds a symbol at that step iff that index is ``< n``.
"""

import triton
import triton.language as tl

_LANES_PER_SEGMENT: tl.constexpr = tl.constexpr(32)
_STATE_LOWER: tl.constexpr = tl.constexpr(1 << 16)


@triton.jit
def _sm_field(bits, MAN_BITS: tl.constexpr, TOTAL_BITS: tl.constexpr):
    """Sign+mantissa field (int32) of float bit patterns loaded through a signed int view (int32 values)."""
    sign = (bits >> (TOTAL_BITS - 1)) & 1
    return (sign << MAN_BITS) | (bits & ((1 << MAN_BITS) - 1))


@triton.jit
def histogram_kernel(
    x_ptr,
    part_ptr,
    n,
    num_blocks,
    MAN_BITS: tl.constexpr,
    ALPHABET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-program exponent histograms: program ``p`` writes int32 counts to ``part[p, :ALPHABET]``.

    Programs stride over blocks of ``BLOCK`` elements (block ``b`` goes to program ``b % num_programs``).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([ALPHABET], dtype=tl.int32)
    start = pid.to(tl.int64) * BLOCK
    stride = nprog.to(tl.int64) * BLOCK
    for _ in range(pid, num_blocks, nprog):
        idx = start + offs
        start += stride
        m = idx < n
        bits = tl.load(x_ptr + idx, mask=m, other=0).to(tl.int32)
        sym = (bits >> MAN_BITS) & (ALPHABET - 1)
        acc += tl.histogram(sym, ALPHABET, mask=m)
    tl.store(part_ptr + pid.to(tl.int64) * ALPHABET + tl.arange(0, ALPHABET), acc)


@triton.jit
def encode_kernel(
    x_ptr,
    freq_ptr,
    cum_ptr,
    states_ptr,
    counts_ptr,
    scratch_ptr,
    n,
    num_lanes,
    k,
    PB: tl.constexpr,
    MAN_BITS: tl.constexpr,
    ALPHABET: tl.constexpr,
    LANES: tl.constexpr,
):
    """rANS-encode ``LANES`` lanes per program, one lane per thread, from the last step to the first.

    Lane ``l`` writes its words into ``scratch[l * k : (l + 1) * k]`` from the end backwards, so its ``count``
    words end up at ``scratch[(l + 1) * k - count : (l + 1) * k]`` in decoding (increasing step) order.
    Outputs: ``states[l]`` (final state, uint32 bits as int32) and ``counts[l]`` (int32).
    """
    lane = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES).to(tl.int64)
    lane_ok = lane < num_lanes
    base = (lane // _LANES_PER_SEGMENT) * _LANES_PER_SEGMENT * k + lane % _LANES_PER_SEGMENT
    wlast = lane * k + k - 1
    x = tl.full([LANES], _STATE_LOWER, dtype=tl.uint32)
    cnt = tl.zeros([LANES], dtype=tl.int32)
    for t in range(0, k):
        s = k - 1 - t
        idx = base + s * _LANES_PER_SEGMENT
        active = lane_ok & (idx < n)
        bits = tl.load(x_ptr + idx, mask=active, other=0).to(tl.int32)
        sym = (bits >> MAN_BITS) & (ALPHABET - 1)
        f = tl.load(freq_ptr + sym, mask=active, other=1).to(tl.uint32)
        c = tl.load(cum_ptr + sym, mask=active, other=0).to(tl.uint32)
        emit = active & ((x >> (32 - PB)) >= f)
        word = (x & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(scratch_ptr + (wlast - cnt), word, mask=emit)
        cnt += emit.to(tl.int32)
        x = tl.where(emit, x >> 16, x)
        fs = tl.maximum(f, 1)
        q = x // fs
        coded = (q << PB) + (x - q * fs) + c
        x = tl.where(active, coded, x)
    tl.store(states_ptr + lane, x.to(tl.int32, bitcast=True), mask=lane_ok)
    tl.store(counts_ptr + lane, cnt, mask=lane_ok)


@triton.jit
def compact_kernel(
    scratch_ptr,
    counts_ptr,
    offsets_ptr,
    words_ptr,
    num_lanes,
    k,
    capacity,
    LB: tl.constexpr,
    W: tl.constexpr,
):
    """Copy each lane's words from its scratch slot to ``words[offsets[l] : offsets[l] + counts[l]]``.

    Nothing is written at or past ``capacity`` (the size of ``words``).

    Grid ``(cdiv(num_lanes, LB), cdiv(k, W))``: program ``(a, b)`` copies words ``[b * W, (b + 1) * W)`` of
    lanes ``[a * LB, (a + 1) * LB)``.
    """
    lane = tl.program_id(0).to(tl.int64) * LB + tl.arange(0, LB).to(tl.int64)
    lane_ok = lane < num_lanes
    cnt = tl.load(counts_ptr + lane, mask=lane_ok, other=0).to(tl.int64)
    off = tl.load(offsets_ptr + lane, mask=lane_ok, other=0)
    col = tl.program_id(1).to(tl.int64) * W + tl.arange(0, W).to(tl.int64)
    m = lane_ok[:, None] & (col[None, :] < cnt[:, None])
    src = (lane * k + k - cnt)[:, None] + col[None, :]
    v = tl.load(scratch_ptr + src, mask=m, other=0)
    dst = off[:, None] + col[None, :]
    tl.store(words_ptr + dst, v, mask=m & (dst < capacity))


@triton.jit
def pack_sm_kernel(
    x_ptr,
    sm_ptr,
    n,
    nbytes,
    MAN_BITS: tl.constexpr,
    TOTAL_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Bit-pack the sign+mantissa fields LSB-first, one output byte per thread.

    Byte ``j`` holds stream bits ``[8j, 8j + 8)``: the top of value ``i0 = 8j // w`` shifted down by
    ``8j - i0 * w``, plus (when ``w`` is not a multiple of 8) the bottom of value ``i0 + 1``.
    """
    W: tl.constexpr = MAN_BITS + 1
    # A byte starts inside value i0 at bit offset 8j mod W; with W >= 6 (symbols of at most 10 bits) the rest of
    # the byte always lies in value i0 + 1 (W = 6: offsets 0, 2, 4; W = 7: at least 1 bit of i0 plus 7 of i0 + 1).
    tl.static_assert(W >= 6)
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mj = j < nbytes
    bit = j * 8
    i0 = bit // W
    sh = (bit - i0 * W).to(tl.int32)
    b0 = tl.load(x_ptr + i0, mask=mj & (i0 < n), other=0).to(tl.int32)
    v = _sm_field(b0, MAN_BITS, TOTAL_BITS) >> sh
    if W % 8 != 0:
        i1 = i0 + 1
        b1 = tl.load(x_ptr + i1, mask=mj & (i1 < n), other=0).to(tl.int32)
        v = v | (_sm_field(b1, MAN_BITS, TOTAL_BITS) << (W - sh))
    tl.store(sm_ptr + j, (v & 0xFF).to(tl.uint8), mask=mj)


@triton.jit
def decode_kernel(
    states_ptr,
    counts_ptr,
    offsets_ptr,
    words_ptr,
    nwords,
    tables_ptr,
    sm_ptr,
    nbytes,
    out_ptr,
    flag_ptr,
    n,
    num_lanes,
    k,
    PB: tl.constexpr,
    ALPHABET: tl.constexpr,
    MAN_BITS: tl.constexpr,
    TOTAL_BITS: tl.constexpr,
    LANES: tl.constexpr,
):
    """Fused rANS decode + field merge: ``LANES`` lanes per program, one lane per thread, a runtime loop over steps.

    At each step a lane decodes one exponent symbol (LUT gather), renormalizes from its own word stream (masked
    load, never past its ``count`` words), reads its sign+mantissa field from the packed bytes and writes the merged
    float bits to ``out`` (the 32 lanes of a segment write 32 consecutive elements). ``flag`` (one int32) is ORed
    with 1 (atomically, once per program) when a lane of the program is inconsistent: it needed a word past its
    stream, it does not end in state ``L`` having consumed exactly ``count`` words, or its stream ends past
    ``nwords``.
    """
    M: tl.constexpr = 1 << PB
    W: tl.constexpr = MAN_BITS + 1
    NB: tl.constexpr = W // 8 if W % 8 == 0 else W // 8 + 2
    lane = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES).to(tl.int64)
    lane_ok = lane < num_lanes
    base = (lane // _LANES_PER_SEGMENT) * _LANES_PER_SEGMENT * k + lane % _LANES_PER_SEGMENT
    x = tl.load(states_ptr + lane, mask=lane_ok, other=_STATE_LOWER).to(tl.uint32, bitcast=True)
    cnt = tl.load(counts_ptr + lane, mask=lane_ok, other=0)
    woff = tl.load(offsets_ptr + lane, mask=lane_ok, other=0)
    ptr = tl.zeros([LANES], dtype=tl.int32)
    bad = tl.zeros([LANES], dtype=tl.int1)
    for s in range(0, k):
        idx = base + s * _LANES_PER_SEGMENT
        active = lane_ok & (idx < n)
        # rANS step.
        slot = x & (M - 1)
        sym = tl.load(tables_ptr + slot, mask=active, other=0)
        f = tl.load(tables_ptr + M + sym, mask=active, other=0).to(tl.uint32)
        c = tl.load(tables_ptr + M + ALPHABET + sym, mask=active, other=0).to(tl.uint32)
        nxt = f * (x >> PB) + slot - c
        need = active & (nxt < _STATE_LOWER)
        has = ptr < cnt
        bad = bad | (need & (ptr >= cnt))
        wpos = woff + ptr
        # The load does not wait for ``need``: its address only depends on the previous steps.
        w = tl.load(words_ptr + wpos, mask=active & has & (wpos < nwords), other=0)
        w32 = w.to(tl.uint16, bitcast=True).to(tl.uint32)
        nxt = tl.where(need, (nxt << 16) | w32, nxt)
        x = tl.where(active, nxt, x)
        ptr += need.to(tl.int32)
        # Sign+mantissa field: bits [idx * W, idx * W + W) of the packed stream.
        bitpos = idx * W
        b0 = bitpos >> 3
        acc = tl.zeros([LANES], dtype=tl.int32)
        for t in tl.static_range(NB):
            bt = tl.load(sm_ptr + (b0 + t), mask=active & (b0 + t < nbytes), other=0).to(tl.int32)
            acc = acc | (bt << (8 * t))
        sm = ((acc >> (bitpos & 7).to(tl.int32)) & ((1 << W) - 1)).to(tl.uint32)
        merged = ((sm >> MAN_BITS) << (TOTAL_BITS - 1)) | (sym.to(tl.uint32) << MAN_BITS) | (sm & ((1 << MAN_BITS) - 1))
        if TOTAL_BITS == 16:
            val = merged.to(tl.uint16).to(tl.int16, bitcast=True)
        else:
            val = merged.to(tl.int32, bitcast=True)
        tl.store(out_ptr + idx, val, mask=active)
    bad = lane_ok & (bad | (x != _STATE_LOWER) | (ptr != cnt) | (woff + cnt > nwords))
    any_bad = tl.max(bad.to(tl.int32), axis=0)
    tl.atomic_or(flag_ptr, any_bad, mask=any_bad != 0)
