"""Lossy mode of the codec (inference): keep the exponent and the top ``k`` mantissa bits of every value.

Quantization (docs/FORMAT.md §1.7):

* Optional block normalization: the flat tensor is cut into blocks of ``B`` elements. A block's scale is
  ``s = 1 + m / 2^man_bits`` where ``m`` is the full mantissa field of the block's largest finite magnitude
  (1 when that is zero or subnormal), so the block absmax divided by ``s`` is an exact power of two.
* Each value ``x`` is stored as a ``q`` on the ``k``-bit grid of its dtype (sign, exponent, top ``k`` mantissa
  bits), and decodes to ``dequant(q) = dtype(float(q) * s)`` (``q`` itself without normalization). The encoder
  picks, of the two grid points around ``|x| / s``, the one whose *decoded* value is nearer to ``|x|``; ties go
  to the even multiple of the binade's grid step. Without normalization this is exactly round-to-nearest-even
  with the carry into the exponent; a finite value never becomes inf (it saturates at the largest finite grid
  value). Because the decoded value itself is always a candidate when it is re-encoded, ``decode(encode(x))`` is
  idempotent, and a block's absmax decodes exactly.
* ±inf stay ±inf; NaNs are stored as inf of the same sign plus their index, and decode to the canonical quiet
  NaN of that sign.

All of this is elementwise torch code shared by every backend (integer arithmetic plus IEEE float ops that
torch rounds identically on CPU and CUDA), so all backends write the same bytes. The exponent symbols are
rANS-coded by the backend's ordinary coder through a *carrier* tensor (bf16 for 8-bit exponents, fp16 for
5-bit ones) whose sign and mantissa bits are zero. A backend may run its own byte-identical loops instead
(:meth:`kernels.backends.CodecBackend.lossy_ops`; the numba backend does, for every dtype).
"""

from __future__ import annotations

import torch

from .backends import CodecBackend
from .freqtable import FreqTable, quantize_counts
from .reference import pack_bits, unpack_bits
from .spec import FloatSpec, spec_for
from .streams import Streams

DEFAULT_BLOCK_SIZE = 512
"""Elements per normalization block in lossy mode (the paper's main setting)."""
MAX_BLOCK_LOG2 = 30
NO_BLOCK = 255
"""``block_log2`` header value meaning "no block normalization"."""
_CHUNK = 1 << 21
"""Elements processed at a time (rounded up to whole blocks) to bound the temporaries."""


def check_options(spec: FloatSpec, mantissa_bits: int, block_size: int | None) -> None:
    """Validate lossy options for a dtype.

    Raises:
        ValueError: ``mantissa_bits`` not an int in ``[0, man_bits - 1]`` for the dtype, or ``block_size`` not
            ``None`` or a power of two in ``[1, 2^30]``.
    """
    if isinstance(mantissa_bits, bool) or not isinstance(mantissa_bits, int):
        raise ValueError(f"mantissa_bits must be an int or None, got {mantissa_bits!r}")
    if not 0 <= mantissa_bits < spec.man_bits:
        raise ValueError(
            f"mantissa_bits={mantissa_bits} is out of range for {spec.dtype}: lossy mode keeps 0..{spec.man_bits - 1} "
            f"mantissa bits ({spec.man_bits} is the full width: use mantissa_bits=None for lossless)"
        )
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(f"block_size must be a power of two or None, got {block_size!r}")
    if block_size < 1 or block_size & (block_size - 1) or block_size > 1 << MAX_BLOCK_LOG2:
        raise ValueError(f"block_size must be a power of two in [1, 2^{MAX_BLOCK_LOG2}] or None, got {block_size}")


def carrier_spec(spec: FloatSpec) -> FloatSpec:
    """The 16-bit layout whose exponent field carries ``spec``'s exponent symbols to the rANS coder."""
    return spec_for(torch.float16 if spec.exp_bits == 5 else torch.bfloat16)


def scale_bytes(spec: FloatSpec) -> int:
    """Bytes per stored block scale (the absmax's whole mantissa field)."""
    return (spec.man_bits + 7) // 8


def num_blocks(n: int, block_size: int | None) -> int:
    """Normalization blocks of an ``n``-element tensor (0 without normalization)."""
    return 0 if block_size is None else -(-n // block_size)


def _int_dtype(spec: FloatSpec) -> torch.dtype:
    return torch.int32 if spec.total_bits == 16 else torch.int64


def _compute_dtype(spec: FloatSpec) -> torch.dtype:
    """A float type in which products of two grid values and quotients by a scale are exact enough."""
    return torch.float32 if spec.total_bits == 16 else torch.float64


def _chunk(block_size: int | None) -> int:
    return _CHUNK if block_size is None else max(_CHUNK, block_size)


def _unsigned_bits(x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    return x.view(spec.int_dtype).to(_int_dtype(spec)) & ((1 << spec.total_bits) - 1)


def _as_float(mag: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """Non-negative bit patterns (magnitudes, < 2^(T-1)) as values of the dtype."""
    return mag.to(spec.int_dtype).view(spec.dtype)


def _element_scales(scales: torch.Tensor, spec: FloatSpec, block_size: int, n: int) -> torch.Tensor:
    s = 1.0 + scales.to(_compute_dtype(spec)) / float(1 << spec.man_bits)
    return s.repeat_interleave(block_size)[:n]


def _dequant(mag: torch.Tensor, spec: FloatSpec, scale: torch.Tensor | None) -> torch.Tensor:
    """Decoded magnitudes (as compute-dtype floats) of grid magnitudes ``mag``."""
    value = _as_float(mag, spec).to(_compute_dtype(spec))
    if scale is None:
        return value
    return (value * scale).to(spec.dtype).to(_compute_dtype(spec))


def _quantize_chunk(
    x: torch.Tensor, spec: FloatSpec, k: int, block_size: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Grid bit patterns (NaN as inf), block scale fields and NaN mask of one chunk (whole blocks)."""
    bits = _unsigned_bits(x, spec)
    man = spec.man_bits
    top = spec.alphabet - 1
    sign = bits >> (spec.total_bits - 1)
    mag = bits & ((1 << (spec.total_bits - 1)) - 1)
    nonfinite = (mag >> man) == top
    nan = nonfinite & ((mag & ((1 << man) - 1)) != 0)
    absx = _as_float(mag, spec).to(_compute_dtype(spec))
    scales: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    if block_size is None:
        target = mag
    else:
        finite = torch.where(nonfinite, 0, mag)
        pad = -finite.numel() % block_size
        amax = torch.nn.functional.pad(finite, (0, pad)).view(-1, block_size).amax(1)
        scales = torch.where((amax >> man) > 0, amax & ((1 << man) - 1), 0)
        scale = _element_scales(scales, spec, block_size, x.numel())
        target = _unsigned_bits((absx / scale).to(spec.dtype), spec)
    drop = man - k
    lo = (target >> drop) << drop
    hi = lo + (1 << drop)
    err_lo = (absx - _dequant(lo, spec, scale)).abs()
    hi_ok = (hi >> man) < top
    err_hi = (_dequant(torch.where(hi_ok, hi, lo), spec, scale) - absx).abs()
    # Parity of lo as a multiple of its binade's grid step: the implicit leading 1 makes every normal value odd
    # when k = 0; otherwise it is the lowest kept mantissa bit.
    odd = ((lo >> man) > 0) if k == 0 else (((lo >> drop) & 1) == 1)
    pick_hi = hi_ok & ((err_hi < err_lo) | ((err_hi == err_lo) & odd))
    q = torch.where(pick_hi, hi, lo)
    q = torch.where(nonfinite, top << man, q)
    return (sign << (spec.total_bits - 1)) | q, scales, nan


def quantize(
    x: torch.Tensor, spec: FloatSpec, mantissa_bits: int, block_size: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Quantize a flat contiguous tensor.

    Returns:
        ``(q, scales, nan_index)``: grid bit patterns (``int32`` for 16-bit dtypes, ``int64`` for fp32, NaN stored
        as inf), block scale fields (int64 ``[num_blocks]`` or ``None``) and the NaN positions (int64).
    """
    n = x.numel()
    q = torch.empty(n, dtype=_int_dtype(spec), device=x.device)
    scales = None if block_size is None else torch.empty(num_blocks(n, block_size), dtype=torch.int64, device=x.device)
    nans: list[torch.Tensor] = []
    step = _chunk(block_size)
    for start in range(0, n, step):
        part, sc, nan = _quantize_chunk(x[start : start + step], spec, mantissa_bits, block_size)
        q[start : start + part.numel()] = part
        if scales is not None and sc is not None:
            b0 = start // block_size  # type: ignore[operator]
            scales[b0 : b0 + sc.numel()] = sc
        nans.append(torch.nonzero(nan).reshape(-1) + start)
    nan_index = torch.cat(nans) if nans else torch.zeros(0, dtype=torch.int64, device=x.device)
    return q, scales, nan_index


def dequantize(
    q: torch.Tensor, spec: FloatSpec, block_size: int | None, scales: torch.Tensor | None, out: torch.Tensor
) -> None:
    """Write the decoded values of grid bit patterns ``q`` into the flat tensor ``out`` (NaNs not yet restored)."""
    n = q.numel()
    step = _chunk(block_size)
    sign_shift = spec.total_bits - 1
    for start in range(0, n, step):
        part = q[start : start + step]
        sign = part >> sign_shift
        mag = part & ((1 << sign_shift) - 1)
        if block_size is None or scales is None:
            value_bits = mag
        else:
            b0 = start // block_size
            sc = scales[b0 : b0 + -(-part.numel() // block_size)]
            scale = _element_scales(sc, spec, block_size, part.numel())
            value = (_as_float(mag, spec).to(scale.dtype) * scale).to(spec.dtype)
            value_bits = _unsigned_bits(value, spec)
        bits = (sign << sign_shift) | value_bits
        signed = bits - ((bits >> sign_shift) << spec.total_bits)
        out[start : start + part.numel()] = signed.to(spec.int_dtype).view(spec.dtype)


def restore_nans(out: torch.Tensor, spec: FloatSpec, nan_index: torch.Tensor) -> None:
    """Put the canonical quiet NaN (with the stored sign) at the NaN positions of the flat tensor ``out``."""
    if nan_index.numel() == 0:
        return
    ints = out.view(spec.int_dtype)
    quiet = ((spec.alphabet - 1) << spec.man_bits) | (1 << (spec.man_bits - 1))
    ints[nan_index] = ints[nan_index] | quiet


# -- sign+mantissa fields and exponent carrier ----------------------------------------------------------------


def pack_fields(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``width``-bit values LSB-first (the format of docs/FORMAT.md §1.1), chunk by chunk."""
    n = values.numel()
    parts = []
    step = _CHUNK  # a multiple of 8: every chunk ends on a byte boundary
    for start in range(0, n, step):
        v = values[start : start + step].to(torch.int64)
        if width <= 8:
            m = v.numel()
            grouped = torch.nn.functional.pad(v, (0, -m % 8)).view(-1, 8)
            shifts = torch.arange(8, device=v.device, dtype=torch.int64) * width
            words = (grouped << shifts).sum(1)
            packed = words.view(torch.uint8).view(-1, 8)[:, :width].reshape(-1)[: (m * width + 7) // 8]
            parts.append(packed)
        else:
            parts.append(pack_bits(v, width))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=values.device)


def unpack_fields(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_fields` (int64 values)."""
    out = torch.empty(n, dtype=torch.int64, device=packed.device)
    step = _CHUNK
    for start in range(0, n, step):
        m = min(step, n - start)
        chunk = packed[start * width // 8 : (start * width + m * width + 7) // 8]
        if width <= 8:
            rows = torch.nn.functional.pad(chunk, (0, -chunk.numel() % width)).view(-1, width)
            words = torch.nn.functional.pad(rows, (0, 8 - width)).contiguous().view(torch.int64).reshape(-1, 1)
            shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * width
            out[start : start + m] = ((words >> shifts) & ((1 << width) - 1)).reshape(-1)[:m]
        else:
            out[start : start + m] = unpack_bits(chunk, width, m)
    return out


def sm_fields(q: torch.Tensor, spec: FloatSpec, k: int) -> torch.Tensor:
    """The stored ``sign << k | top-k mantissa`` fields of grid bit patterns."""
    man = spec.man_bits
    return ((q >> (spec.total_bits - 1)) << k) | ((q & ((1 << man) - 1)) >> (man - k))


def carrier(q: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """The carrier tensor holding the exponents of grid bit patterns ``q`` (sign and mantissa zero)."""
    exp = (q >> spec.man_bits) & (spec.alphabet - 1)
    cs = carrier_spec(spec)
    return (exp << cs.man_bits).to(cs.int_dtype).view(cs.dtype)


def encode(
    x: torch.Tensor,
    spec: FloatSpec,
    impl: CodecBackend,
    mantissa_bits: int,
    block_size: int | None,
    prob_bits: int,
    steps: int,
) -> tuple[FreqTable, Streams, torch.Tensor | None, torch.Tensor]:
    """Quantize the flat contiguous ``x`` and code it.

    Returns:
        The frequency table, the streams (``sm`` holds the packed ``1 + mantissa_bits``-bit fields), the packed
        block scales (uint8, :func:`scale_bytes` little-endian bytes per block, or ``None``) and the NaN indices.
    """
    fast = impl.lossy_ops(spec)
    if fast is not None:
        q, scales, nan_index = fast.quantize(x, spec, mantissa_bits, block_size)
    else:
        q, scales, nan_index = quantize(x, spec, mantissa_bits, block_size)
    cs = carrier_spec(spec)
    if fast is not None:
        exps, sm = fast.fields(q, spec, mantissa_bits)
    else:
        exps, sm = carrier(q, spec), pack_fields(sm_fields(q, spec, mantissa_bits), 1 + mantissa_bits)
    del q
    counts = impl.exponent_histogram(exps, cs).tolist()
    table = quantize_counts(counts, prob_bits)
    coded = impl.encode(exps, cs, table, steps)
    del exps
    packed_scales = None if scales is None else pack_fields(scales, 8 * scale_bytes(spec))
    return table, Streams(coded.states, coded.counts, coded.words, sm), packed_scales, nan_index


def decode(
    streams: Streams,
    spec: FloatSpec,
    impl: CodecBackend,
    tables: torch.Tensor,
    prob_bits: int,
    steps: int,
    mantissa_bits: int,
    block_size: int | None,
    packed_scales: torch.Tensor | None,
    nan_index: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Decode a lossy tensor into the flat contiguous ``out``.

    Raises:
        ValueError: The coded exponent lanes are inconsistent (corrupt).
    """
    n = out.numel()
    cs = carrier_spec(spec)
    scales = None
    if block_size is not None and packed_scales is not None:
        scales = unpack_fields(packed_scales, 8 * scale_bytes(spec), num_blocks(n, block_size))
    fast = impl.lossy_ops(spec)
    if fast is not None:
        # Exponents only, straight into `out` when the carrier has the same width (the merge reads each
        # element before it overwrites it), so no extra buffer and no zero sign+mantissa stream.
        same_width = out.element_size() == cs.itemsize
        exps = out.view(cs.dtype) if same_width else torch.empty(n, dtype=cs.dtype, device=out.device)
        fast.decode_exponents(streams, cs, tables, prob_bits, steps, exps)
        fast.merge(exps, streams.sm, spec, mantissa_bits, block_size, scales, out)
        restore_nans(out, spec, nan_index)
        return
    exps = torch.empty(n, dtype=cs.dtype, device=out.device)
    zero_sm = torch.zeros((n * cs.sm_bits + 7) // 8, dtype=torch.uint8, device=out.device)
    impl.decode(Streams(streams.states, streams.counts, streams.words, zero_sm), cs, tables, prob_bits, steps, exps)
    del zero_sm
    exp = (exps.view(torch.int16).to(_int_dtype(spec)) >> cs.man_bits) & (spec.alphabet - 1)
    del exps
    fields = unpack_fields(streams.sm, 1 + mantissa_bits, n).to(_int_dtype(spec))
    k = mantissa_bits
    q = (
        ((fields >> k) << (spec.total_bits - 1))
        | (exp << spec.man_bits)
        | ((fields & ((1 << k) - 1)) << (spec.man_bits - k))
    )
    del fields, exp
    dequantize(q, spec, block_size, scales, out)
    restore_nans(out, spec, nan_index)
