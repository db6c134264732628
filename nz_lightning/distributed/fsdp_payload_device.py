"""Decoding gathered payloads where they are (a GPU): only headers and tables travel to the host.

The host path (:func:`~nz_lightning.distributed.fsdp_payload.unpack_payload`) parses a payload held in host memory,
so on a GPU the whole gathered buffer would be copied to the host and every blob's arrays uploaded again. Here the
host reads two short regions instead, in one device-to-host copy each: every rank's payload header and block table,
then every blob's first bytes (its header and frequency table, :data:`~kernels.blob_layout.LAYOUT_PREFIX_BYTES` at
most). Each blob's arrays are then taken from the gathered buffer on the device: the sign+mantissa bytes (and raw
bytes) as views, the lane states, counts and, when misaligned, the words as device-to-device copies.

Checks: the payload headers and the blobs' structure as on the host path; each coded blob's decode is checked
(``decompress(check=True)``: one host sync per block, as on the host path), which catches corrupt coded streams. A
coded blob's CRC32 is not verified (it needs every byte on the host): the transport (NCCL, gloo) is trusted, as for
dense all-gathers. Raw and constant blobs (rare: incompressible or constant shards), which no decoder check covers,
are copied to the host whole and parsed by ``CompressedTensor.from_bytes``, checksum included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from nz_lightning.distributed.fsdp_payload import (
    _HEADER,
    FLAG_OVERFLOW,
    HEADER_BYTES,
    MAGIC,
    _decode_into,
    _header,
    block_rows,
    memory_alias,
)
from nz_lightning.kernels import CompressedTensor
from nz_lightning.kernels.blob_layout import LAYOUT_PREFIX_BYTES, BlobLayout, layout
from nz_lightning.kernels.streams import Streams
from nz_lightning.kernels.transfer import DECODE_CHECKS, upload

if TYPE_CHECKING:
    from nz_lightning.distributed.fsdp_payload_pack import PayloadHead

__all__ = ["unpack_payloads_in_place"]


def unpack_payloads_in_place(
    gathered: Tensor,
    world: int,
    capacity: int,
    rows: Tensor,
    heads: Sequence[PayloadHead] | None = None,
    *,
    defer_checks: bool = True,
) -> bool:
    """Decode the ``world`` gathered payloads in ``gathered`` (uint8, on any device) into ``rows[r]`` each.

    Args:
        gathered: The all-gather output: ``world`` payloads of ``capacity`` bytes, back to back.
        world: Number of ranks.
        capacity: The agreed payload size.
        rows: ``[world, shard rows, ...]``: where each rank's shard is decoded.
        heads: Every rank's :class:`~nz_lightning.distributed.fsdp_payload_pack.PayloadHead` of this all-gather
            (exchanged over the host by the packers): then nothing is read from ``gathered`` on the host (bar raw and
            constant blobs). The gathered headers and blob prefixes are compared with the heads on the device and
            every coded blob is decoded unchecked; both OR their verdict into the deferred flag
            (``CompressedTensor.check_deferred``). ``None``: headers and blob prefixes are read from ``gathered``
            (two small device-to-host copies) and each decode is checked at once.
        defer_checks: With ``heads``: leave the flag to the next ``check_deferred`` (no sync), or (``False``) check
            it before returning (one sync).

    Returns:
        False, decoding nothing, when a payload says its shard did not fit (gather dense instead); else True.

    Raises:
        RuntimeError: A payload header that does not match (magic, capacity, block count), or blobs that do not make
            up the shard's shape and dtype.
        ValueError: A corrupt blob structure or coded stream.
    """
    flat = gathered.detach().reshape(world, capacity)
    if flat.device.type == "cpu":  # (tests) the CPU decoder exports arrays to numpy: not FSDP's resizable storage
        flat = memory_alias(flat).view(world, capacity)
    most = max(1, rows.shape[1])  # a block holds at least one row: enough for any rank's block table
    if heads is None:
        layouts = _read_layouts(flat, world, capacity, most)
        if layouts is None:
            return False
        spans, prefixes = layouts
    else:
        if len(heads) != world:
            raise RuntimeError(f"{len(heads)} payload heads for {world} ranks")
        if any(h.flags & FLAG_OVERFLOW for h in heads):
            return False
        spans = []
        for r, head in enumerate(heads):
            if head.capacity != capacity or len(head.prefixes) != len(head.lengths):
                raise RuntimeError(f"rank {r}'s payload head does not describe a payload of capacity {capacity}")
            length = HEADER_BYTES + 8 * len(head.lengths) + sum(head.lengths)
            _add_spans(spans, r, list(head.lengths), length, most, capacity)
        prefixes = [memoryview(p) for h in heads for p in h.prefixes]
        _compare_heads(gathered, capacity, heads, spans)
    row = [0] * world
    for (r, offset, n), prefix in zip(spans, prefixes, strict=True):
        lay = layout(prefix, n)
        out = rows[r]
        count = block_rows(lay.shape, lay.dtype, out, row[r])
        blob = flat[r, offset : offset + n]
        if lay.mode == 1:
            ct = _coded(blob, lay, trusted=heads is not None)  # its decode checked now, or deferred
        else:  # raw or constant bytes have no decoder check: parsed on the host in full, checksum included
            ct = CompressedTensor.from_bytes(blob.cpu().numpy().data, device=out.device)
        _decode_into(ct, out[row[r] : row[r] + count], check=heads is None)
        row[r] += count
    if gathered.device.type == "cuda":
        # raw and constant blocks are copied from views of the buffer without a sync: the caller frees the buffer
        # next (FSDP allocated it on its all-gather stream), so its memory must wait for this stream's reads
        gathered.record_stream(torch.cuda.current_stream(gathered.device))
    for r in range(world):
        if row[r] != rows.shape[1]:
            raise RuntimeError(f"payload holds {row[r]} rows, the shard has {rows.shape[1]}")
    if heads is not None and not defer_checks:
        DECODE_CHECKS.check()
    return True


def _compare_heads(
    gathered: Tensor, capacity: int, heads: Sequence[PayloadHead], spans: list[tuple[int, int, int]]
) -> None:
    """OR into the deferred flag whether the gathered payloads' headers, block tables and blob prefixes differ from
    the exchanged ``heads`` (no sync): payload bytes that do not match their heads are never trusted silently."""
    expected, positions = [], []
    for r, head in enumerate(heads):
        length = HEADER_BYTES + 8 * len(head.lengths) + sum(head.lengths)
        table = _HEADER.pack(MAGIC, head.flags, len(head.lengths), 0, length, capacity)
        table += np.array(head.lengths, dtype="<u8").tobytes()
        expected.append(table)
        positions.append(np.arange(len(table), dtype=np.int64) + r * capacity)
    for (r, offset, _), prefix in zip(spans, (p for h in heads for p in h.prefixes), strict=True):
        expected.append(prefix)
        positions.append(np.arange(len(prefix), dtype=np.int64) + r * capacity + offset)
    want = upload(torch.frombuffer(bytearray(b"".join(expected)), dtype=torch.uint8), gathered.device)
    where = upload(torch.from_numpy(np.concatenate(positions)), gathered.device)
    DECODE_CHECKS.record((gathered.reshape(-1)[where] != want).any())


def _read_layouts(
    flat: Tensor, world: int, capacity: int, most: int
) -> tuple[list[tuple[int, int, int]], list[memoryview]] | None:
    """Every blob's span and first bytes, read from the gathered payloads (two small device-to-host copies); ``None``
    when a payload overflowed."""
    heads = flat[:, : min(HEADER_BYTES + 8 * most, capacity)].cpu().numpy()  # one small device-to-host copy
    spans: list[tuple[int, int, int]] = []  # (rank, offset in its payload, length)
    for r in range(world):
        part = heads[r].data
        _, flags, count, _, length, _ = _header(part, capacity, prefix=True)
        if flags & FLAG_OVERFLOW:
            return None
        if not 1 <= count <= most:
            raise RuntimeError(f"rank {r}'s payload holds {count} blocks for a shard of {most} rows")
        lengths = np.frombuffer(part, dtype="<u8", count=count, offset=HEADER_BYTES).tolist()
        _add_spans(spans, r, lengths, length, most, capacity)
    return spans, _prefixes(flat, spans)  # a second small device-to-host copy


def _add_spans(
    spans: list[tuple[int, int, int]], rank: int, lengths: list[int], length: int, most: int, capacity: int
) -> None:
    """Append ``(rank, offset, length)`` of each of ``rank``'s blobs, checking that they add up to ``length``."""
    table_end = HEADER_BYTES + 8 * len(lengths)
    if not 1 <= len(lengths) <= most or length < table_end or length > capacity:
        raise RuntimeError(
            f"rank {rank}'s payload holds {len(lengths)} blocks in {length} bytes for a shard of {most} rows"
        )
    if table_end + sum(lengths) != length:
        raise RuntimeError(f"all-gather payload block table does not add up to its length {length}")
    offset = table_end
    for n in lengths:
        spans.append((rank, offset, n))
        offset += n


def _prefixes(flat: Tensor, spans: list[tuple[int, int, int]]) -> list[memoryview]:
    """The first ``min(length, LAYOUT_PREFIX_BYTES)`` bytes of every blob, copied to the host at once."""
    sizes = [min(n, LAYOUT_PREFIX_BYTES) for _, _, n in spans]
    if not spans:
        return []
    host = torch.cat([flat[r, off : off + k] for (r, off, _), k in zip(spans, sizes, strict=True)]).cpu().numpy()
    out, pos = [], 0
    for k in sizes:
        out.append(host[pos : pos + k].data)
        pos += k
    return out


def _section(blob: Tensor, span: tuple[int, int], align: int) -> Tensor:
    """Bytes ``span`` of ``blob``: a view when they start ``align``-aligned, else a device copy."""
    part = blob[span[0] : span[1]]
    if part.storage_offset() % align == 0 and part.data_ptr() % align == 0:
        return part
    return part.clone()


def _coded(blob: Tensor, lay: BlobLayout, trusted: bool) -> CompressedTensor:
    """A coded ``CompressedTensor`` whose arrays lie in (or are copied from) ``blob`` on its device (``trusted``:
    marked verified, so that its decode defers its check)."""
    states = _section(blob, lay.states, 4).view(torch.int32)
    counts = _section(blob, lay.counts, lay.count_width)
    counts = counts.to(torch.int32) if lay.count_width == 1 else counts.view(torch.int16).to(torch.int32) & 0xFFFF
    words = _section(blob, lay.words, 2).view(torch.int16)
    sm = blob[lay.sm[0] : lay.sm[1]]
    streams = Streams(states=states, counts=counts, words=words, sm=sm)
    return CompressedTensor(
        lay.shape, lay.dtype, 1, lay.table, lay.steps_per_lane, streams, fold_bits=lay.fold_bits, verified=trusted
    )
