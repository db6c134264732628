"""fp16 with the top mantissa bits coded together with the exponent (blob version 2)."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from nz_lightning.kernels import MODE_RANS, CompressedTensor, blob, compress, entropy_bits, quantize_counts, reference
from nz_lightning.kernels.backends import BACKENDS
from nz_lightning.kernels.spec import folded, spec_for


def _weights(n: int = 300_001, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(torch.float16)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_weights_fold_two_bits_and_beat_the_exponent_bound() -> None:
    x = _weights()
    c = compress(x)
    assert c.fold_bits == 2 and c.coding_spec == folded(spec_for(torch.float16), 2)
    ints = x.view(torch.int16).to(torch.int64) & 0xFFFF
    h_exp = entropy_bits(torch.bincount((ints >> 10) & 31, minlength=32).tolist())
    h_joint = entropy_bits(torch.bincount((ints >> 8) & 127, minlength=128).tolist())
    assert h_joint < h_exp + 2 - 0.05  # the top mantissa bits of Gaussian weights are not uniform
    assert c.bits_per_weight < 11 + h_exp  # below the plain layout's bound (sign+mantissa raw + H(exp))
    assert c.bits_per_weight < 9 + h_joint + 0.05
    data = c.to_bytes()
    assert data[4] == blob.VERSION_FOLDED and data[8 + 8 + 1] == 2  # version, then the coder header's fold byte
    assert _same(CompressedTensor.from_bytes(data).decompress(), x)


@pytest.mark.parametrize("steps", [3, 64, 2048])
def test_backends_write_and_read_the_same_folded_bytes(steps: int) -> None:
    x = _weights(20_000 + steps, seed=steps)
    blobs = {b: compress(x, backend=b, steps_per_lane=steps).to_bytes() for b in BACKENDS}
    assert blobs["torch"] == blobs["cpu"] == blobs["triton"]
    c = CompressedTensor.from_bytes(blobs["torch"])
    for b in BACKENDS:
        out = torch.empty_like(x)
        assert c.decompress(out=out, backend=b) is out and _same(out, x)


@pytest.mark.parametrize("fold", [1, 2, 3])
@pytest.mark.parametrize("prob_bits", [11, 14])
def test_any_valid_fold_decodes_on_every_backend(fold: int, prob_bits: int) -> None:
    """Our encoder folds 2 bits, but a valid blob may fold 1 to 3: the generic merge paths decode those."""
    x = _weights(5_003, seed=fold)
    spec = folded(spec_for(torch.float16), fold)
    table = quantize_counts(reference.exponent_histogram(x, spec).tolist(), prob_bits)
    streams = reference.encode(x, spec, table, 40)
    c = CompressedTensor(x.shape, x.dtype, MODE_RANS, table, 40, streams, fold_bits=fold)
    restored = CompressedTensor.from_bytes(c.to_bytes())
    assert restored.fold_bits == fold
    for b in BACKENDS:
        assert _same(restored.decompress(backend=b), x)


def test_uniform_mantissas_keep_the_plain_layout() -> None:
    """Folding is chosen by size: with uniform mantissa bits the bigger table does not pay."""
    g = torch.Generator().manual_seed(5)
    exps = torch.randint(10, 14, (4096,), generator=g)
    mans = torch.randint(0, 1024, (4096,), generator=g)
    x = ((exps << 10) | mans).to(torch.int16).view(torch.float16)
    c = compress(x)
    assert c.fold_bits == 0 and c.to_bytes()[4] == blob.VERSION
    assert _same(c.decompress(), x)


def _recrc(body: bytes | bytearray) -> bytes:
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def test_bad_fold_fields_are_rejected() -> None:
    good = compress(_weights()).to_bytes()
    assert good[4] == blob.VERSION_FOLDED
    fold_at = 8 + 8 + 1  # header, one shape dim, then prob_bits; the next byte holds the fold
    for bad in (0, 4):
        body = bytearray(good[:-4])
        body[fold_at] = bad
        with pytest.raises(ValueError, match="folded mantissa bits"):
            CompressedTensor.from_bytes(_recrc(body))
    raw = bytearray(compress(torch.ones(1, dtype=torch.float16)).to_bytes()[:-4])
    raw[4] = blob.VERSION_FOLDED  # version 2 exists only for coded blobs
    with pytest.raises(ValueError, match="version 2 with mode 0"):
        CompressedTensor.from_bytes(_recrc(raw))
    future = bytearray(good[:-4])
    future[4] = 3
    with pytest.raises(ValueError, match="unsupported blob version 3"):
        CompressedTensor.from_bytes(_recrc(future))
