"""Triton backend: the reference codec (``kernels/reference.py``) as GPU kernels, byte for byte identical.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module
is imported). Kernels live in ``kernels/triton_kernels.py``:

* ``exponent_histogram``: per-program ``tl.histogram`` partials, summed on the device.
* ``encode``: one thread per rANS lane encoding backwards into a ``k``-word scratch slot per lane, then the word
  counts' prefix sum and a compaction copy into the final lane-major word stream; a byte-per-thread kernel packs
  the sign+mantissa fields.
* ``decode``: one fused kernel, one thread per lane, that decodes the exponents, reads the packed sign+mantissa
  fields and writes the merged float bits straight into ``out``; per-lane consistency flags are reduced on the
  device to one flag, which ``decode`` checks on the host (one sync) and ``decode_flagged`` returns unread.

Host syncs (see docs/DESIGN.md): ``decode_flagged`` none (sizes come from the host-side header; tables are uploaded
pinned and non-blocking); ``encode`` one (the word total that sizes the output), ``encode_bounded`` none (the output
is sized from the caller's upper bound and trimmed lazily); ``exponent_histogram`` none (its caller reads the counts
back to choose the frequency table).
"""

from __future__ import annotations

import functools

import torch

from . import compressed
from . import triton_kernels as tk
from .backends import FunctionBackend, check_device
from .freqtable import FreqTable
from .layout import effective_steps, num_lanes
from .spec import FloatSpec
from .streams import Streams, word_offsets
from .transfer import upload

_INTERP_MAX_TILE = 1 << 16
"""Largest block (elements) a program handles under the interpreter, where few large programs are fastest."""


def _check_device(device: torch.device) -> bool:
    """Whether kernels run compiled on a GPU (True) or in the interpreter (False).

    Raises:
        ValueError: A non-CUDA tensor without ``TRITON_INTERPRET=1``.
    """
    if device.type == "cuda":
        return True
    check_device("triton", device)
    return False


def _pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0: ``triton.next_power_of_2`` without its call overhead)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints (``triton.cdiv`` without its call overhead on the host)."""
    return -(-a // b)


@functools.lru_cache(maxsize=16)
def _sm_count_of(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def _lanes_per_program(nl: int, device: torch.device, gpu: bool) -> int:
    """Lanes (threads) per program: as many as keep every SM busy on a GPU, as many as possible in the interpreter."""
    if not gpu:
        return min(_pow2(nl), 8192)
    sms = _sm_count(device)
    for lanes in (128, 64):
        if nl >= 4 * sms * lanes:
            return lanes
    return 32


def _flat_bits(x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """Flat signed-int view of a float tensor's bits (no copy when ``x`` is contiguous)."""
    return x.contiguous().reshape(-1).view(spec.int_dtype)


def exponent_histogram(x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """Counts of each exponent symbol.

    Args:
        x: A float tensor of dtype ``spec.dtype`` (CUDA, or CPU under the interpreter).
        spec: Its bit layout.

    Returns:
        int64 tensor ``[spec.alphabet]`` on ``x``'s device.

    Raises:
        ValueError: ``x`` cannot run on this backend (see module docstring).
    """
    gpu = _check_device(x.device)
    bits = _flat_bits(x, spec)
    n = bits.numel()
    if n == 0:
        return torch.zeros(spec.alphabet, dtype=torch.int64, device=x.device)
    block = 4096 if gpu else min(_pow2(n), _INTERP_MAX_TILE)
    num_blocks = _cdiv(n, block)
    grid = min(num_blocks, 4 * _sm_count(bits.device) if gpu else 1)
    part = torch.empty((grid, spec.alphabet), dtype=torch.int32, device=x.device)
    tk.histogram_kernel[(grid,)](
        bits, part, n, num_blocks, MAN_BITS=spec.man_bits, ALPHABET=spec.alphabet, BLOCK=block, num_warps=8
    )
    return part.sum(0, dtype=torch.int64)


def _pack_sm(bits: torch.Tensor, spec: FloatSpec, gpu: bool) -> torch.Tensor:
    n = bits.numel()
    nbytes = (n * spec.sm_bits + 7) // 8
    sm = torch.empty(nbytes, dtype=torch.uint8, device=bits.device)
    if nbytes == 0:
        return sm
    block = 1024 if gpu else min(_pow2(nbytes), _INTERP_MAX_TILE)
    tk.pack_sm_kernel[(_cdiv(nbytes, block),)](
        bits, sm, n, nbytes, MAN_BITS=spec.man_bits, TOTAL_BITS=spec.total_bits, BLOCK=block, num_warps=4
    )
    return sm


def encode(x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int) -> Streams:
    """rANS-encode the exponents of ``x`` and pack its sign+mantissa fields (same output as the reference).

    Reads the word total back to size the word stream (one host sync); :func:`encode_bounded` does not.

    Args:
        x: A float tensor of dtype ``spec.dtype`` with at least one element (CUDA, or CPU under the interpreter).
        spec: Its bit layout.
        table: Frequency table covering every exponent present in ``x``.
        steps: Symbols per lane (``steps_per_lane``).

    Returns:
        The coded streams, on ``x``'s device.

    Raises:
        ValueError: ``x`` cannot run on this backend.
    """
    return _encode(x, spec, table, steps, None)


def encode_bounded(x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int, max_words: int) -> Streams:
    """:func:`encode` into a word buffer of ``max_words`` (an upper bound on the total): no host sync.

    The streams' ``used`` holds the exact total on the device; words past the buffer are not written, and a total
    over it makes ``Streams.settle`` raise and decodes fail their check (the bound was wrong: data lost).
    """
    return _encode(x, spec, table, steps, max_words)


def _encode(x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int, capacity: int | None) -> Streams:
    gpu = _check_device(x.device)
    device = x.device
    bits = _flat_bits(x, spec)
    n = bits.numel()
    k = effective_steps(n, steps)
    nl = num_lanes(n, k)
    freq_l, cum_l = table.dense(spec.alphabet)
    freq = upload(torch.tensor(freq_l, dtype=torch.int32), device)
    cum = upload(torch.tensor(cum_l, dtype=torch.int32), device)
    states = torch.empty(nl, dtype=torch.int32, device=device)
    counts = torch.empty(nl, dtype=torch.int32, device=device)
    scratch = torch.empty(nl * k, dtype=torch.int16, device=device)
    lanes = _lanes_per_program(nl, device, gpu)
    tk.encode_kernel[(_cdiv(nl, lanes),)](
        bits,
        freq,
        cum,
        states,
        counts,
        scratch,
        n,
        nl,
        k,
        PB=table.prob_bits,
        MAN_BITS=spec.man_bits,
        ALPHABET=spec.alphabet,
        LANES=lanes,
        num_warps=max(1, lanes // 32) if gpu else 1,
    )
    offsets = word_offsets(counts)
    # Without a bound, the word total sizes the stream: the one host sync of an encode.
    total = int(offsets[-1]) if capacity is None else capacity
    words = torch.empty(total, dtype=torch.int16, device=device)
    if total:
        wblk = min(_pow2(k), 512 if gpu else 4096)
        lblk = max(1, min(256, 2048 // wblk) if gpu else _INTERP_MAX_TILE // wblk)  # <= 256 rows: no spills (sm_86/89)
        if not gpu:
            lblk = min(lblk, _pow2(nl))
        tk.compact_kernel[(_cdiv(nl, lblk), _cdiv(k, wblk))](
            scratch, counts, offsets, words, nl, k, total, LB=lblk, W=wblk, num_warps=4
        )
    used = None if capacity is None else offsets[-1]  # exact words when the total was read back
    return Streams(states=states, counts=counts, words=words, sm=_pack_sm(bits, spec, gpu), used=used)


class _DecodePlan:
    """A decode's checked sizes and launch arguments for one set of streams, kept on them for the next decode.

    Training decodes every weight block several times per step between its re-encodes; the checks and argument
    conversions below cost host time a GPU would idle through. The plan stays valid while the streams' arrays, the
    tables, the layout and the output's size and device are the same objects and values (:meth:`fits`).
    """

    def __init__(
        self, streams: Streams, spec: FloatSpec, tables: torch.Tensor, prob_bits: int, steps: int, out: torch.Tensor
    ) -> None:
        gpu = _check_device(out.device)
        device, n = out.device, out.numel()
        k = effective_steps(n, steps)
        nl = num_lanes(n, k)
        nbytes = (n * spec.sm_bits + 7) // 8
        if streams.states.numel() != nl or streams.counts.numel() != nl:
            raise ValueError(
                f"corrupt blob: expected {nl} lanes, got {streams.states.numel()} states and "
                f"{streams.counts.numel()} counts"
            )
        if streams.sm.numel() != nbytes:
            raise ValueError(f"corrupt blob: expected {nbytes} sign+mantissa bytes, got {streams.sm.numel()}")
        if tables.numel() != (1 << prob_bits) + 2 * spec.alphabet:
            raise ValueError(
                f"decoder tables must hold {(1 << prob_bits) + 2 * spec.alphabet} entries, got {tables.numel()}"
            )
        self.sources = (streams.states, streams.counts, streams.words, streams.sm, tables)
        self.key = (spec, prob_bits, steps, n, device)
        self.states = streams.states.to(device=device, dtype=torch.int32).contiguous()
        self.counts = streams.counts.to(device=device, dtype=torch.int32).contiguous()
        self.words = streams.words.to(device=device, dtype=torch.int16).contiguous()
        self.sm = streams.sm.to(device=device, dtype=torch.uint8).contiguous()
        self.tables = tables.to(device=device, dtype=torch.int32).contiguous()
        self.nwords, self.nbytes, self.k, self.lanes_total = self.words.numel(), nbytes, k, nl
        self.lanes = _lanes_per_program(nl, device, gpu)
        self.grid = (_cdiv(nl, self.lanes),)
        self.num_warps = max(1, self.lanes // 32) if gpu else 1

    def fits(
        self, streams: Streams, spec: FloatSpec, tables: torch.Tensor, prob_bits: int, steps: int, out: torch.Tensor
    ) -> bool:
        """Whether this plan still describes a decode of ``streams`` with these arguments."""
        states, counts, words, sm, tab = self.sources
        return (
            streams.states is states
            and streams.counts is counts
            and streams.words is words
            and streams.sm is sm
            and tables is tab
            and self.key == (spec, prob_bits, steps, out.numel(), out.device)
        )


def decode(
    streams: Streams, spec: FloatSpec, tables: torch.Tensor, prob_bits: int, steps: int, out: torch.Tensor
) -> None:
    """Decode into the flat contiguous float tensor ``out`` (``numel`` = n) and check it (one host sync).

    Args and raises: as :func:`decode_flagged`, plus ``ValueError`` when its flag is set.
    """
    bad = decode_flagged(streams, spec, tables, prob_bits, steps, out)
    if bad is not None and bool(bad):
        raise ValueError("corrupt blob: rANS lanes do not decode consistently")


def decode_flagged(
    streams: Streams,
    spec: FloatSpec,
    tables: torch.Tensor,
    prob_bits: int,
    steps: int,
    out: torch.Tensor,
    flag: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Decode into the flat contiguous float tensor ``out`` (``numel`` = n) without any host sync.

    Args:
        streams: Coded streams on ``out``'s device.
        spec: Bit layout of ``out``'s dtype.
        tables: Decoder tables ``[lut (2^prob_bits) | freq (alphabet) | cum (alphabet)]`` (int32; the default
            :meth:`CodecBackend.decode_tables`).
        prob_bits: log2 of the frequency total.
        steps: Symbols per lane (``steps_per_lane``).
        out: Contiguous destination tensor of dtype ``spec.dtype``.
        flag: An int32 device tensor of one element that the kernel ORs 1 into on an inconsistent lane, instead of
            a flag of its own (then nothing is returned: the decode is one kernel launch, with ``streams.offsets``).

    Returns:
        A boolean device scalar, true when a lane read past its words or did not end in the initial state with all
        words used (``out`` then holds garbage); ``None`` for an empty ``out`` or when ``flag`` is given.

    Raises:
        ValueError: The arrays do not have the sizes the layout implies (host-side metadata only).
    """
    n = out.numel()
    if n == 0:
        return None
    if not out.is_contiguous() or out.dtype != spec.dtype:
        raise ValueError(f"out must be a contiguous {spec.dtype} tensor, got {out.dtype}")
    plan = streams.plan
    if not isinstance(plan, _DecodePlan) or not plan.fits(streams, spec, tables, prob_bits, steps, out):
        plan = _DecodePlan(streams, spec, tables, prob_bits, steps, out)
        if n >= compressed.CACHE_TABLES_MIN_NUMEL:  # kept where the tables are cached too (else rebuilt per decode)
            streams.plan = plan
    cached = streams.offsets
    offsets = cached if cached is not None and cached.device == out.device else word_offsets(plan.counts)
    own = flag is None
    status = torch.zeros((), dtype=torch.int32, device=out.device) if flag is None else flag
    tk.decode_kernel[plan.grid](
        plan.states,
        plan.counts,
        offsets,
        plan.words,
        plan.nwords,
        plan.tables,
        plan.sm,
        plan.nbytes,
        out.view(-1).view(spec.int_dtype),
        status,
        n,
        plan.lanes_total,
        plan.k,
        PB=prob_bits,
        ALPHABET=spec.alphabet,
        MAN_BITS=spec.man_bits,
        TOTAL_BITS=spec.total_bits,
        LANES=plan.lanes,
        num_warps=plan.num_warps,
    )
    # ``words`` may be a larger buffer than the stream (``Streams.used``, from ``encode_bounded``); loaded blobs have
    # exactly ``sum(counts)`` words (``blob.loads`` checks it). The kernel flags a lane whose stream ends past it.
    return status != 0 if own else None


BACKEND = FunctionBackend("triton", exponent_histogram, encode, decode, decode_flagged, encode_bounded)
"""The ``"triton"`` entry of the backend registry."""
