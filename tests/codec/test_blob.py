"""Serialization: validation of corrupt, truncated and crafted blobs; layout arithmetic past 2^31."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nz_lightning.kernels import CompressedTensor, compress
from nz_lightning.kernels.blob import MAGIC, count_bytes
from nz_lightning.kernels.blob_table import table_nbytes
from nz_lightning.kernels.layout import LANES_PER_SEGMENT, effective_steps, lane_lengths, num_lanes, num_segments

X = (torch.randn(20_000, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
BLOB = compress(X, steps_per_lane=64).to_bytes()


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_roundtrip_is_stable() -> None:
    c = CompressedTensor.from_bytes(BLOB)
    assert c.to_bytes() == BLOB
    assert torch.equal(c.decompress().view(torch.int16), X.view(torch.int16))


@given(cut=st.integers(0, len(BLOB) - 1))
def test_truncated_blob_is_rejected(cut: int) -> None:
    with pytest.raises(ValueError):
        CompressedTensor.from_bytes(BLOB[:cut])


@given(pos=st.integers(0, len(BLOB) - 1), bit=st.integers(0, 7))
def test_bit_flip_is_rejected(pos: int, bit: int) -> None:
    bad = bytearray(BLOB)
    bad[pos] ^= 1 << bit
    with pytest.raises(ValueError):
        CompressedTensor.from_bytes(bytes(bad))


def test_trailing_garbage_is_rejected() -> None:
    with pytest.raises(ValueError):
        CompressedTensor.from_bytes(_with_crc(BLOB[:-4] + b"\0"))


def test_bad_magic_and_version() -> None:
    with pytest.raises(ValueError, match="magic"):
        CompressedTensor.from_bytes(b"XXXX" + BLOB[4:])
    body = bytearray(BLOB[:-4])
    body[4] = 99
    with pytest.raises(ValueError, match="version"):
        CompressedTensor.from_bytes(_with_crc(bytes(body)))


def _sections(c: CompressedTensor) -> dict[str, int]:
    """Byte offsets of the arrays inside the blob body (see docs/FORMAT.md)."""
    assert c.table is not None and c.streams is not None
    pos = 8 + 8 * len(c.shape) + 16 + table_nbytes(c.table)  # version 3: the compact table section
    lanes = c.streams.states.numel()
    cw = count_bytes(c.numel(), c.steps_per_lane)
    return {"states": pos, "counts": pos + 4 * lanes, "words": pos + (4 + cw) * lanes, "count_bytes": cw}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_crafted_word_corruption_with_valid_checksum_is_rejected(backend: str) -> None:
    c = CompressedTensor.from_bytes(BLOB)
    off = _sections(c)["words"]
    body = bytearray(BLOB[:-4])
    body[off + 1] ^= 0x40  # high byte of the first lane's first word
    crafted = CompressedTensor.from_bytes(_with_crc(bytes(body)))
    with pytest.raises(ValueError, match="corrupt"):
        crafted.decompress(backend=backend)


def test_crafted_structure_errors() -> None:
    c = CompressedTensor.from_bytes(BLOB)
    sec = _sections(c)
    body = bytearray(BLOB[:-4])
    body[sec["states"] : sec["states"] + 4] = struct.pack("<I", 5)  # state below 2^16
    with pytest.raises(ValueError, match="lower bound"):
        CompressedTensor.from_bytes(_with_crc(bytes(body)))
    body = bytearray(BLOB[:-4])
    fmt = "<B" if sec["count_bytes"] == 1 else "<H"
    (cnt,) = struct.unpack_from(fmt, body, sec["counts"])
    struct.pack_into(fmt, body, sec["counts"], cnt + 1)
    with pytest.raises(ValueError, match="word counts"):
        CompressedTensor.from_bytes(_with_crc(bytes(body)))
    body = bytearray(BLOB[:-4])
    body[5] = 77  # dtype code
    with pytest.raises(ValueError, match="dtype code"):
        CompressedTensor.from_bytes(_with_crc(bytes(body)))


def test_empty_and_foreign_input() -> None:
    for data in (b"", MAGIC, b"\0" * 64):
        with pytest.raises(ValueError):
            CompressedTensor.from_bytes(data)


@pytest.mark.parametrize("n", [2**31 - 1, 2**31, 2**31 + 12345, 3 * 2**32 + 7])
@pytest.mark.parametrize("steps", [2048, 65535])
def test_layout_is_64bit_safe(n: int, steps: int) -> None:
    k = effective_steps(n, steps)
    assert k == steps
    lengths = lane_lengths(n, k)
    assert lengths.dtype == torch.int64
    assert lengths.numel() == num_lanes(n, k) == LANES_PER_SEGMENT * num_segments(n, k)
    assert int(lengths.sum()) == n
    assert int(lengths.max()) <= k
