"""Serializing into a caller's buffer (``to_bytes_into``) and parsing without copies (``from_bytes(copy=False)``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nz_lightning.kernels import CompressedTensor, compress

GEN = torch.Generator().manual_seed(3)
TRAINED_LIKE = (torch.randn(256, 96, generator=GEN) * 0.02).to(torch.bfloat16)
CASES = {
    "rans": compress(TRAINED_LIKE),
    "raw": compress(torch.randint(-(2**15), 2**15, (300,), dtype=torch.int16, generator=GEN).view(torch.bfloat16)),
    "const": compress(torch.full((64, 3), -0.0, dtype=torch.float16)),
    "lossy": compress(TRAINED_LIKE.float(), mantissa_bits=3),
    "lossy-no-blocks": compress(TRAINED_LIKE, mantissa_bits=2, block_size=None),
}

MODES = {"rans": 1, "raw": 0, "const": 3, "lossy": 2, "lossy-no-blocks": 2}


@pytest.mark.parametrize("name", sorted(CASES))
def test_to_bytes_into_writes_the_same_blob(name: str) -> None:
    ct = CASES[name]
    assert ct.mode == MODES[name]
    blob = ct.to_bytes()
    buf = bytearray(b"\xaa" * (len(blob) + 7))
    assert ct.to_bytes_into(memoryview(buf)[3:]) == len(blob)
    assert bytes(buf[3 : 3 + len(blob)]) == blob
    assert buf[:3] == b"\xaa" * 3 and buf[3 + len(blob) :] == b"\xaa" * 4  # nothing written outside


@pytest.mark.parametrize("name", sorted(CASES))
def test_to_bytes_into_a_short_buffer_raises_and_writes_nothing(name: str) -> None:
    ct = CASES[name]
    buf = bytearray(len(ct.to_bytes()) - 1)
    with pytest.raises(ValueError, match="does not fit"):
        ct.to_bytes_into(memoryview(buf))
    assert not any(buf)


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_without_copy_views_the_buffer_and_decodes_the_same(name: str) -> None:
    ct = CASES[name]
    data = np.frombuffer(bytearray(ct.to_bytes()), dtype=np.uint8)
    view = CompressedTensor.from_bytes(memoryview(data), copy=False)
    assert torch.equal(view.decompress().view(torch.uint8), ct.decompress().view(torch.uint8))
    big = view.raw if view.streams is None else view.streams.sm
    assert big is not None
    lo, hi = data.ctypes.data, data.ctypes.data + data.size
    assert lo <= big.data_ptr() < hi or big.numel() == 0  # no copy of the payload
    copied = CompressedTensor.from_bytes(memoryview(data))
    big = copied.raw if copied.streams is None else copied.streams.sm
    assert big is not None and not lo <= big.data_ptr() < hi  # the default copies
