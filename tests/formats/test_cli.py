"""NZSF checkpoint container and the ``nz-lightning`` CLI: byte-identical restores, validation, atomic writes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nz_lightning.cli import float_sizes, main
from nz_lightning.formats import nzsf as cf
from nz_lightning.kernels import compress

BACKEND = "torch"  # the reference backend: no JIT warm-up, so this file stays fast


def mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w_bf16": (torch.randn(64, 512, generator=gen) * 0.02).to(torch.bfloat16),
        "w_fp16": (torch.randn(33, 7, generator=gen) * 0.1).to(torch.float16),
        "w_fp32": torch.randn(1000, generator=gen),
        "ids_i64": torch.arange(-5, 12, dtype=torch.int64),
        "mask_bool": torch.rand(13, generator=gen) > 0.5,
        "bytes_u8": torch.randint(0, 256, (3, 5), generator=gen, dtype=torch.uint8),
        "empty_bf16": torch.empty(0, 4, dtype=torch.bfloat16),
        "empty_u8": torch.empty(0, dtype=torch.uint8),
        "scalar_f32": torch.tensor(-3.25),
        "scalar_i64": torch.tensor(7),
        "specials_bf16": torch.tensor(
            [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40], dtype=torch.bfloat16
        ),
    }


@pytest.fixture
def mixed_file(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.safetensors"
    save_file(mixed_tensors(), str(path), metadata={"format": "pt", "note": "mixed dtypes"})
    return path


def handmade_safetensors(path: Path, header: dict[str, object], data: bytes, pad: int = 0) -> Path:
    """Write a safetensors file byte by byte (lets tests add gaps, padding and odd entries)."""
    js = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(js)) + js + data)
    return path


def test_round_trip_byte_identical_mixed_dtypes(mixed_file: Path, tmp_path: Path) -> None:
    container, restored = tmp_path / "m.nzsf", tmp_path / "restored.safetensors"
    seen: list[tuple[str, int, int]] = []
    report = cf.compress_file(mixed_file, container, backend=BACKEND, progress=lambda *a: seen.append(a))
    assert container.read_bytes()[:4] == b"NZSF"
    assert report.container_size == container.stat().st_size < mixed_file.stat().st_size
    assert seen[-1][1] == seen[-1][2] == report.original_size - 8 - struct.unpack("<Q", mixed_file.read_bytes()[:8])[0]
    digest = cf.decompress_file(container, restored, backend=BACKEND)
    assert restored.read_bytes() == mixed_file.read_bytes()
    assert digest == cf.sha256_file(mixed_file)
    loaded = load_file(str(restored))
    for name, t in mixed_tensors().items():
        assert torch.equal(loaded[name].view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    modes = {t.name: t.mode for t in report.tensors}
    assert modes["w_bf16"] == "rans" and modes["ids_i64"] == "raw" and modes["empty_bf16"] == "nzct-raw"


def test_round_trip_gaps_padding_and_unknown_dtype(tmp_path: Path) -> None:
    w = (torch.randn(4096) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    header = {
        "__metadata__": {"k": "v"},
        "b": {"dtype": "BF16", "shape": [64, 64], "data_offsets": [16, 16 + len(w)]},
        "a": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
        "z": {"dtype": "F8_E4M3", "shape": [0], "data_offsets": [16, 16]},
        "new": {"dtype": "F4", "shape": [6], "data_offsets": [16 + len(w) + 5, 16 + len(w) + 8]},
    }
    data = b"abc" + b"\xee" * 13 + w + b"gap!!" + b"xyz" + b"trailing"
    src = handmade_safetensors(tmp_path / "odd.safetensors", header, data, pad=7)
    report = cf.compress_file(src, tmp_path / "odd.nzsf", backend=BACKEND)
    assert report.gap_bytes == 13 + 5 + 8
    assert [t.name for t in report.tensors] == ["a", "z", "b", "new"]
    cf.decompress_file(tmp_path / "odd.nzsf", tmp_path / "back.safetensors", backend=BACKEND)
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()


def test_inspect_numbers(tmp_path: Path) -> None:
    src = tmp_path / "w.safetensors"
    gen = torch.Generator().manual_seed(1)
    save_file({"w": (torch.randn(256, 256, generator=gen) * 0.02).to(torch.bfloat16), "n": torch.arange(4)}, str(src))
    predicted = cf.inspect_file(src, backend=BACKEND)
    written = cf.compress_file(src, tmp_path / "w.nzsf", backend=BACKEND)
    from_container = cf.inspect_file(tmp_path / "w.nzsf", backend=BACKEND)
    assert predicted.source == "safetensors" and from_container.source == "nzsf"
    assert predicted.tensors == written.tensors == from_container.tensors
    assert predicted.container_size == written.container_size == from_container.container_size
    w, n = from_container.tensors if from_container.tensors[0].name == "w" else from_container.tensors[::-1]
    assert w.exponent_entropy is not None and 2.0 <= w.exponent_entropy <= 3.5
    assert w.bits_per_weight < 16 and w.ratio > 1.3
    assert w.entropy_bound == pytest.approx(8 + w.exponent_entropy)
    # The bound is the exponent-only one (8 raw bits + H(exp)); folding the top mantissa bits into the coded symbol
    # (format v3) codes below it, by at most the mantissa bits' redundancy, and lane overhead keeps us near it.
    assert w.entropy_bound - 0.1 <= w.bits_per_weight <= w.entropy_bound + 0.05
    assert (n.mode, n.stored_bytes, n.ratio, n.exponent_entropy) == ("raw", 32, 1.0, None)
    assert from_container.float_numel == 65536 and from_container.float_bits_per_weight == pytest.approx(
        w.bits_per_weight
    )
    # the same vocabulary as the weight-size accounting: serialized bits per element of the stored blob
    sizes = float_sizes(from_container)
    assert (sizes.numel, sizes.dense_bytes, sizes.serialized_bytes) == (65536, w.original_bytes, w.stored_bytes)
    assert sizes.bits_per_weight == from_container.float_bits_per_weight and sizes.compression_ratio == w.ratio
    c = compress(load_file(str(src))["w"], backend=BACKEND)
    assert (w.stored_bytes, w.bits_per_weight) == (len(c.to_bytes()), c.bits_per_weight)


def test_exponent_entropy_fields() -> None:
    assert cf.exponent_entropy(torch.ones(10, dtype=torch.float16)) == 0.0
    two = torch.tensor([1.0, 2.0] * 8)  # exponents 127 and 128, equally often
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert cf.exponent_entropy(two.to(dtype)) == pytest.approx(1.0)


def corruptions(good: bytes) -> dict[str, bytes]:
    json_len = struct.unpack("<Q", good[8:16])[0]
    first_record = cf.FILE_HEAD_SIZE + json_len

    def flip(pos: int) -> bytes:
        return good[:pos] + bytes([good[pos] ^ 0x10]) + good[pos + 1 :]

    return {
        "empty": b"",
        "magic only": good[:4],
        "truncated header": good[:20],
        "truncated json": good[: first_record - 3],
        "truncated record": good[: first_record + cf.REC_HEAD_SIZE + 5],
        "truncated end": good[:-1],
        "trailing byte": good + b"\0",
        "bad magic": b"NZSX" + good[4:],
        "file header bit": flip(10),
        "json bit": flip(cf.FILE_HEAD_SIZE + 3),
        "record header bit": flip(first_record + 9),
        "payload bit": flip(first_record + cf.REC_HEAD_SIZE + 40),
        "blob tail bit": flip(len(good) - cf.REC_HEAD_SIZE - 40 - 5),
        "end record bit": flip(len(good) - 20),
    }


def test_corrupt_or_truncated_container_raises(mixed_file: Path, tmp_path: Path) -> None:
    container = tmp_path / "m.nzsf"
    cf.compress_file(mixed_file, container, backend=BACKEND)
    good = container.read_bytes()
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"previous contents")
    for name, bad in corruptions(good).items():
        path = tmp_path / "bad.nzsf"
        path.write_bytes(bad)
        with pytest.raises(ValueError, match="NZSF|truncated|corrupt|blob"):
            cf.decompress_file(path, dst, backend=BACKEND)
        if bad[:4] == b"NZSF":
            with pytest.raises(ValueError):
                cf.inspect_file(path, backend=BACKEND)
        assert dst.read_bytes() == b"previous contents", name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.nzsf", "m.nzsf", "mixed.safetensors", "out.safetensors"]


def test_tampered_payload_with_valid_record_crc_is_caught(mixed_file: Path, tmp_path: Path) -> None:
    """Record CRCs recomputed after tampering: the blob's own CRC, then the end record's sha256 still catch it."""
    container = tmp_path / "m.nzsf"
    cf.compress_file(mixed_file, container, backend=BACKEND)
    good = container.read_bytes()
    pos = cf.FILE_HEAD_SIZE + struct.unpack("<Q", good[8:16])[0]
    records = []  # (offset, kind, payload)
    while pos < len(good):
        kind, _, plen, out_len = struct.unpack("<B3xIQQ", good[pos : pos + 24])
        records.append((pos, kind, good[pos + cf.REC_HEAD_SIZE : pos + cf.REC_HEAD_SIZE + plen], out_len))
        pos += cf.REC_HEAD_SIZE + plen

    def patched(index: int, payload: bytes) -> bytes:
        at, kind, old, out_len = records[index]
        return good[:at] + cf._record(kind, payload, out_len) + good[at + cf.REC_HEAD_SIZE + len(old) :]

    nzct = next(i for i, r in enumerate(records) if r[1] == cf.KIND_NZCT and len(r[2]) > 100)
    raw = next(i for i, r in enumerate(records) if r[1] == cf.KIND_RAW and r[3] > 0)
    blob = bytearray(records[nzct][2])
    blob[60] ^= 1
    data = bytearray(records[raw][2])
    data[0] ^= 1
    for bad, match in ((patched(nzct, bytes(blob)), "corrupt blob"), (patched(raw, bytes(data)), "sha256")):
        (tmp_path / "bad.nzsf").write_bytes(bad)
        with pytest.raises(ValueError, match=match):
            cf.decompress_file(tmp_path / "bad.nzsf", tmp_path / "out.safetensors", backend=BACKEND)
        assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "does not fill"),
        (
            {
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
            },
            b"\0" * 4,
            "overlaps",
        ),
        ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape"),
        ({"a": {"shape": [1], "data_offsets": [0, 1]}}, b"\0", "dtype"),
        ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0]}}, b"\0", "data_offsets"),
        ({"__metadata__": {"x": 1}}, b"", "__metadata__"),
        ([1, 2], b"", "JSON object"),
    ],
)
def test_malformed_safetensors_raises(tmp_path: Path, header: dict[str, object], data: bytes, match: str) -> None:
    src = handmade_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ValueError, match=match):
        cf.compress_file(src, tmp_path / "x.nzsf", backend=BACKEND)
    assert not (tmp_path / "x.nzsf").exists()


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    for name, content in {
        "short": b"\1\2",
        "huge": struct.pack("<Q", 1 << 40) + b"{}",
        "json": b"\4" + b"\0" * 7 + b"{x:]",
    }.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError):
            cf.inspect_file(tmp_path / name, backend=BACKEND)


def test_atomic_write_keeps_destination_on_failure(
    mixed_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = tmp_path / "out.nzsf"
    dst.write_bytes(b"old container")
    calls = []
    real = cf.compress

    def failing_compress(t: torch.Tensor, **kwargs: object) -> object:
        calls.append(t.numel())
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(t, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cf, "compress", failing_compress)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cf.compress_file(mixed_file, dst, backend=BACKEND)
    assert len(calls) == 3
    assert dst.read_bytes() == b"old container"
    assert sorted(os.listdir(tmp_path)) == ["mixed.safetensors", "out.nzsf"]
    monkeypatch.setattr(cf, "compress", real)
    cf.compress_file(mixed_file, dst, backend=BACKEND)
    assert dst.read_bytes()[:4] == b"NZSF"
    assert sorted(os.listdir(tmp_path)) == ["mixed.safetensors", "out.nzsf"]


def test_cli_compress_inspect_decompress(mixed_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    container, restored = str(tmp_path / "m.nzsf"), str(tmp_path / "r.safetensors")
    assert main(["compress", str(mixed_file), container, "--backend", BACKEND]) == 0
    assert "ratio" in capsys.readouterr().out
    assert main(["inspect", container, "--backend", BACKEND]) == 0
    out = capsys.readouterr().out
    assert "w_bf16" in out and "bits/weight" in out and "entropy bound" in out
    assert main(["inspect", str(mixed_file), "--backend", BACKEND]) == 0
    assert "container (predicted)" in capsys.readouterr().out
    assert main(["decompress", container, restored, "--backend", BACKEND]) == 0
    assert "verified" in capsys.readouterr().out
    assert Path(restored).read_bytes() == mixed_file.read_bytes()


def test_cli_errors_exit_2_without_traceback(
    mixed_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.nzsf"
    cf.compress_file(mixed_file, bad, backend=BACKEND)
    bad.write_bytes(bad.read_bytes()[:-10])
    cases = [
        ["inspect", str(tmp_path / "missing.safetensors")],
        ["decompress", str(tmp_path / "missing.nzsf"), str(tmp_path / "o")],
        ["decompress", str(bad), str(tmp_path / "o")],
        ["inspect", str(bad)],
        ["decompress", str(mixed_file), str(tmp_path / "o")],
        ["compress", str(bad), str(tmp_path / "o")],
    ]
    for argv in cases:
        assert main([*argv, "--backend", BACKEND]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("nz-lightning: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main(["frobnicate"]) == 2
    assert main(["compress", "only-one-arg"]) == 2


def test_cli_demo_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--out-dir", str(out), "--hidden", "32", "--layers", "2", "--vocab", "128", "--backend", BACKEND]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "yes (sha256 match)" in text and "model.layers.1.mlp.down_proj.weight" in text
    assert (out / "restored.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    tensors = load_file(str(out / "model.safetensors"))
    assert len(tensors) == 2 + 2 * 9 + 1 and tensors["lm_head.weight"].shape == (128, 32)
    assert torch.equal(tensors["model.norm.weight"], torch.ones(32, dtype=torch.bfloat16))
    assert 0.015 < tensors["model.embed_tokens.weight"].float().std().item() < 0.025


def test_cli_demo_mismatch_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import nz_lightning.cli as cli

    digests = iter(["aa", "bb"])
    monkeypatch.setattr(cli, "sha256_file", lambda path: next(digests))
    argv = [
        "demo",
        "--out-dir",
        str(tmp_path),
        "--hidden",
        "16",
        "--layers",
        "1",
        "--vocab",
        "32",
        "--backend",
        BACKEND,
    ]
    assert main(argv) == 1
    assert "differs" in capsys.readouterr().err


def test_default_backend_round_trip(mixed_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("nz_lightning.kernels.cpu")
    cf.compress_file(mixed_file, tmp_path / "m.nzsf")
    cf.decompress_file(tmp_path / "m.nzsf", tmp_path / "r.safetensors")
    assert (tmp_path / "r.safetensors").read_bytes() == mixed_file.read_bytes()
