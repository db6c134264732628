"""Compressed all-gather payloads on CUDA: packed on the device, decoded in place from exchanged heads, no host read.

The path ``shard_model(gather_heads="exchange")`` takes on GPUs, without a process group: payloads of several "ranks"
(stores on this GPU) are packed with :func:`pack_payload_on_device`, concatenated as an all-gather would, and decoded
with :func:`unpack_payloads_in_place` from their heads. The result must equal each store's own decode bit for bit,
the payload must equal the host packer's but for checksums and the flag, and nothing may be read back on the way.
"""

from __future__ import annotations

import pytest
import torch

from nz_lightning.distributed.fsdp_payload import FLAG_UNCHECKED, encoded_size, pack_payload
from nz_lightning.distributed.fsdp_payload_device import unpack_payloads_in_place
from nz_lightning.distributed.fsdp_payload_pack import pack_payload_on_device
from nz_lightning.kernels import CompressedTensor
from nz_lightning.tensor.store import WeightStore
from nz_lightning.tensor.sync_count import count_host_syncs

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")


def stores(world: int, rows: int = 2048, cols: int = 1024) -> list[WeightStore]:
    """One bf16 shard per rank in 1 MiB row blocks, re-encoded once (the Triton encoder's word totals stay on the
    device, as after a fused update)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    out = []
    for _ in range(world):
        value = (torch.randn(rows, cols, generator=gen, device=DEVICE) * 0.02).bfloat16()
        store = WeightStore(value, "triton", row_block_bytes=1 << 20)
        out.append(store)
    return out


def test_device_payloads_decode_exactly_without_host_reads() -> None:
    ranks = stores(3)
    capacity = int(max(encoded_size(s) for s in ranks) * 1.05)  # shard_model's default headroom
    for s in ranks:
        s.write(s.read() * 1.25)
    assert all(ct.streams is not None and ct.streams.used is not None for s in ranks for ct in s.blocks)
    torch.cuda.synchronize()
    CompressedTensor.check_deferred()
    rows = torch.empty(3, 2048, 1024, dtype=torch.bfloat16, device=DEVICE)
    with count_host_syncs() as syncs:
        packed = [pack_payload_on_device(s, capacity, DEVICE) for s in ranks]
        gathered = torch.cat([p for p, _ in packed])
        assert unpack_payloads_in_place(gathered, 3, capacity, rows, [h for _, h in packed])
    assert syncs.total == 0, syncs.summary()
    # the bound-sized word buffers fit the headroom: shipped as they are, never read back
    assert all(ct.streams is not None and ct.streams.used is not None for s in ranks for ct in s.blocks)
    CompressedTensor.check_deferred()  # the deferred decode checks passed
    for r, s in enumerate(ranks):
        assert torch.equal(rows[r].view(torch.int16), s.read().view(torch.int16)), r
    assert all(h.flags & FLAG_UNCHECKED for _, h in packed)


def test_device_payload_equals_host_payload_but_for_checksums() -> None:
    (store,) = stores(1)
    capacity = encoded_size(store) + 64  # settles the word totals: both packers see the exact streams
    host, _ = pack_payload(store, capacity, DEVICE)
    device, head = pack_payload_on_device(store, capacity, DEVICE)
    differ = set((host != device).nonzero().reshape(-1).tolist())
    fields, offset = {4}, 32 + 8 * len(head.lengths)  # the flags byte, then each blob's checksum field
    for n in head.lengths:
        offset += n
        fields.update(range(offset - 4, offset))
    assert differ <= fields and 4 in differ
