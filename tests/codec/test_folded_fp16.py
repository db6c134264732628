"""Folded mantissa bits (blob versions 2 and 3): fp16 choices, old-version blobs, bad fold and version fields."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from nz_lightning.kernels import MODE_RANS, CompressedTensor, blob, compress, entropy_bits, quantize_counts, reference
from nz_lightning.kernels.backends import BACKENDS
from nz_lightning.kernels.spec import folded, max_fold_bits, spec_for


def _weights(n: int = 300_001, seed: int = 0, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def _recrc(body: bytes | bytearray) -> bytes:
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def legacy_bytes(ct: CompressedTensor, version: int) -> bytes:
    """A mode-1 blob in the layout of version 1 (no fold) or 2 (fp16 fold 1-3): u8 symbols, u16 counts."""
    assert ct.table is not None and ct.streams is not None and version in (1, 2)
    st, tb = ct.streams, ct.table
    parts = [struct.pack("<4sBBBB", b"NZCT", version, ct.spec.code, 1, len(ct.shape))]
    parts.append(struct.pack(f"<{len(ct.shape)}Q", *ct.shape))
    nsym, nwords = len(tb.symbols), st.words.numel()
    parts.append(struct.pack("<BBHIQ", tb.prob_bits, ct.fold_bits, nsym, ct.steps_per_lane, nwords))
    parts.append(bytes(s & 0xFF for s in tb.symbols) + struct.pack(f"<{len(tb.freqs)}H", *tb.freqs))
    parts.append(st.states.numpy().astype("<i4").tobytes() + st.counts.numpy().astype("<u2").tobytes())
    parts.append(st.words.numpy().astype("<i2").tobytes() + st.sm.numpy().tobytes())
    return _recrc(b"".join(parts))


def test_weights_fold_and_beat_the_exponent_bound() -> None:
    x = _weights()
    c = compress(x)
    assert c.fold_bits in (2, 3) and c.coding_spec == folded(spec_for(torch.float16), c.fold_bits)
    ints = x.view(torch.int16).to(torch.int64) & 0xFFFF
    h_exp = entropy_bits(torch.bincount((ints >> 10) & 31, minlength=32).tolist())
    f = c.fold_bits
    h_joint = entropy_bits(torch.bincount((ints >> (10 - f)) & ((32 << f) - 1), minlength=32 << f).tolist())
    assert h_joint < h_exp + f - 0.05  # the top mantissa bits of Gaussian weights are not uniform
    assert c.bits_per_weight < 11 + h_exp  # below the plain layout's bound (sign+mantissa raw + H(exp))
    assert c.bits_per_weight < 11 - f + h_joint + 0.05
    data = c.to_bytes()
    assert data[4] == blob.VERSION_COMPACT and data[8 + 8 + 1] == f  # version, then the coder header's fold byte
    assert _same(CompressedTensor.from_bytes(data).decompress(), x)


@pytest.mark.parametrize("steps", [3, 64, 2048])
def test_backends_write_and_read_the_same_folded_bytes(steps: int) -> None:
    x = _weights(20_000 + steps, seed=steps)
    blobs = {b: compress(x, backend=b, steps_per_lane=steps).to_bytes() for b in BACKENDS}
    assert blobs["torch"] == blobs["cpu"] == blobs["triton"]
    c = CompressedTensor.from_bytes(blobs["torch"])
    assert c.fold_bits > 0 or steps == 3  # 3 steps per lane: lane overhead makes it raw
    for b in BACKENDS:
        out = torch.empty_like(x)
        assert c.decompress(out=out, backend=b) is out and _same(out, x)


@pytest.mark.parametrize("fold", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("prob_bits", [11, 14])
def test_any_valid_fold_decodes_on_every_backend(fold: int, prob_bits: int) -> None:
    """A valid version-3 blob may fold 0 to 5 fp16 bits (10-bit symbols): the generic merge paths decode those."""
    x = _weights(5_003, seed=fold)
    spec = folded(spec_for(torch.float16), fold)
    table = quantize_counts(reference.exponent_histogram(x, spec).tolist(), prob_bits)
    streams = reference.encode(x, spec, table, 40)
    c = CompressedTensor(x.shape, x.dtype, MODE_RANS, table, 40, streams, fold_bits=fold)
    restored = CompressedTensor.from_bytes(c.to_bytes())
    assert restored.fold_bits == fold
    for b in BACKENDS:
        assert _same(restored.decompress(backend=b), x)


@pytest.mark.parametrize(
    ("dtype", "fold", "version"),
    [(torch.bfloat16, 0, 1), (torch.float16, 0, 1)] + [(torch.float16, f, 2) for f in (1, 2, 3)],
)
def test_old_version_blobs_still_decode(dtype: torch.dtype, fold: int, version: int) -> None:
    """Blobs of versions 1 and 2 (written by earlier releases) decode, and re-serialize as version 3."""
    x = _weights(9_001, seed=fold, dtype=dtype)
    spec = folded(spec_for(dtype), fold)
    table = quantize_counts(reference.exponent_histogram(x, spec).tolist(), 12)
    c = CompressedTensor(x.shape, x.dtype, MODE_RANS, table, 256, reference.encode(x, spec, table, 256), fold_bits=fold)
    old = CompressedTensor.from_bytes(legacy_bytes(c, version))
    assert old.fold_bits == fold and old.table == table
    for b in BACKENDS:
        assert torch.equal(old.decompress(backend=b).view(torch.int16), x.view(torch.int16))
    assert old.to_bytes()[4] == blob.VERSION_COMPACT and old.to_bytes() == c.to_bytes()


def test_uniform_mantissas_keep_the_plain_layout() -> None:
    """Folding is chosen by size: with uniform mantissa bits the bigger table does not pay."""
    g = torch.Generator().manual_seed(5)
    exps = torch.randint(10, 14, (4096,), generator=g)
    mans = torch.randint(0, 1024, (4096,), generator=g)
    x = ((exps << 10) | mans).to(torch.int16).view(torch.float16)
    c = compress(x)
    assert c.fold_bits == 0 and c.to_bytes()[4] == blob.VERSION_COMPACT and c.to_bytes()[8 + 8 + 1] == 0
    assert _same(c.decompress(), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bad_fold_fields_are_rejected(dtype: torch.dtype) -> None:
    spec = spec_for(dtype)
    good = compress(_weights(dtype=dtype)).to_bytes()
    assert good[4] == blob.VERSION_COMPACT
    fold_at = 8 + 8 + 1  # header, one shape dim, then prob_bits; the next byte holds the fold
    for bad in (max_fold_bits(spec) + 1, 11, 255):
        body = bytearray(good[:-4])
        body[fold_at] = bad
        with pytest.raises(ValueError, match="folded mantissa bits"):
            CompressedTensor.from_bytes(_recrc(body))
    raw = bytearray(compress(torch.ones(1, dtype=dtype)).to_bytes()[:-4])
    for version in (blob.VERSION_FOLDED, blob.VERSION_COMPACT):  # versions 2 and 3 exist only for rANS blobs
        raw[4] = version
        with pytest.raises(ValueError, match=f"version {version} with mode 0"):
            CompressedTensor.from_bytes(_recrc(raw))
    for version in (0, 4, 255):
        future = bytearray(good[:-4])
        future[4] = version
        with pytest.raises(ValueError, match=f"unsupported blob version {version}"):
            CompressedTensor.from_bytes(_recrc(future))


def test_version_2_folds_are_limited_to_fp16_three_bits() -> None:
    x = _weights(9_001)
    spec = spec_for(torch.float16)
    for fold, ok in ((0, False), (3, True), (4, False)):
        coding = folded(spec, fold)
        table = quantize_counts(reference.exponent_histogram(x, coding).tolist(), 12)
        ct = CompressedTensor(x.shape, x.dtype, MODE_RANS, table, 64, reference.encode(x, coding, table, 64))
        ct.fold_bits = fold
        if ok:
            assert _same(CompressedTensor.from_bytes(legacy_bytes(ct, 2)).decompress(), x)
        else:
            with pytest.raises(ValueError, match="version 2"):
                CompressedTensor.from_bytes(legacy_bytes(ct, 2))
    bf16 = compress(_weights(9_001, dtype=torch.bfloat16))
    assert bf16.fold_bits > 0
    with pytest.raises(ValueError, match="version 2"):  # bf16 never folded in version 2 (u8 symbols)
        CompressedTensor.from_bytes(legacy_bytes(bf16, 2))
