"""Fixed-capacity all-gather payloads of compressed shards (single process)."""

from __future__ import annotations

import pytest
import torch

from nz_lightning.distributed.fsdp_payload import (
    HEADER_BYTES,
    encoded_size,
    pack_payload,
    payload_overflowed,
    unpack_payload,
)
from nz_lightning.tensor.parameter import WeightStore


def store(rows: int = 64, row_block_bytes: int | None = None) -> WeightStore:
    torch.manual_seed(0)
    return WeightStore((torch.randn(rows, 96) * 0.02).bfloat16(), row_block_bytes=row_block_bytes)


@pytest.mark.parametrize("row_block_bytes", [None, 2048], ids=["one-block", "row-blocks"])
def test_round_trip_bit_exact(row_block_bytes: int | None) -> None:
    s = store(row_block_bytes=row_block_bytes)
    capacity = encoded_size(s) + 100
    payload, fits = pack_payload(s, capacity, torch.device("cpu"))
    assert fits and payload.dtype == torch.uint8 and payload.numel() == capacity
    assert encoded_size(s) < 0.8 * s.shape.numel() * 2  # bf16 weights: well under the dense bytes
    out = torch.empty(s.shape, dtype=s.dtype)
    part = payload.numpy().data
    assert not payload_overflowed(part, capacity)
    unpack_payload(part, capacity, out)
    assert torch.equal(out.view(torch.int16), s.read().view(torch.int16))


def test_overflow_carries_only_a_flag() -> None:
    s = store()
    capacity = encoded_size(s) - 1
    payload, fits = pack_payload(s, capacity, torch.device("cpu"))
    assert not fits and payload.numel() == capacity
    part = payload.numpy().data
    assert payload_overflowed(part, capacity)
    with pytest.raises(RuntimeError, match="overflowed"):
        unpack_payload(part, capacity, torch.empty(s.shape, dtype=s.dtype))


def test_mismatched_capacity_or_shape_or_garbage_raises() -> None:
    s = store()
    capacity = encoded_size(s) + 64
    payload, _ = pack_payload(s, capacity, torch.device("cpu"))
    out = torch.empty(s.shape, dtype=s.dtype)
    bigger = torch.cat([payload, torch.zeros(64, dtype=torch.uint8)])
    with pytest.raises(RuntimeError, match="capacity"):
        unpack_payload(bigger.numpy().data, capacity + 64, out)
    with pytest.raises(RuntimeError, match="rows"):
        unpack_payload(payload.numpy().data, capacity, torch.empty(2 * s.shape[0], 96, dtype=s.dtype))
    with pytest.raises(RuntimeError, match="magic"):
        unpack_payload(torch.zeros(capacity, dtype=torch.uint8).numpy().data, capacity, out)
    corrupt = payload.clone()
    corrupt[HEADER_BYTES + 8 + 40] ^= 0xFF  # inside the blob: its CRC catches it
    with pytest.raises(ValueError):
        unpack_payload(corrupt.numpy().data, capacity, out)
    with pytest.raises(ValueError, match="header"):
        pack_payload(s, HEADER_BYTES - 1, torch.device("cpu"))
