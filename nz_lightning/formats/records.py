"""NZSF records (docs/FORMAT.md, "NZSF container"): framing, a structural scan and decoding.

Decoding a container first scans its whole record table (:func:`scan_records`): every record header, kind and
length against the JSON header, every payload length against the file size, every blob's declared shape, dtype and
mode against its record (:func:`nz_lightning.kernels.blob.peek`), and the end record (size, count, at the end of
the file). Only then is any payload read and decoded, one record at a time, so a crafted file of ``n`` bytes makes
the reader allocate O(``n``) before its structure has been validated, and after that at most one record's
declared output (constant tensors are restored in chunks unless the caller asks for them whole).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import torch

from nz_lightning.kernels import MODE_CONST, PEEK_BYTES, CompressedTensor, peek_blob

if TYPE_CHECKING:
    from nz_lightning.formats.nzsf import Layout

KIND_RAW, KIND_NZCT, KIND_END = 0, 1, 255
FLOAT_DTYPES: dict[str, torch.dtype] = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_REC_HEAD = struct.Struct("<B3xIQQ")  # kind, payload_crc, payload_len, out_len (+ u32 header crc)
_U32, _END = struct.Struct("<I"), struct.Struct("<32sQ")  # END: sha256, record count
REC_HEAD_SIZE = _REC_HEAD.size + 4
CONST_CHUNK_BYTES = 4 << 20
"""Bytes per chunk in which a constant tensor is restored when it is not wanted whole."""

Buffer = bytes | memoryview
Decoded = tuple["bytes | None", int, "torch.Tensor | None", "CompressedTensor | None"]


@dataclass(frozen=True)
class RecordInfo:
    """One record as :func:`scan_records` found it: kind, payload checksum, offset and length, restored length."""

    kind: int
    payload_crc: int
    offset: int
    plen: int
    out_len: int


def read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    """Read ``n`` bytes, refusing (before reading) a length the rest of the file cannot hold."""
    left = os.fstat(f.fileno()).st_size - f.tell()
    if n > left or len(data := f.read(n)) != n:
        raise ValueError(f"truncated file: {what} needs {n} bytes, only {left} left")
    return data


def record(kind: int, payload: bytes, out_len: int) -> bytes:
    """A record: its header (with checksums) and payload."""
    head = _REC_HEAD.pack(kind, zlib.crc32(payload), len(payload), out_len)
    return head + _U32.pack(zlib.crc32(head)) + payload


CONST_EXPANSION_BASE = 1 << 30
"""Bytes that the constant-mode records of any container may restore to, plus :data:`CONST_EXPANSION_PER_BYTE`
per byte of the file (a constant record is a few dozen bytes whatever its size, and restoring or hashing it costs
time in proportion to what it declares: without a bound, a 236-byte file could ask for 2 TiB of work)."""
CONST_EXPANSION_PER_BYTE = 16


def const_expansion_limit(file_size: int) -> int:
    """The most bytes the constant-mode records of a container of ``file_size`` bytes may declare in total."""
    return CONST_EXPANSION_BASE + CONST_EXPANSION_PER_BYTE * file_size


def scan_records(f: BinaryIO, layout: Layout) -> list[RecordInfo]:
    """Validate the record table of a container (``f`` at its first record) without reading payloads.

    Reads each record header and, of blob records, the blob's first bytes; leaves ``f`` where it was.

    Returns:
        The records in order, the end record last.

    Raises:
        ValueError: A bad header, kind or length, a payload past the end of the file, a blob whose declared
            shape or dtype does not restore its record, a bad end record or bytes after it.
    """
    start, size, n = f.tell(), os.fstat(f.fileno()).st_size, len(layout.segments)
    expected = [*((s.kind, s.end - s.begin, s.dtype) for s in layout.segments), (KIND_END, 0, None)]
    infos = []
    const_bytes, const_limit = 0, const_expansion_limit(size)
    for idx, (want_kind, want_len, dtype) in enumerate(expected):
        head = read_exact(f, REC_HEAD_SIZE, f"record {idx} header")
        if zlib.crc32(head[:-4]) != _U32.unpack(head[-4:])[0]:
            raise ValueError(f"corrupt NZSF container: record {idx} header checksum mismatch")
        kind, payload_crc, plen, out_len = _REC_HEAD.unpack(head[:-4])
        if (kind, out_len) != (want_kind, want_len) or (kind == KIND_RAW and plen != out_len):
            raise ValueError(f"corrupt NZSF container: record {idx} is not the kind {want_kind} record of {want_len} B")
        offset = f.tell()
        if plen > size - offset:
            raise ValueError(f"truncated file: record {idx} payload needs {plen} bytes, only {size - offset} left")
        if kind == KIND_NZCT:
            shape, blob_dtype, mode = peek_blob(f.read(min(plen, PEEK_BYTES)), plen)
            numel = 1
            for d in shape:
                numel *= d
            if blob_dtype != FLOAT_DTYPES[dtype or ""] or numel * blob_dtype.itemsize != out_len:
                raise ValueError(
                    f"corrupt NZSF container: blob in record {idx} ({tuple(shape)} {blob_dtype}) does not restore "
                    f"{out_len} bytes of {dtype}"
                )
            const_bytes += out_len if mode == MODE_CONST else 0
            if const_bytes > const_limit:
                raise ValueError(
                    f"NZSF container: its constant-valued tensors declare {const_bytes} bytes (record {idx}), more "
                    f"than the {const_limit} bytes a {size}-byte file may expand to (1 GiB + 16 per file byte)"
                )
        elif kind == KIND_END:
            if plen != _END.size or offset + plen != size or _END.unpack(f.read(plen))[1] != n:
                raise ValueError("corrupt NZSF container: bad end record (sha256, count) or bytes after it")
        infos.append(RecordInfo(kind, payload_crc, offset, plen, out_len))
        f.seek(offset + plen)
    f.seek(start)
    return infos


def check_free_space(dst: str | os.PathLike[str], nbytes: int) -> None:
    """Refuse to start writing ``nbytes`` next to ``dst`` when its file system has less free space.

    Raises:
        OSError: ``ENOSPC``, naming ``dst``, before anything is written.
    """
    directory = os.path.dirname(os.path.abspath(os.fspath(dst)))
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # e.g. the directory does not exist yet: the write reports what is wrong
    if nbytes > free:
        msg = f"No space left on device: the restored file needs {nbytes} bytes, {free} are free"
        raise OSError(errno.ENOSPC, msg, os.fspath(dst))


def _const_chunks(value: bytes, total: int) -> Iterator[memoryview]:
    block = memoryview(value * max(1, CONST_CHUNK_BYTES // len(value)))
    for begin in range(0, total, len(block)):
        yield block[: min(len(block), total - begin)]


def decode_records(
    f: BinaryIO,
    layout: Layout,
    backend: str | None,
    *,
    sink: Callable[[Buffer], object] | None = None,
    expand_const: bool = False,
) -> Iterator[Decoded]:
    """Decode the records of a container (``f`` at its first record), after :func:`scan_records` validated them all.

    Yields ``(raw bytes, payload length, tensor, blob)`` per data record: ``raw bytes`` for raw records (else
    ``None``), the decoded tensor and its blob for blob records. A constant blob's tensor is its one value (shape
    ``(1,)``) unless ``expand_const``; the caller vouches for the declared sizes then (e.g. checked against a model).
    The sha256 check of the end record runs after the last yield, so exhaust the iterator.

    Args:
        f, layout: The container, at its first record, and its layout.
        backend: Codec backend for decoding.
        sink: Receives every restored byte range in order (constant tensors in chunks of
            :data:`CONST_CHUNK_BYTES`), e.g. the output file's ``write``.
        expand_const: Decode constant tensors whole.

    Raises:
        ValueError: The container is corrupt (structure, checksums, blobs or the sha256 of the original).
    """
    infos = scan_records(f, layout)
    sha = hashlib.sha256(layout.prefix)
    for idx, info in enumerate(infos):
        f.seek(info.offset)
        payload = read_exact(f, info.plen, f"record {idx} payload")
        if zlib.crc32(payload) != info.payload_crc:
            raise ValueError(f"corrupt NZSF container: record {idx} payload checksum mismatch")
        if info.kind == KIND_END:
            if _END.unpack(payload)[0] != sha.digest():
                raise ValueError("corrupt NZSF container: bad end record (sha256 of the original does not match)")
            return
        chunks: Iterator[Buffer] | list[Buffer] = [payload]
        raw: bytes | None = payload
        t, ct = None, None
        if info.kind == KIND_NZCT:
            ct = CompressedTensor.from_bytes(payload, max_const_bytes=info.out_len if expand_const else None)
            raw = payload = None  # type: ignore[assignment]
            if ct.mode == MODE_CONST and not expand_const:
                assert ct.raw is not None
                t = ct.raw.view(ct.dtype)
                chunks = _const_chunks(ct.raw.numpy().tobytes(), info.out_len)
            else:
                t = ct.decompress(backend=backend)
                chunks = [t.reshape(-1).view(torch.uint8).numpy().data] if t.numel() else [b""]
        for chunk in chunks:
            sha.update(chunk)
            if sink is not None:
                sink(chunk)
        yield raw, info.plen, t, ct
