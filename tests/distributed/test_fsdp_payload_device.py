"""Decoding gathered payloads in place (the GPU path: only headers and tables go to the host), run on the CPU."""

from __future__ import annotations

import pytest
import torch

from nz_lightning.distributed.fsdp_payload import encoded_size, pack_payload
from nz_lightning.distributed.fsdp_payload_device import unpack_payloads_in_place
from nz_lightning.kernels import compress
from nz_lightning.kernels.blob_layout import LAYOUT_PREFIX_BYTES, layout
from nz_lightning.tensor.parameter import WeightStore
from nz_lightning.tensor.sync_count import count_host_syncs


def shards(world: int, row_block_bytes: int | None) -> list[WeightStore]:
    """One rank's shard each: trained-like bf16 rows, one of them incompressible (raw blocks), one constant."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for r in range(world):
        value = (torch.randn(40, 96, generator=gen) * 0.02).bfloat16()
        if r == 1:
            value = torch.randint(-(2**15), 2**15, (40, 96), dtype=torch.int16, generator=gen).view(torch.bfloat16)
        if r == 2:
            value = torch.full((40, 96), -0.0, dtype=torch.bfloat16)
        out.append(WeightStore(value, row_block_bytes=row_block_bytes))
    return out


def gather(stores: list[WeightStore], slack: int = 0) -> tuple[torch.Tensor, int]:
    """What an all-gather of the stores' payloads returns: their payloads back to back (capacity + ``slack``)."""
    capacity = max(encoded_size(s) for s in stores) + 3 + slack  # odd capacity: later ranks' blobs misaligned
    return torch.cat([pack_payload(s, capacity, torch.device("cpu"))[0] for s in stores]), capacity


@pytest.mark.parametrize("row_block_bytes", [None, 2048], ids=["one-block", "row-blocks"])
@pytest.mark.parametrize("world", [1, 3])
def test_in_place_decode_is_bit_exact(world: int, row_block_bytes: int | None) -> None:
    stores = shards(world, row_block_bytes)
    modes = {ct.mode for s in stores for ct in s.blocks}
    assert modes == ({1} if world == 1 else {0, 1, 3})  # coded, raw and constant blocks
    gathered, capacity = gather(stores)
    rows = torch.empty(world, 40, 96, dtype=torch.bfloat16)
    assert unpack_payloads_in_place(gathered, world, capacity, rows)
    for r, s in enumerate(stores):
        assert torch.equal(rows[r].view(torch.int16), s.read().view(torch.int16)), r
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), gathered])[1:]  # a buffer starting at an odd address
    rows.zero_()
    assert unpack_payloads_in_place(shifted, world, capacity, rows)
    for r, s in enumerate(stores):
        assert torch.equal(rows[r].view(torch.int16), s.read().view(torch.int16)), r


def test_ranks_may_hold_different_row_blocks() -> None:
    one = WeightStore((torch.randn(40, 96) * 0.02).bfloat16())
    split = WeightStore((torch.randn(40, 96) * 0.02).bfloat16(), row_block_bytes=2048)
    assert len(one.blocks) == 1 < len(split.blocks)
    gathered, capacity = gather([one, split])
    rows = torch.empty(2, 40, 96, dtype=torch.bfloat16)
    assert unpack_payloads_in_place(gathered, 2, capacity, rows)
    assert torch.equal(rows[0], one.read()) and torch.equal(rows[1], split.read())


def test_overflowed_payload_decodes_nothing() -> None:
    stores = shards(2, None)
    capacity = encoded_size(stores[0]) + 1  # enough for rank 0, not for rank 1's raw block
    gathered = torch.cat([pack_payload(s, capacity, torch.device("cpu"))[0] for s in stores])
    rows = torch.full((2, 40, 96), 7.0, dtype=torch.bfloat16)
    assert not unpack_payloads_in_place(gathered, 2, capacity, rows)
    assert bool((rows == 7.0).all())


def test_bad_payloads_raise() -> None:
    stores = shards(2, None)
    gathered, capacity = gather(stores)
    rows = torch.empty(2, 40, 96, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="rows"):
        unpack_payloads_in_place(gathered, 2, capacity, torch.empty(2, 80, 96, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="capacity"):
        unpack_payloads_in_place(torch.cat([gathered, gathered[:2]]), 2, capacity + 1, rows)
    with pytest.raises(RuntimeError, match="does not fit"):
        unpack_payloads_in_place(gathered, 2, capacity, torch.empty(2, 40, 96, dtype=torch.float16))
    start = 32 + 8  # rank 0's only blob
    blob_len = int.from_bytes(bytes(gathered[32:40].tolist()), "little")
    lay = layout(bytes(gathered[start : start + min(blob_len, LAYOUT_PREFIX_BYTES)].tolist()), blob_len)
    words = gathered.clone()
    words[start + lay.words[0] : start + lay.words[1]] = 0xFF  # every word of every lane: inconsistent lanes
    with pytest.raises(ValueError, match="corrupt"):
        unpack_payloads_in_place(words, 2, capacity, rows)
    raw = gathered.clone()
    raw[2 * capacity - 100] ^= 0x01  # a bit of rank 1's raw block: no decoder check, its checksum catches it
    with pytest.raises(ValueError, match="checksum"):
        unpack_payloads_in_place(raw, 2, capacity, rows)


def test_layout_rejects_lossy_blobs_and_short_prefixes() -> None:
    blob = compress((torch.randn(4096) * 0.02).bfloat16(), mantissa_bits=2).to_bytes()
    with pytest.raises(ValueError, match="lossy"):
        layout(blob, len(blob))
    coded = compress((torch.randn(4096) * 0.02).bfloat16()).to_bytes()
    lay = layout(coded[:LAYOUT_PREFIX_BYTES], len(coded))
    assert lay.mode == 1 and lay.sm[1] + 4 == len(coded)
    with pytest.raises(ValueError):
        layout(coded[:20], len(coded))
    with pytest.raises(ValueError, match="add up"):
        layout(coded[:LAYOUT_PREFIX_BYTES], len(coded) + 1)


def test_payload_bytes_reach_the_host_in_two_small_reads() -> None:
    stores = shards(2, 2048)
    gathered, capacity = gather(stores)
    rows = torch.empty(2, 40, 96, dtype=torch.bfloat16)
    with count_host_syncs() as syncs:
        assert unpack_payloads_in_place(gathered, 2, capacity, rows)
    by_op = syncs.by_op("other")
    # the headers, then the blobs' first bytes, then rank 1's raw blocks whole (their checksum is verified)
    assert by_op.get("Tensor.cpu", 0) == 2 + len(stores[1].blocks), syncs.summary()
    # (each block's decode is then checked: one more sync per block on a device backend, none by numba on the CPU)
