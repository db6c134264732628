"""Size limits of blobs: declared sizes are checked against the blob's length before anything is allocated."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from nz_lightning.kernels import MODE_CONST, MODE_RANS, CompressedTensor, compress
from nz_lightning.kernels.blob import MAX_CONST_BYTES, PEEK_BYTES, peek
from nz_lightning.kernels.spec import spec_for


def _blob(dtype: torch.dtype, mode: int, shape: tuple[int, ...], rest: bytes, version: int = 1) -> bytes:
    body = struct.pack("<4sBBBB", b"NZCT", version, spec_for(dtype).code, mode, len(shape))
    body += struct.pack(f"<{len(shape)}Q", *shape) + rest
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_constant_blob_of_40_bytes_declaring_4_gib_is_refused() -> None:
    data = _blob(torch.float32, MODE_CONST, (1 << 30,), b"\0\0\x80\x3f")
    assert len(data) <= 40
    with pytest.raises(ValueError, match="cap for constant blobs"):
        CompressedTensor.from_bytes(data)
    ct = CompressedTensor.from_bytes(data, max_const_bytes=4 << 30)  # an explicit allowance: parsed, not decoded
    assert ct.mode == MODE_CONST and ct.numel() == 1 << 30
    assert peek(data, len(data)) == (torch.Size([1 << 30]), torch.float32, MODE_CONST)


def test_constant_blob_at_the_cap_round_trips() -> None:
    x = torch.full((MAX_CONST_BYTES // 2,), 1.5, dtype=torch.bfloat16)
    ct = compress(x)
    assert ct.mode == MODE_CONST
    assert torch.equal(CompressedTensor.from_bytes(ct.to_bytes()).decompress(), x)
    with pytest.raises(ValueError, match="cap"):
        CompressedTensor.from_bytes(ct.to_bytes(), max_const_bytes=MAX_CONST_BYTES - 1)


@pytest.mark.parametrize("shape", [(1 << 63, 0), (0, 2**64 - 1), (1 << 63,)])
def test_dimensions_of_2_pow_63_are_refused_even_when_empty(shape: tuple[int, ...]) -> None:
    data = _blob(torch.bfloat16, 0, shape, b"")
    with pytest.raises(ValueError, match="too large"):
        CompressedTensor.from_bytes(data)
    with pytest.raises(ValueError, match="too large"):
        peek(data, len(data))


def test_coded_blob_cannot_declare_more_elements_than_its_bytes_hold() -> None:
    x = (torch.randn(4096) * 0.02).to(torch.bfloat16)
    good = compress(x, backend="torch").to_bytes()
    assert good[6] == MODE_RANS
    body = bytearray(good[:-4])
    body[8:16] = (8 * len(good) + 1).to_bytes(8, "little")  # more elements than 1 sign bit each allows
    bad = bytes(body) + zlib.crc32(bytes(body)).to_bytes(4, "little")
    with pytest.raises(ValueError, match="cannot hold"):
        CompressedTensor.from_bytes(bad)
    with pytest.raises(ValueError, match="cannot hold"):
        peek(bad[:PEEK_BYTES], len(bad))
    assert peek(good[:PEEK_BYTES], len(good)) == (torch.Size([4096]), torch.bfloat16, MODE_RANS)


def test_peek_checks_raw_and_constant_lengths() -> None:
    raw = _blob(torch.float16, 0, (3,), b"\0" * 6)
    assert peek(raw, len(raw))[0] == torch.Size([3])
    with pytest.raises(ValueError, match="raw blob"):
        peek(raw, len(raw) + 2)
    const = _blob(torch.float16, MODE_CONST, (1 << 40,), b"\0\0")
    with pytest.raises(ValueError, match="constant blob"):
        peek(const, len(const) + 1)
    with pytest.raises(ValueError, match="magic"):
        peek(b"XXXX" + raw[4:], len(raw))
    with pytest.raises(ValueError, match="truncated"):
        peek(raw[:6], 6)
