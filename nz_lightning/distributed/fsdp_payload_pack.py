"""Packing a compressed shard's all-gather payload where its blocks live (a GPU): no block data through the host.

:func:`~nz_lightning.distributed.fsdp_payload.pack_payload` serializes every block on the host: on a GPU that is a
device-to-host copy of the whole compressed shard, a CRC32 over it on the CPU and an upload, on every all-gather.
:func:`pack_payload_on_device` writes the same payload layout on the device instead. The host builds only what it
already knows (the payload header and block table, each coded blob's header and frequency table) and uploads it in
one copy; each block's arrays (lane states, counts, words, sign+mantissa bytes) are copied device to device into
place. Nothing is read back from the device:

* coded blobs carry no checksum (the field is zero, and the payload sets :data:`FLAG_UNCHECKED`). Such payloads are
  decoded in place (:mod:`~nz_lightning.distributed.fsdp_payload_device`), which never reads a coded blob's checksum
  and checks its streams with the decoder; the host parser refuses them.
* a block whose word count is still on the device (an encoder that sized its buffer from a bound, see
  :class:`~kernels.streams.Streams`) ships its whole word buffer, about 2% more words than the stream (under 1% of
  the payload): its blob header declares the buffer's length, and the decoder finds each lane's words from the lane
  counts. Only when that does not fit the capacity are the totals read back (one sync) and the buffers trimmed.
* the deferred decode checks are not read here (:func:`pack_payload` reads them): a corrupt local block is caught by
  every receiver's decoder instead.

Raw and constant blocks (incompressible or constant shards: rare) are serialized on the host, checksum included.

The function also returns a :class:`PayloadHead`: the host bytes a receiver would otherwise read back from the gathered
buffer (flags, block lengths, each blob's first bytes). :class:`HeadExchange` all-gathers them over a host process
group (gloo; one all-gather per call once its slot fits), so that every rank can parse every gathered payload
without a device-to-host read; the receiver still compares the gathered headers and prefixes with the heads on the
device (:func:`~nz_lightning.distributed.fsdp_payload_device.unpack_payloads_in_place`).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from nz_lightning.distributed.fsdp_payload import _HEADER, FLAG_OVERFLOW, FLAG_UNCHECKED, HEADER_BYTES, MAGIC
from nz_lightning.kernels import CompressedTensor
from nz_lightning.kernels.blob import _HEAD, _RANS, VERSION_COMPACT, count_bytes
from nz_lightning.kernels.blob import MAGIC as BLOB_MAGIC
from nz_lightning.kernels.blob_layout import LAYOUT_PREFIX_BYTES
from nz_lightning.kernels.blob_table import encode_table
from nz_lightning.kernels.streams import settle_streams
from nz_lightning.kernels.transfer import upload
from nz_lightning.tensor.store import WeightStore

__all__ = ["HeadExchange", "PayloadHead", "pack_payload_on_device"]

_CRC_BYTES = 4
_HEAD_WIRE = struct.Struct("<QII")  # capacity, flags, blocks


@dataclass(frozen=True)
class PayloadHead:
    """What a receiver needs to parse one rank's payload without reading it from the device.

    Attributes:
        capacity: The payload's size.
        flags: Its header flags (:data:`~nz_lightning.distributed.fsdp_payload.FLAG_OVERFLOW`,
            :data:`FLAG_UNCHECKED`).
        lengths: Each blob's length, in row order.
        prefixes: Each blob's first bytes: at least its header and frequency table (all that
            :func:`~kernels.blob_layout.layout` reads), at most ``LAYOUT_PREFIX_BYTES``.
    """

    capacity: int
    flags: int
    lengths: tuple[int, ...]
    prefixes: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        """A flat serialization (for :class:`HeadExchange`)."""
        sizes = struct.pack(f"<{len(self.lengths)}Q{len(self.prefixes)}I", *self.lengths, *map(len, self.prefixes))
        return _HEAD_WIRE.pack(self.capacity, self.flags, len(self.lengths)) + sizes + b"".join(self.prefixes)

    @classmethod
    def from_bytes(cls, data: bytes) -> PayloadHead:
        """Parse :meth:`to_bytes` output.

        Raises:
            RuntimeError: The bytes do not hold a whole head.
        """
        try:
            capacity, flags, count = _HEAD_WIRE.unpack_from(data, 0)
            pos = _HEAD_WIRE.size
            lengths = struct.unpack_from(f"<{count}Q", data, pos)
            sizes = struct.unpack_from(f"<{count}I", data, pos + 8 * count)
        except struct.error as e:
            raise RuntimeError(f"a payload head of {len(data)} bytes is truncated: {e}") from None
        pos += 12 * count
        prefixes = []
        for size in sizes:
            prefixes.append(bytes(data[pos : pos + size]))
            pos += size
        if pos != len(data):
            raise RuntimeError(f"a payload head of {len(data)} bytes declares {pos}")
        head = cls(capacity, flags, tuple(lengths), tuple(prefixes))
        head.check()
        return head

    def check(self) -> None:
        """Check that the head can describe a payload.

        Raises:
            RuntimeError: Unknown flag bits, a capacity below the header, an overflow head with blocks or a
                payload head without any, or a blob prefix longer than its blob or than a layout needs.
        """
        if self.flags & ~(FLAG_OVERFLOW | FLAG_UNCHECKED):
            raise RuntimeError(f"payload head has unknown flags {self.flags:#x}")
        if self.capacity < HEADER_BYTES:
            raise RuntimeError(f"payload head declares a capacity of {self.capacity} bytes, below the header")
        if bool(self.flags & FLAG_OVERFLOW) == bool(self.lengths):
            raise RuntimeError(f"payload head with flags {self.flags:#x} lists {len(self.lengths)} blobs")
        for n, prefix in zip(self.lengths, self.prefixes, strict=True):
            if len(prefix) > min(n, LAYOUT_PREFIX_BYTES):
                raise RuntimeError(f"payload head gives {len(prefix)} prefix bytes of a {n}-byte blob")


@dataclass
class _Blob:
    """One block's blob: the bytes the host writes first, then device arrays (as uint8 ``[rows, width]`` views)."""

    host: bytes
    arrays: list[Tensor]
    length: int


def _blob(ct: CompressedTensor) -> _Blob:
    """How ``ct``'s blob is written: coded blocks from their device arrays, others serialized on the host."""
    if ct.mode != 1:
        data = ct.to_bytes()
        return _Blob(data, [], len(data))
    st, tb = ct.streams, ct.table
    assert st is not None and tb is not None
    n, lanes = ct.numel(), st.states.numel()
    cw = count_bytes(n, ct.steps_per_lane)
    words = st.words.reshape(-1).contiguous()  # the stream, or a bound-sized buffer holding it (``st.used``)
    head = [
        _HEAD.pack(BLOB_MAGIC, VERSION_COMPACT, ct.spec.code, 1, len(ct.shape)),
        struct.pack(f"<{len(ct.shape)}Q", *ct.shape),
        _RANS.pack(tb.prob_bits, ct.fold_bits, len(tb.symbols), ct.steps_per_lane, words.numel()),
        encode_table(tb),
    ]
    counts = st.counts.reshape(-1).to(torch.int32).contiguous().view(torch.uint8).view(lanes, 4)[:, :cw]
    arrays = [
        st.states.reshape(-1).contiguous().view(torch.uint8).view(1, -1),
        counts,  # the low ``cw`` bytes of each count, little-endian
        words.view(torch.uint8).view(1, -1),
        st.sm.reshape(-1).view(1, -1),
    ]
    host = b"".join(head)
    return _Blob(host, arrays, len(host) + sum(a.numel() for a in arrays) + _CRC_BYTES)


def pack_payload_on_device(store: WeightStore, capacity: int, device: torch.device) -> tuple[Tensor, PayloadHead]:
    """``store``'s blobs in a ``capacity``-byte uint8 tensor on ``device``, with its :class:`PayloadHead`.

    The payload layout of :func:`~nz_lightning.distributed.fsdp_payload.pack_payload`, written without reading
    anything back from the device (see the module docstring). ``head.flags & FLAG_OVERFLOW`` says the shard did not
    fit (the payload then holds only a header: gather dense).

    Raises:
        ValueError: ``capacity`` cannot even hold the header.
        RuntimeError: A big-endian host (the device arrays are copied as little-endian bytes).
    """
    if capacity < HEADER_BYTES:
        raise ValueError(f"a gather capacity of {capacity} bytes cannot hold the {HEADER_BYTES}-byte header")
    if sys.byteorder != "little":
        raise RuntimeError("packing payloads on the device needs a little-endian host")
    blocks = store.blocks
    blobs = [_blob(ct) for ct in blocks]
    table_end = HEADER_BYTES + 8 * len(blobs)
    length = table_end + sum(b.length for b in blobs)
    if length > capacity and any(ct.streams is not None and ct.streams.used is not None for ct in blocks):
        # the bound-sized word buffers may be what does not fit (the capacity was agreed from exact sizes): read
        # their totals back (one sync, only here) and trim them before declaring an overflow
        settle_streams(ct.streams for ct in blocks)
        blobs = [_blob(ct) for ct in blocks]
        length = table_end + sum(b.length for b in blobs)
    lengths = tuple(b.length for b in blobs)
    if length > capacity:
        header = _HEADER.pack(MAGIC, FLAG_OVERFLOW, 0, 0, 0, capacity)
        payload = torch.zeros(capacity, dtype=torch.uint8, device=device)
        payload[:HEADER_BYTES].copy_(upload(torch.frombuffer(bytearray(header), dtype=torch.uint8), device))
        return payload, PayloadHead(capacity, FLAG_OVERFLOW, (), ())
    flags = FLAG_UNCHECKED if any(b.arrays for b in blobs) else 0
    header = _HEADER.pack(MAGIC, flags, len(blobs), 0, length, capacity) + struct.pack(f"<{len(blobs)}Q", *lengths)
    staged = torch.frombuffer(bytearray(header + b"".join(b.host for b in blobs)), dtype=torch.uint8)
    staged = upload(staged, device)  # every host-known byte in one copy
    zeros = torch.zeros(max(_CRC_BYTES, capacity - length), dtype=torch.uint8, device=device)
    parts, pos = [staged[:table_end]], table_end
    for blob in blobs:
        parts.append(staged[pos : pos + len(blob.host)])
        pos += len(blob.host)
        if blob.arrays:
            parts += [a.reshape(-1) for a in blob.arrays]
            parts.append(zeros[:_CRC_BYTES])  # the checksum field
    parts.append(zeros[: capacity - length])
    payload = torch.cat(parts)  # one batched copy on a GPU (plus a reshape per block's counts)
    prefixes = tuple(b.host[:LAYOUT_PREFIX_BYTES] for b in blobs)
    return payload, PayloadHead(capacity, flags, lengths, prefixes)


class HeadExchange:
    """Every rank's :class:`PayloadHead` of one all-gather, gathered over a host (gloo) process group.

    The constructor starts the exchange (an asynchronous all-gather) and :meth:`wait` finishes it, so the host goes
    on (packing the next parameter, launching FSDP's all-gather) while the heads travel. Each rank sends a
    ``slot``-byte buffer: its head's length, then the head when it fits. When some head does not fit, every rank
    sees it in the gathered lengths and :meth:`wait` repeats the exchange with a larger slot on every rank. So an
    exchange costs one small all-gather once ``slot`` fits (pass back :attr:`slot`), two the first time. No device
    is touched. Every rank must start and wait for its exchanges in the same order (FSDP gathers parameters in the
    same order on every rank).

    Args:
        head: This rank's head.
        group: A process group over the CPU (gloo).
        slot: Bytes per head of the first round (the :attr:`slot` of the last exchange for the same parameter).
    """

    def __init__(self, head: PayloadHead, group: Any, slot: int = 0) -> None:
        self.head, self.group, self.slot = head, group, slot
        self._data = head.to_bytes()
        self._parts: list[Tensor] = []
        self._work = self._start()

    def _start(self) -> Any:
        buf = torch.zeros(8 + self.slot, dtype=torch.uint8)
        buf[:8] = torch.frombuffer(bytearray(struct.pack("<Q", len(self._data))), dtype=torch.uint8)
        if len(self._data) <= self.slot:
            buf[8 : 8 + len(self._data)] = torch.frombuffer(bytearray(self._data), dtype=torch.uint8)
        self._parts = [torch.empty_like(buf) for _ in range(dist.get_world_size(self.group))]
        self._sent = buf  # alive until the asynchronous all-gather has read it
        return dist.all_gather(self._parts, buf, group=self.group, async_op=True)

    def wait(self) -> list[PayloadHead]:
        """Every rank's head, by rank (a second round first if some head did not fit :attr:`slot`).

        Raises:
            RuntimeError: A head that does not parse, or heads that disagree on the capacity (the ranks are not
                gathering the same parameter).
        """
        while True:
            self._work.wait()
            raw = [p.numpy().tobytes() for p in self._parts]
            sizes = [struct.unpack_from("<Q", r)[0] for r in raw]
            if max(sizes) <= self.slot:
                break
            self.slot = -(-max(sizes) * 5 // 4 // 256) * 256  # every rank computes the same larger slot
            self._work = self._start()
        heads = [PayloadHead.from_bytes(r[8 : 8 + n]) for r, n in zip(raw, sizes, strict=True)]
        for r, other in enumerate(heads):
            if other.capacity != self.head.capacity:
                raise RuntimeError(
                    f"rank {r} packed a payload of capacity {other.capacity}, this rank {self.head.capacity}: the "
                    "ranks are not gathering the same parameter (or were set up differently)"
                )
        return heads
