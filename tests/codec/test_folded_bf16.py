"""bf16 with its top mantissa bits coded in the rANS symbol (blob version 3), and the compact table section.

Property tests: every bit pattern (NaN payloads, ±inf, -0.0, subnormals) round-trips bit-exactly through every
backend for every bf16 fold; the three backends write the same bytes; incompressible data grows by at most the
header; and corrupt table sections are rejected.
"""

from __future__ import annotations

import os
import struct
import zlib

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend runs on CPU tensors (set before it is imported)

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nz_lightning.kernels import (
    MODE_RANS,
    MODE_RAW,
    CompressedTensor,
    blob,
    compress,
    entropy_bits,
    quantize_counts,
    reference,
)
from nz_lightning.kernels.backends import BACKENDS
from nz_lightning.kernels.blob_table import decode_table, encode_table, runs, table_nbytes, varint
from nz_lightning.kernels.freqtable import FreqTable
from nz_lightning.kernels.spec import folded, max_fold_bits, spec_for

BF16 = spec_for(torch.bfloat16)
SPECIAL = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x807F, 0x0040, 0x7F7F, 0xFF7F, 0x3F80]
"""+0, -0, ±inf, quiet NaNs with payloads, a signalling NaN, subnormals (smallest, largest negative, mid), ±max, 1."""


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


def _from_patterns(patterns: list[int]) -> torch.Tensor:
    return torch.tensor(patterns, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _mixed(seed: int, n: int, specials: list[int]) -> torch.Tensor:
    """Gaussian bf16 weights with special bit patterns spread over them."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    if specials:
        where = torch.randint(0, n, (len(specials),), generator=g)
        _bits(x)[where] = _bits(_from_patterns(specials))
    return x


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3000),
    specials=st.lists(st.sampled_from(SPECIAL), max_size=12),
    fold=st.integers(0, max_fold_bits(BF16)),
    steps=st.sampled_from([1, 5, 32, 2048]),
    prob_bits=st.sampled_from([10, 12, 15]),
)
def test_every_bf16_fold_round_trips_special_values_on_every_backend(
    seed: int, n: int, specials: list[int], fold: int, steps: int, prob_bits: int
) -> None:
    x = _mixed(seed, n, specials)
    coding = folded(BF16, fold)
    table = quantize_counts(reference.exponent_histogram(x, coding).tolist(), prob_bits)
    streams = reference.encode(x, coding, table, steps)
    c = CompressedTensor(x.shape, x.dtype, MODE_RANS, table, steps, streams, fold_bits=fold)
    restored = CompressedTensor.from_bytes(c.to_bytes())
    assert restored.fold_bits == fold and restored.table == table
    for b in BACKENDS:
        assert torch.equal(_bits(restored.decompress(backend=b)), _bits(x)), b


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 4000),
    specials=st.lists(st.sampled_from(SPECIAL), max_size=6),
    scale=st.sampled_from([1e-30, 0.02, 1.0, 3e4]),
    steps=st.sampled_from([3, 64, 2048]),
)
def test_backends_write_the_same_bytes(seed: int, n: int, specials: list[int], scale: float, steps: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * scale).to(torch.bfloat16)
    if specials:
        _bits(x)[torch.randint(0, n, (len(specials),), generator=g)] = _bits(_from_patterns(specials))
    blobs = {b: compress(x, backend=b, steps_per_lane=steps).to_bytes() for b in BACKENDS}
    assert len(set(blobs.values())) == 1
    assert torch.equal(_bits(CompressedTensor.from_bytes(blobs["cpu"]).decompress()), _bits(x))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_incompressible_data_grows_by_at_most_the_header(seed: int, shape: list[int], dtype: torch.dtype) -> None:
    spec = spec_for(dtype)
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    ints = torch.randint(-(2 ** (spec.total_bits - 1)), 2 ** (spec.total_bits - 1), (n,), generator=g)
    x = ints.to(spec.int_dtype).view(dtype).reshape(shape)
    c = compress(x, backend="cpu")
    assert len(c.to_bytes()) <= n * spec.itemsize + 8 + 8 * len(shape) + 4
    assert c.mode == MODE_RAW or len(c.to_bytes()) < n * spec.itemsize
    assert torch.equal(c.decompress().view(spec.int_dtype), x.view(spec.int_dtype))


def test_trained_like_weights_fold_and_beat_the_exponent_bound() -> None:
    x = _mixed(0, 1 << 18, [])
    c = compress(x)
    bits = _bits(x).to(torch.int64) & 0xFFFF
    h_exp = entropy_bits(torch.bincount((bits >> 7) & 0xFF, minlength=256).tolist())
    f = c.fold_bits
    h_joint = entropy_bits(torch.bincount((bits >> (7 - f)) & ((256 << f) - 1), minlength=256 << f).tolist())
    assert f == 2 and c.to_bytes()[8 + 8 + 1] == 2
    assert c.bits_per_weight < 8 + h_exp - 0.03  # below the exponent-only bound, lane overhead included
    assert 8 - f + h_joint < c.bits_per_weight < 8 - f + h_joint + 0.05  # near the folded bound


def test_small_tensors_use_one_byte_counts_and_a_compact_table() -> None:
    x = _mixed(1, 4096, [])
    c = compress(x)
    assert c.mode == MODE_RANS and c.table is not None
    assert blob.count_bytes(4096, c.steps_per_lane) == 1
    assert len(encode_table(c.table)) < 2 * len(c.table.symbols) < 3 * len(c.table.symbols)  # vs version 1/2
    assert len(c.to_bytes()) == blob.serialized_size(c)


@settings(max_examples=200, deadline=None)
@given(
    present=st.sets(st.integers(0, 1023), min_size=1, max_size=200),
    prob_bits=st.integers(8, 15),
    seed=st.integers(0, 1000),
)
def test_table_section_round_trips(present: set[int], prob_bits: int, seed: int) -> None:
    symbols = sorted(present)
    if len(symbols) > 1 << prob_bits:
        symbols = symbols[: 1 << prob_bits]
    g = torch.Generator().manual_seed(seed)
    counts = [0] * 1024
    for s, c in zip(symbols, torch.randint(1, 10_000, (len(symbols),), generator=g).tolist(), strict=True):
        counts[s] = c
    table = quantize_counts(counts, prob_bits)
    data = encode_table(table)
    assert len(runs(table.symbols)) <= len(symbols) and table_nbytes(table) == len(data)
    back, end = decode_table(memoryview(data + b"tail"), 0, len(symbols), prob_bits, 1024)
    assert back == table and end == len(data)


def test_bad_table_sections_are_rejected() -> None:
    table = FreqTable(12, (3, 4, 5, 9), (1000, 1000, 1000, 1096))

    def parse(data: bytes, nsym: int = 4, alphabet: int = 1024) -> FreqTable:
        return decode_table(memoryview(data), 0, nsym, 12, alphabet)[0]

    good = encode_table(table)
    assert parse(good) == table and good[:5] == bytes([2, 3, 2, 3, 0])  # 2 runs: (gap 3, len 3), (gap 3, len 1)
    freqs = b"".join(varint(f) for f in table.freqs)
    cases = {
        "not a minimal varint": bytes([2, 0x83, 0x00, 2, 1, 0]) + freqs,
        "runs touch": bytes([2, 3, 2, 0, 0]) + freqs,
        "symbol runs": bytes([0]) + freqs,  # no run
        "leave the alphabet": bytes([1, 0x80, 0x08, 3]) + freqs,  # run at 1024
        "hold 3 symbols": bytes([1, 3, 2]) + freqs,
        "do not sum": bytes([2, 3, 2, 3, 0]) + b"".join(varint(f) for f in (1000, 1000, 1000, 1095)),
        "longer than 3 bytes": bytes([2, 3, 2, 3, 0, 0x80, 0x80, 0x80, 0x01]),
        "runs past the end": good[:-1],
    }
    for match, data in cases.items():
        with pytest.raises(ValueError, match=match):
            parse(data)
    with pytest.raises(ValueError, match="table symbols for an alphabet"):
        parse(good, nsym=0)
    with pytest.raises(ValueError, match="varint value"):
        varint(1 << 21)


def test_a_corrupt_table_inside_a_blob_is_rejected() -> None:
    c = compress(_mixed(2, 20_000, []))
    data = bytearray(c.to_bytes()[:-4])
    table_at = 8 + 8 + 16
    data[table_at] = 0  # run count 0
    with pytest.raises(ValueError, match="corrupt blob"):
        CompressedTensor.from_bytes(bytes(data) + struct.pack("<I", zlib.crc32(bytes(data))))
