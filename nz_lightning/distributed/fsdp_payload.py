"""Fixed-capacity all-gather payloads: one rank's compressed shard as a uint8 tensor of an agreed size.

FSDP2 allocates the all-gather output of a parameter once, from the sizes of the first all-gather inputs, so every
rank must hand it a payload of the same size on every step. A payload is ``capacity`` bytes::

    header (32 bytes, little-endian): magic b"NZG1", flags u32, blocks u32, reserved u32, length u64, capacity u64
    block table: ``blocks`` u64 blob lengths
    blobs: each row block's portable serialization (:meth:`CompressedTensor.to_bytes`, with its CRC32), in row order
    zero padding up to ``capacity``

``length`` is the number of bytes used (header included). Flags: :data:`FLAG_OVERFLOW` (below) and
:data:`FLAG_UNCHECKED` (packed on a device by :mod:`~nz_lightning.distributed.fsdp_payload_pack`: coded blobs carry
a zero checksum, and a coded blob's word count may be that of a larger buffer than its stream; decoded in place
only). A shard whose encoding does not fit sets
:data:`FLAG_OVERFLOW` and carries no blob: the receiver then gathers every rank's dense shard instead (see
:meth:`~nz_lightning.distributed.fsdp_tensor.NZShard.fsdp_post_all_gather`), so an overflow costs bandwidth, never
correctness. The capacity is written into every payload and checked on receipt, so payloads of a mismatched capacity
raise instead of being decoded from the wrong offsets.
"""

from __future__ import annotations

import ctypes
import struct

import numpy as np
import torch
from torch import Tensor

from nz_lightning.kernels import CompressedTensor
from nz_lightning.kernels.blob import serialized_size
from nz_lightning.kernels.streams import settle_streams
from nz_lightning.tensor.parameter import WeightStore
from nz_lightning.tensor.workspace import DECODE_POOL

__all__ = [
    "FLAG_OVERFLOW",
    "FLAG_UNCHECKED",
    "HEADER_BYTES",
    "MAGIC",
    "encoded_size",
    "memory_alias",
    "pack_payload",
    "payload_overflowed",
    "unpack_payload",
]

MAGIC = b"NZG1"
"""First bytes of every payload."""
FLAG_OVERFLOW = 1
"""Flag bit: the shard's encoding did not fit the capacity (no blob inside; gather dense instead)."""
FLAG_UNCHECKED = 2
"""Flag bit: the coded blobs carry no checksum (packed on a device by
:func:`~nz_lightning.distributed.fsdp_payload_pack.pack_payload_on_device`; decoded in place only)."""
_HEADER = struct.Struct("<4sIIIQQ")
HEADER_BYTES = _HEADER.size
"""Bytes of the fixed header (32)."""


def encoded_size(store: WeightStore) -> int:
    """Bytes a payload needs to carry ``store`` (header, block table and blobs; no padding)."""
    return HEADER_BYTES + 8 * len(store.bounds) + store.serialized_nbytes


def pack_payload(store: WeightStore, capacity: int, device: torch.device) -> tuple[Tensor, bool]:
    """``store``'s blobs in a ``capacity``-byte uint8 tensor on ``device``.

    Args:
        store: The local shard's compressed value.
        capacity: The payload size agreed by every rank.
        device: Where the payload goes (the all-gather's device).

    Returns:
        ``(payload, fits)``: ``fits`` is False when the encoding did not fit (the payload then only holds a header
        with :data:`FLAG_OVERFLOW`).

    Raises:
        ValueError: ``capacity`` cannot even hold the header.
    """
    if capacity < HEADER_BYTES:
        raise ValueError(f"a gather capacity of {capacity} bytes cannot hold the {HEADER_BYTES}-byte header")
    CompressedTensor.check_deferred()  # never ship a value whose deferred decode check failed
    blocks = store.blocks
    settle_streams(ct.streams for ct in blocks)
    sizes = [serialized_size(ct) for ct in blocks]
    length = HEADER_BYTES + 8 * len(blocks) + sum(sizes)
    buf = np.zeros(capacity, dtype=np.uint8)
    if length > capacity:
        buf[:HEADER_BYTES] = np.frombuffer(_HEADER.pack(MAGIC, FLAG_OVERFLOW, 0, 0, 0, capacity), dtype=np.uint8)
        return torch.from_numpy(buf).to(device), False
    buf[:HEADER_BYTES] = np.frombuffer(_HEADER.pack(MAGIC, 0, len(blocks), 0, length, capacity), dtype=np.uint8)
    table = np.array(sizes, dtype="<u8").view(np.uint8)
    offset = HEADER_BYTES + table.size
    buf[HEADER_BYTES:offset] = table
    out = buf.data
    for ct, size in zip(blocks, sizes, strict=True):  # each blob serialized in place (no intermediate bytes)
        written = ct.to_bytes_into(out[offset : offset + size])
        if written != size:
            raise RuntimeError(f"a block serialized to {written} bytes, {size} expected")
        offset += size
    return torch.from_numpy(buf).to(device), True


def payload_overflowed(part: memoryview, capacity: int) -> bool:
    """Whether the payload ``part`` (one rank's ``capacity`` bytes) says its shard did not fit.

    Raises:
        RuntimeError: Not a payload, or one written for another capacity.
    """
    flags = _header(part, capacity)[1]
    return bool(flags & FLAG_OVERFLOW)


def _header(part: memoryview, capacity: int, prefix: bool = False) -> tuple[bytes, int, int, int, int, int]:
    """The validated header of one rank's payload ``part`` (its ``capacity`` bytes, or with ``prefix`` its start)."""
    if len(part) != capacity and not (prefix and HEADER_BYTES <= len(part) <= capacity):
        raise RuntimeError(f"payload part is {len(part)} bytes, expected the capacity {capacity}")
    magic, flags, blocks, reserved, length, cap = _HEADER.unpack_from(part, 0)
    if magic != MAGIC:
        raise RuntimeError(f"all-gather payload has magic {magic!r}, expected {MAGIC!r}: not a NeuZip shard payload")
    if cap != capacity:
        raise RuntimeError(
            f"all-gather payload was packed for a capacity of {cap} bytes, this rank expects {capacity}: every rank "
            "must use the same gather capacity (set up by shard_model)"
        )
    if length > capacity:
        raise RuntimeError(f"all-gather payload claims {length} bytes, more than its capacity {capacity}")
    return magic, flags, blocks, reserved, length, cap


def unpack_payload(part: memoryview, capacity: int, out: Tensor) -> None:
    """Decode one rank's payload into ``out`` (its contiguous dense rows of the unsharded weight).

    Raises:
        RuntimeError: Not a payload, a capacity mismatch, an overflow payload (check :func:`payload_overflowed`
            first), or blobs that do not make up ``out``'s shape and dtype.
        ValueError: A corrupt blob (checksum or structure).
    """
    _, flags, blocks, _, length, _ = _header(part, capacity)
    if flags & FLAG_OVERFLOW:
        raise RuntimeError("this payload overflowed its capacity and holds no data")
    if flags & FLAG_UNCHECKED:
        raise RuntimeError(
            "this payload was packed on a device without checksums: decode it in place (unpack_payloads_in_place)"
        )
    lengths = np.frombuffer(part, dtype="<u8", count=blocks, offset=HEADER_BYTES)
    offset, row = HEADER_BYTES + 8 * blocks, 0
    if offset + int(lengths.sum()) != length:
        raise RuntimeError(f"all-gather payload block table does not add up to its length {length}")
    for n in lengths.tolist():
        # parsed in place on the CPU (the arrays view the gathered bytes, which outlive this decode)
        ct = CompressedTensor.from_bytes(part[offset : offset + n], device=out.device, copy=False)
        offset += n
        rows = block_rows(ct.shape, ct.dtype, out, row)
        _decode_into(ct, out[row : row + rows])
        row += rows
    if row != out.shape[0]:
        raise RuntimeError(f"payload holds {row} rows, the shard has {out.shape[0]}")


def block_rows(shape: torch.Size, dtype: torch.dtype, out: Tensor, row: int) -> int:
    """Rows of a payload block of ``shape`` / ``dtype``, checked to fit ``out`` (a rank's shard) from row ``row``.

    Raises:
        RuntimeError: Another dtype or row shape, or more rows than the shard has left.
    """
    rows = int(shape[0]) if len(shape) else 1
    if dtype != out.dtype or tuple(shape[1:]) != tuple(out.shape[1:]) or row + rows > out.shape[0]:
        raise RuntimeError(
            f"payload block {tuple(shape)} {dtype} does not fit rows {row}.. of a {tuple(out.shape)} {out.dtype} shard"
        )
    return rows


def memory_alias(t: Tensor) -> Tensor:
    """The bytes of the contiguous, non-empty CPU tensor ``t`` as a uint8 tensor built from its address: same memory,
    another storage object, so a numpy export of the alias (the CPU codec writes and reads through numpy) leaves
    ``t``'s storage resizable (FSDP frees its buffers by resizing them to 0). Valid only while ``t``'s memory is."""
    memory = (ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr())
    return torch.frombuffer(memory, dtype=torch.uint8)


def _decode_into(ct: CompressedTensor, out: Tensor, check: bool = True) -> None:
    """Decode ``ct`` into ``out`` in place (``check=False``: a verified blob's check is deferred, as in training).

    On the CPU the decoder writes through a numpy view of its output, and a numpy export of ``out``'s own storage
    would make it unresizable (FSDP frees unsharded weights by resizing their storage to 0). So a contiguous ``out``
    is decoded through a second tensor over the same memory (built from its address, sharing no storage object with
    it); anything else through a pooled buffer and a copy.
    """
    if out.device.type != "cpu":
        ct.decompress(out=out, check=check)
        return
    if out.numel() == 0:
        return
    if out.is_contiguous():
        ct.decompress(out=memory_alias(out).view(out.dtype).view(out.shape), check=check)
        return
    view, base = DECODE_POOL.acquire(out.shape, out.dtype, out.device)
    try:
        out.copy_(ct.decompress(out=view, check=check))
    finally:
        DECODE_POOL.release(base)
