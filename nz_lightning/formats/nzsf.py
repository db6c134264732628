"""Whole-file checkpoint compression: a ``.safetensors`` file <-> an NZSF container that restores it byte for byte.

JSON header verbatim, BF16/F16/F32 tensors coded with :func:`kernels.compress`, all other bytes raw (docs/FORMAT.md,
"NZSF container"). Streams one tensor at a time; every write goes to a temp file that then replaces the destination.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import torch

from nz_lightning.formats.atomic import atomic_write
from nz_lightning.formats.records import (
    _END,
    _U32,
    FLOAT_DTYPES,
    KIND_END,
    KIND_NZCT,
    KIND_RAW,
    REC_HEAD_SIZE,
    check_free_space,
    decode_records,
    scan_records,
)
from nz_lightning.formats.records import read_exact as _read_exact
from nz_lightning.formats.records import record as _record
from nz_lightning.kernels import (
    MODE_CONST,
    MODE_RANS,
    CompressedTensor,
    compress,
    entropy_bits,
    serialized_size,
    spec_for,
)

MAGIC = b"NZSF"
VERSION = 1
MAX_JSON_LEN = 100 << 20
MAX_DIM = (1 << 63) - 1
_SIZES = {1: "BOOL U8 I8 F8_E5M2 F8_E4M3 F8_E8M0", 2: "I16 U16 F16 BF16", 4: "I32 U32 F32", 8: "I64 U64 F64 C64"}
ITEMSIZE: dict[str, int] = {name: size for size, names in _SIZES.items() for name in names.split()}
_FILE_HEAD = struct.Struct("<4sHHQQI")  # magic, version, flags, json_len, data_len, json_crc (+ u32 header crc)
_U64 = struct.Struct("<Q")
FILE_HEAD_SIZE = _FILE_HEAD.size + 4

ProgressFn = Callable[[str, int, int], None]  # (tensor name, data bytes done, data bytes total), after each segment
PathLike = str | os.PathLike[str]
_Coded = tuple[int, "torch.Tensor | None", "CompressedTensor | None"]  # payload length, float tensor, its blob


@dataclass(frozen=True, order=True)
class Segment:
    """One byte range ``[begin, end)`` of the data buffer: a tensor, or gap bytes (``name is None``)."""

    begin: int
    end: int
    name: str | None
    dtype: str | None
    shape: tuple[int, ...]

    @property
    def kind(self) -> int:
        """Kind of the record that stores this range: ``KIND_NZCT`` for BF16/F16/F32 tensors, else ``KIND_RAW``."""
        return KIND_NZCT if self.dtype in FLOAT_DTYPES else KIND_RAW


@dataclass(frozen=True)
class Layout:
    """A parsed safetensors header: its verbatim bytes, the data buffer length and the ordered segments."""

    json_bytes: bytes
    data_len: int
    segments: tuple[Segment, ...]

    @property
    def prefix(self) -> bytes:
        """The first ``8 + len(json_bytes)`` bytes of the original file."""
        return _U64.pack(len(self.json_bytes)) + self.json_bytes


@dataclass(frozen=True)
class TensorStats:
    """Compression statistics of one tensor.

    Attributes:
        name, dtype, shape, numel: The tensor (``dtype`` as its safetensors string). original_bytes, stored_bytes:
            Its bytes in the safetensors data buffer, and in its record payload.
        mode: ``"rans"`` (coded), ``"lossy-k<k>"`` (lossy blob, from ``save_compressed``), ``"nzct-raw"`` (float
            kept raw inside a blob) or ``"raw"`` (other dtypes).
        bits_per_weight: ``8 * stored_bytes / numel`` (0 when empty). ratio: ``original_bytes / stored_bytes``.
        exponent_entropy: Empirical entropy in bits of the exponent field (float tensors only).
        entropy_bound: Sign+mantissa bits + ``exponent_entropy``: bits/weight of an ideal exponent coder.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    original_bytes: int
    stored_bytes: int
    mode: str
    bits_per_weight: float
    ratio: float
    exponent_entropy: float | None = None
    entropy_bound: float | None = None


@dataclass(frozen=True)
class InspectReport:
    """Per-tensor statistics and totals of a checkpoint (``float_*``: over the BF16/F16/F32 tensors, per element).

    Attributes:
        path, source: The inspected file, and ``"safetensors"`` or ``"nzsf"``. tensors: In data-buffer order.
        original_size, container_size, ratio: Bytes of the ``.safetensors`` file, of the NZSF container (exact
            prediction for a ``.safetensors`` source), their ratio. gap_bytes: Bytes not covered by any tensor.
        float_numel, float_bits_per_weight, float_exponent_entropy, float_entropy_bound: Elements; stored bits,
            exponent entropy and sign+mantissa bits + exponent entropy (the coder's bound), in bits per element.
    """

    path: str
    source: str
    original_size: int
    container_size: int
    ratio: float
    tensors: list[TensorStats]
    gap_bytes: int
    float_numel: int
    float_bits_per_weight: float
    float_exponent_entropy: float
    float_entropy_bound: float


def _report(path: PathLike, source: str, layout: Layout, size: int, stats: list[TensorStats]) -> InspectReport:
    gaps = sum(s.end - s.begin for s in layout.segments if s.name is None)
    floats = [t for t in stats if t.exponent_entropy is not None]
    n = max(numel := sum(t.numel for t in floats), 1)
    bpw = 8 * sum(t.stored_bytes for t in floats) / n
    ent = sum(t.numel * (t.exponent_entropy or 0.0) for t in floats) / n
    bound = sum(t.numel * (t.entropy_bound or 0.0) for t in floats) / n
    orig = 8 + len(layout.json_bytes) + layout.data_len
    return InspectReport(str(path), source, orig, size, orig / size, stats, gaps, numel, bpw, ent, bound)


def exponent_entropy(t: torch.Tensor) -> float:
    """Empirical Shannon entropy (bits) of the exponent field of a BF16/F16/F32 tensor."""
    spec = spec_for(t.dtype)
    bits = t.detach().cpu().contiguous().reshape(-1).view(spec.int_dtype)
    exp = ((bits >> spec.man_bits) & (spec.alphabet - 1)).to(torch.int64)
    return max(0.0, entropy_bits(torch.bincount(exp, minlength=spec.alphabet).tolist()))


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def parse_header(json_bytes: bytes, data_len: int) -> Layout:
    """Validate a safetensors JSON header against a data buffer of ``data_len`` bytes.

    Raises:
        ValueError: Not a JSON object, malformed entries, sizes not matching dtype and shape, bad or overlapping ranges.
    """
    try:
        header = json.loads(json_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed safetensors header: not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("malformed safetensors header: not a JSON object")
    meta = header.pop("__metadata__", None) or {}  # null is accepted, as by the safetensors crate
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("malformed safetensors header: __metadata__ must map strings to strings")
    segments, pos = [], 0
    for seg in sorted(_parse_entry(k, v, data_len) for k, v in header.items()):  # by begin, end, name
        if seg.begin < pos:
            raise ValueError(f"malformed safetensors header: tensor {seg.name!r} overlaps another tensor")
        segments += [Segment(pos, seg.begin, None, None, ())] if seg.begin > pos else []
        segments.append(seg)
        pos = seg.end
    segments += [Segment(pos, data_len, None, None, ())] if pos < data_len else []
    return Layout(json_bytes, data_len, tuple(segments))


def _parse_entry(name: str, e: object, data_len: int) -> Segment:
    bad = f"malformed safetensors header: tensor {name!r}"
    if not isinstance(e, dict) or not isinstance(e.get("dtype"), str):
        raise ValueError(f"{bad} has no dtype")
    shape, offs, dtype = e.get("shape"), e.get("data_offsets"), e["dtype"]
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        raise ValueError(f"{bad} has an invalid shape {shape!r}")
    if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs):
        raise ValueError(f"{bad} has invalid data_offsets {offs!r}")
    if not 0 <= offs[0] <= offs[1] <= data_len:
        raise ValueError(f"{bad}: data_offsets {offs} outside the {data_len}-byte data buffer")
    if dtype in ITEMSIZE and math.prod(shape) * ITEMSIZE[dtype] != offs[1] - offs[0]:
        raise ValueError(f"{bad}: {dtype} {shape} does not fill data_offsets {offs}")
    return Segment(offs[0], offs[1], name, dtype, tuple(shape))


def read_safetensors_layout(f: BinaryIO) -> Layout:
    """Read and validate the header of a safetensors file open at offset 0; leaves ``f`` at the data buffer."""
    (n,) = _U64.unpack(_read_exact(f, 8, "safetensors header length"))
    if n > MAX_JSON_LEN:
        raise ValueError(f"not a safetensors file: header length {n} is over {MAX_JSON_LEN} bytes")
    return parse_header(_read_exact(f, n, "safetensors JSON header"), os.fstat(f.fileno()).st_size - 8 - n)


def _stats(seg: Segment, stored: int, t: torch.Tensor | None = None, ct: CompressedTensor | None = None) -> TensorStats:
    numel, orig = math.prod(seg.shape), seg.end - seg.begin
    common = (seg.name or "", seg.dtype or "", seg.shape, numel, orig, stored)
    bpw, ratio = (8 * stored / numel if numel else 0.0), (orig / stored if stored else 1.0)
    if t is None or ct is None:
        return TensorStats(*common, "raw", bpw, ratio)
    h = exponent_entropy(t)
    if ct.lossy:  # the bound of what is stored: sign + k mantissa bits + the decoded exponents' entropy
        return TensorStats(*common, f"lossy-k{ct.mantissa_bits}", bpw, ratio, h, 1 + (ct.mantissa_bits or 0) + h)
    mode = {MODE_RANS: "rans", MODE_CONST: "const"}.get(ct.mode, "nzct-raw")
    return TensorStats(*common, mode, bpw, ratio, h, spec_for(t.dtype).sm_bits + h)


def _collect(layout: Layout, records: Iterator[_Coded], progress: ProgressFn | None) -> list[TensorStats]:
    """Per-tensor stats from ``(payload length, tensor, blob)`` per segment, with progress; exhausts ``records``."""
    stats = []
    for seg, (plen, t, ct) in zip(layout.segments, records, strict=False):
        if seg.name is not None:
            stats.append(_stats(seg, plen, t, ct))
        if progress is not None:
            progress(seg.name or "(gap)", seg.end, layout.data_len)
    list(records)  # nothing is left but a decoder's end-record checks
    return stats


def _encode_records(
    f: BinaryIO, layout: Layout, backend: str | None, sha: Any, write: Callable[[bytes], object] | None = None
) -> Iterator[_Coded]:
    """Code the data buffer (``f`` at its start) segment by segment: yield ``(payload length, tensor, blob)``, feed
    each original byte range to ``sha.update`` and pass each record to ``write`` if given."""
    for seg in layout.segments:
        buf = _read_exact(f, seg.end - seg.begin, f"tensor {seg.name!r}" if seg.name else "gap bytes")
        sha.update(buf)
        payload, coded = buf, cast(_Coded, (len(buf), None, None))
        if seg.kind == KIND_NZCT:
            dtype = FLOAT_DTYPES[seg.dtype or ""]
            t = torch.frombuffer(bytearray(buf), dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            ct = compress(t.reshape(seg.shape), backend=backend)
            payload, coded = ct.to_bytes() if write is not None else b"", (serialized_size(ct), t, ct)
        if write is not None:
            write(_record(seg.kind, payload, len(buf)))
        yield coded


def compress_file(
    src: PathLike, dst: PathLike, *, backend: str | None = None, progress: ProgressFn | None = None
) -> InspectReport:
    """Compress a ``.safetensors`` file into an NZSF container, atomically replacing ``dst``.

    Args:
        src, dst: The safetensors file and the container to write.
        backend, progress: Codec backend for every tensor (``None``: the device default); hook after each segment.

    Returns:
        Per-tensor statistics of what was written.

    Raises:
        ValueError: ``src`` is not a valid safetensors file. OSError: Reading or writing failed.
    """
    with open(src, "rb") as f, atomic_write(dst) as out:
        layout = read_safetensors_layout(f)
        head = _FILE_HEAD.pack(MAGIC, VERSION, 0, len(js := layout.json_bytes), layout.data_len, zlib.crc32(js))
        out.write(head + _U32.pack(zlib.crc32(head)) + js)
        sha = hashlib.sha256(layout.prefix)
        stats = _collect(layout, _encode_records(f, layout, backend, sha, out.write), progress)
        out.write(_record(KIND_END, _END.pack(sha.digest(), len(layout.segments)), 0))
        written = out.tell()
    return _report(src, "nzsf", layout, written, stats)


def read_container_layout(f: BinaryIO) -> Layout:
    """Read and validate an NZSF file header and JSON header (``f`` at offset 0); leaves ``f`` at the first record."""
    head = f.read(FILE_HEAD_SIZE)
    if head[:4] != MAGIC:
        raise ValueError(f"not an NZSF container: magic {head[:4]!r}, expected {MAGIC!r}")
    if len(head) != FILE_HEAD_SIZE or zlib.crc32(head[:-4]) != _U32.unpack(head[-4:])[0]:
        raise ValueError("corrupt NZSF container: truncated file header or header checksum mismatch")
    _, version, flags, json_len, data_len, json_crc = _FILE_HEAD.unpack(head[:-4])
    if version != VERSION or flags != 0:
        raise ValueError(f"unsupported NZSF container version {version} (flags {flags}); this build reads {VERSION}")
    js = _read_exact(f, json_len, "NZSF JSON header")
    if zlib.crc32(js) != json_crc:
        raise ValueError("corrupt NZSF container: JSON header checksum mismatch")
    return parse_header(js, data_len)


def decompress_file(
    src: PathLike, dst: PathLike, *, backend: str | None = None, progress: ProgressFn | None = None
) -> str:
    """Restore the original ``.safetensors`` file from an NZSF container, atomically replacing ``dst``.

    Args:
        src, dst: The container and the safetensors file to write.
        backend, progress: Codec backend for every tensor (``None``: the device default); hook after each segment.

    Returns:
        Hex sha256 of the restored file (verified against the one recorded in the container).

    Raises:
        ValueError: ``src`` is not an NZSF container, or is truncated or corrupt (``dst`` is left untouched).
        OSError: Reading or writing failed.
    """
    with open(src, "rb") as f:
        layout = read_container_layout(f)
        scan_records(f, layout)  # the whole structure, before the free-space check and any decoding
        check_free_space(dst, len(layout.prefix) + layout.data_len)
        with atomic_write(dst) as out:
            out.write(layout.prefix)
            records = decode_records(f, layout, backend, sink=out.write)
            for i, _ in enumerate(records):  # runs to the end-record checks
                if progress is not None:
                    progress(layout.segments[i].name or "(gap)", layout.segments[i].end, layout.data_len)
    return sha256_file(dst)


def inspect_file(path: PathLike, *, backend: str | None = None, progress: ProgressFn | None = None) -> InspectReport:
    """Per-tensor statistics of a ``.safetensors`` file (float tensors compressed in memory, nothing written) or of
    an NZSF container (every tensor decoded, the whole container verified); the magic tells them apart.

    Args:
        path: The file to inspect.
        backend, progress: Codec backend for every tensor (``None``: the device default); hook after each segment.

    Returns:
        Per-tensor statistics and totals.

    Raises:
        ValueError: The file is neither a valid safetensors file nor a valid NZSF container. OSError: Reading failed.
    """
    with open(path, "rb") as f:
        is_container = f.read(4) == MAGIC
        f.seek(0)
        if is_container:
            layout = read_container_layout(f)
            records = ((plen, t, ct) for _, plen, t, ct in decode_records(f, layout, backend))
            return _report(path, "nzsf", layout, os.fstat(f.fileno()).st_size, _collect(layout, records, progress))
        layout = read_safetensors_layout(f)
        stats = _collect(layout, _encode_records(f, layout, backend, hashlib.sha256()), progress)
    fixed = FILE_HEAD_SIZE + len(layout.json_bytes) + REC_HEAD_SIZE * (len(layout.segments) + 1) + _END.size
    size = fixed + layout.data_len + sum(t.stored_bytes - t.original_bytes for t in stats)  # gaps are stored as is
    return _report(path, "safetensors", layout, size, stats)
