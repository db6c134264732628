"""Decoding gathered payloads in place (the GPU path: only headers and tables go to the host), run on the CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nz_lightning.distributed.fsdp_payload import (
    FLAG_OVERFLOW,
    FLAG_UNCHECKED,
    encoded_size,
    pack_payload,
    unpack_payload,
)
from nz_lightning.distributed.fsdp_payload_device import unpack_payloads_in_place
from nz_lightning.distributed.fsdp_payload_pack import PayloadHead, pack_payload_on_device
from nz_lightning.kernels import CompressedTensor, backends, compress
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


def pack_on_device(
    stores: list[WeightStore], capacity: int | None = None
) -> tuple[torch.Tensor, int, list[PayloadHead]]:
    """Payloads packed as on a GPU (here on the CPU) back to back, with their heads."""
    capacity = max(encoded_size(s) for s in stores) + 3 if capacity is None else capacity
    packed = [pack_payload_on_device(s, capacity, torch.device("cpu")) for s in stores]
    return torch.cat([p for p, _ in packed]), capacity, [h for _, h in packed]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("row_block_bytes", [None, 2048], ids=["one-block", "row-blocks"])
def test_device_pack_decodes_bit_exact_with_exchanged_heads(backend: str, row_block_bytes: int | None) -> None:
    stores = shards(3, row_block_bytes)  # coded, raw and constant blocks
    coded = WeightStore((torch.randn(40, 96) * 0.02).bfloat16(), backend, row_block_bytes=row_block_bytes)
    stores.append(coded)
    capacity = max(encoded_size(s) for s in stores) + 64  # (sizes settle the word totals)
    coded.write(coded.read() * 1.5)  # a re-encode: the triton encoder leaves its word totals on the device
    if backend == "triton":
        assert all(ct.streams is not None and ct.streams.used is not None for ct in coded._held)
    gathered, capacity, heads = pack_on_device(stores, capacity)
    if backend == "triton":  # packed without reading the word totals back: the bound-sized buffers went out
        assert all(ct.streams is not None and ct.streams.used is not None for ct in coded._held)
    assert all(h.flags & FLAG_UNCHECKED for h in heads[:1] + heads[3:]) and not heads[2].flags & FLAG_UNCHECKED
    heads = [PayloadHead.from_bytes(h.to_bytes()) for h in heads]  # as exchanged
    for given in (heads, None):  # exchanged heads, or read back from the buffer
        rows = torch.empty(len(stores), 40, 96, dtype=torch.bfloat16)
        assert unpack_payloads_in_place(gathered, len(stores), capacity, rows, given)
        for r, s in enumerate(stores):
            assert torch.equal(rows[r].view(torch.int16), s.read().view(torch.int16)), (r, given is None)
    part = memoryview(gathered[:capacity].numpy().tobytes())
    with pytest.raises(RuntimeError, match="in place"):  # no checksums: the host parser refuses it
        unpack_payload(part, capacity, torch.empty(40, 96, dtype=torch.bfloat16))


def test_device_pack_matches_host_pack_but_for_checksums() -> None:
    store = WeightStore((torch.randn(40, 96) * 0.02).bfloat16(), row_block_bytes=2048)
    capacity = encoded_size(store) + 64
    host, _ = pack_payload(store, capacity, torch.device("cpu"))
    device, head = pack_payload_on_device(store, capacity, torch.device("cpu"))
    assert head.lengths == tuple(len(b) for b in store.to_blobs())
    diff = (host != device).nonzero().reshape(-1).tolist()
    offset, crcs = 32 + 8 * len(head.lengths), set()
    for n in head.lengths:
        offset += n
        crcs.update(range(offset - 4, offset))  # each blob's checksum field: zero on the device
    assert 4 in diff and set(diff) - {4} <= crcs  # byte 4: the flags (FLAG_UNCHECKED)
    assert bool((device[sorted(crcs)] == 0).all())


def test_device_pack_overflow_and_bad_heads() -> None:
    stores = shards(2, None)
    capacity = encoded_size(stores[0]) + 1  # rank 1's raw block does not fit
    packed = [pack_payload_on_device(s, capacity, torch.device("cpu")) for s in stores]
    heads = [h for _, h in packed]
    assert not heads[0].flags & FLAG_OVERFLOW and heads[1].flags & FLAG_OVERFLOW
    gathered = torch.cat([p for p, _ in packed])
    rows = torch.full((2, 40, 96), 7.0, dtype=torch.bfloat16)
    for given in (heads, None):
        assert not unpack_payloads_in_place(gathered, 2, capacity, rows, given)
    assert bool((rows == 7.0).all())
    gathered, capacity, heads = pack_on_device(shards(2, None))
    with pytest.raises(RuntimeError, match="heads for 2 ranks"):
        unpack_payloads_in_place(gathered, 2, capacity, rows, heads[:1])
    with pytest.raises(RuntimeError, match="capacity"):
        unpack_payloads_in_place(gathered, 2, capacity, rows, [heads[0], replace(heads[1], capacity=capacity + 1)])
    with pytest.raises(ValueError, match="add up"):  # a head that does not describe its blob
        wrong = replace(heads[0], lengths=(heads[0].lengths[0] + 1,))
        unpack_payloads_in_place(gathered, 2, capacity, rows, [wrong, heads[1]])
    with pytest.raises(RuntimeError, match="blocks"):  # beyond the capacity
        wrong = replace(heads[0], lengths=(capacity,))
        unpack_payloads_in_place(gathered, 2, capacity, rows, [wrong, heads[1]])
    with pytest.raises(RuntimeError, match="truncated"):
        PayloadHead.from_bytes(heads[0].to_bytes()[:10])
    with pytest.raises(ValueError, match="header"):
        pack_payload_on_device(stores[0], 8, torch.device("cpu"))


@pytest.fixture
def device_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gathered blobs decode with the Triton backend (interpreted here), as on a GPU: the numba decoder checks each
    decode on the host at once, so it neither defers a check nor shows a device decoder's reads."""
    monkeypatch.setattr(backends, "default_backend", lambda device: "triton")


@pytest.mark.usefixtures("device_decoder")
def test_corrupt_streams_with_exchanged_heads_raise_at_the_deferred_check() -> None:
    store = WeightStore((torch.randn(40, 96) * 0.02).bfloat16())
    gathered, capacity, heads = pack_on_device([store])
    lay = layout(heads[0].prefixes[0], heads[0].lengths[0])
    start = 32 + 8
    gathered[start + lay.words[0] : start + lay.words[1]] = 0xFF
    rows = torch.empty(1, 40, 96, dtype=torch.bfloat16)
    CompressedTensor.check_deferred()
    assert unpack_payloads_in_place(gathered, 1, capacity, rows, heads)  # no sync: the check is deferred
    with pytest.raises(ValueError, match="deferred"):
        CompressedTensor.check_deferred()
    CompressedTensor.reset_deferred()


@pytest.mark.usefixtures("device_decoder")
def test_exchanged_heads_make_no_host_reads() -> None:
    stores = [WeightStore((torch.randn(40, 96) * 0.02).bfloat16(), row_block_bytes=2048) for _ in range(2)]
    capacity = max(encoded_size(s) for s in stores) + 3
    with count_host_syncs() as syncs:
        packed = [pack_payload_on_device(s, capacity, torch.device("cpu")) for s in stores]
        gathered = torch.cat([p for p, _ in packed])
        rows = torch.empty(2, 40, 96, dtype=torch.bfloat16)
        assert unpack_payloads_in_place(gathered, 2, capacity, rows, [h for _, h in packed])
    assert syncs.total == 0, syncs.summary()
    with count_host_syncs() as syncs:  # the same payloads with their heads read back: two small reads
        assert unpack_payloads_in_place(gathered, 2, capacity, rows)
    assert syncs.by_op("other").get("Tensor.cpu", 0) == 2, syncs.summary()
    for r, s in enumerate(stores):
        assert torch.equal(rows[r], s.read())


@pytest.mark.usefixtures("device_decoder")
@pytest.mark.parametrize("where", ["block table", "blob prefix"])
def test_gathered_bytes_that_differ_from_their_heads_are_flagged(where: str) -> None:
    store = WeightStore((torch.randn(40, 96) * 0.02).bfloat16(), row_block_bytes=2048)
    gathered, capacity, heads = pack_on_device([store])
    at = 33 if where == "block table" else 32 + 8 * len(heads[0].lengths) + 5  # a block length, a blob header byte
    gathered[at] ^= 0x40  # bytes the decode never reads (it trusts the heads): only the comparison sees them
    rows = torch.empty(1, 40, 96, dtype=torch.bfloat16)
    assert unpack_payloads_in_place(gathered, 1, capacity, rows, heads)  # no sync: flagged on the device
    assert torch.equal(rows[0], store.read())
    with pytest.raises(ValueError, match="deferred"):
        CompressedTensor.check_deferred()
    CompressedTensor.reset_deferred()
    with pytest.raises(ValueError, match="deferred"):  # checked before returning (evaluation)
        unpack_payloads_in_place(gathered, 1, capacity, rows, heads, defer_checks=False)
    CompressedTensor.reset_deferred()
    gathered[at] ^= 0x40
    assert unpack_payloads_in_place(gathered, 1, capacity, rows, heads, defer_checks=False)


def test_payload_heads_that_cannot_describe_a_payload_are_refused() -> None:
    _, _, (head,) = pack_on_device([WeightStore((torch.randn(40, 96) * 0.02).bfloat16())])
    head.check()
    bad = {
        "unknown flags": replace(head, flags=head.flags | 8),
        "below the header": replace(head, capacity=8),
        "lists 1 blobs": replace(head, flags=head.flags | FLAG_OVERFLOW),
        "lists 0 blobs": replace(head, lengths=(), prefixes=()),
        "prefix bytes": replace(head, prefixes=(head.prefixes[0] + bytes(head.lengths[0]),)),
    }
    for match, wrong in bad.items():
        with pytest.raises(RuntimeError, match=match):
            PayloadHead.from_bytes(wrong.to_bytes())


@pytest.mark.parametrize("backend", ["triton"])
def test_bound_sized_buffers_that_do_not_fit_are_trimmed_before_an_overflow(backend: str) -> None:
    store = WeightStore((torch.randn(128, 96) * 0.02).bfloat16(), backend)
    capacity = encoded_size(store) + 4  # exact sizes: no room for the encoder's bound-sized word buffers
    store.write(store.read())  # re-encoded: the same exact size, its word total left on the device
    (ct,) = store.blocks
    assert ct.streams is not None and ct.streams.used is not None
    assert 2 * ct.streams.words.numel() > 2 * int(ct.streams.used) + 4  # the buffer alone would not fit
    payload, head = pack_payload_on_device(store, capacity, torch.device("cpu"))
    assert not head.flags & FLAG_OVERFLOW  # trimmed (one read back), then it fits
    assert ct.streams.used is None
    rows = torch.empty(1, 128, 96, dtype=torch.bfloat16)
    assert unpack_payloads_in_place(payload, 1, capacity, rows, [head])
    assert torch.equal(rows[0], store.read())
