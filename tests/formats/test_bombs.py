"""Decompression bombs: crafted containers are refused cleanly, without allocating what they declare."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from nz_lightning.cli import main
from nz_lightning.formats.model_file import load_compressed, save_compressed
from nz_lightning.formats.nzsf import _FILE_HEAD, MAGIC, VERSION, decompress_file, inspect_file
from nz_lightning.formats.records import _END, _U32, KIND_END, KIND_NZCT, KIND_RAW, record
from nz_lightning.kernels.spec import spec_for

SLACK = 64 << 20


def _const_blob(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    body = struct.pack("<4sBBBB", b"NZCT", 1, spec_for(dtype).code, 3, len(shape))
    body += struct.pack(f"<{len(shape)}Q", *shape) + b"\x80\x3f\0\0"[: spec_for(dtype).itemsize]
    return body + zlib.crc32(body).to_bytes(4, "little")


def _container(path: Path, name: str, dtype: str, shape: tuple[int, ...], records: list[bytes] | None = None) -> int:
    """A container of one constant tensor (``records``: replaces the data records), with a wrong sha256."""
    tdtype = {"BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    nbytes = tdtype.itemsize
    for d in shape:
        nbytes *= d
    js = json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    head = _FILE_HEAD.pack(MAGIC, VERSION, 0, len(js), nbytes, zlib.crc32(js))
    recs = records if records is not None else [record(KIND_NZCT, _const_blob(tdtype, shape), nbytes)]
    data = head + _U32.pack(zlib.crc32(head)) + js + b"".join(recs) + record(KIND_END, _END.pack(b"\0" * 32, 1), 0)
    path.write_bytes(data)
    return len(data)


def _measure(code: str) -> dict[str, object]:
    """Run ``code`` (which sets ``result``) in a fresh interpreter; its peak RSS above the baseline before it."""
    script = textwrap.dedent(
        """
        import json, sys, io, contextlib, torch
        from torch import nn
        from nz_lightning.lm.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
        from nz_lightning.cli import main
        from nz_lightning.formats.model_file import load_compressed
        from nz_lightning.kernels import CompressedTensor
        with contextlib.suppress(ImportError):  # the CLI's backend probe: code, not data
            import nz_lightning.kernels.cpu
        base = current_rss_bytes()
        reset_peak_rss()
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
        {body}
        except Exception as e:
            result = {{"raised": type(e).__name__, "message": str(e)}}
        result["grew"] = peak_rss_bytes() - base
        result["stderr"] = err.getvalue()
        print(json.dumps(result))
        """
    ).format(body=textwrap.indent(textwrap.dedent(code).strip(), " " * 12))
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from nz_lightning.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)


def test_constant_container_within_the_limit_streams_and_is_rejected(tmp_path: Path) -> None:
    """256 MiB of declared constant (under the expansion limit) streams in chunks and fails the sha256 check."""
    src = tmp_path / "bomb.nzsf"
    size = _container(src, "w", "BF16", (1 << 27,))
    assert size < 260
    r = _measure(f"result = {{'rc': main(['decompress', {str(src)!r}, {str(tmp_path / 'out.safetensors')!r}])}}")
    assert r["rc"] == 2 and str(r["stderr"]).startswith("nz-lightning: error:") and "sha256" in str(r["stderr"])
    assert int(str(r["grew"])) <= 2 * size + SLACK, r
    assert not (tmp_path / "out.safetensors").exists() and os.listdir(tmp_path) == ["bomb.nzsf"]


@pytest.mark.parametrize("numel", [1 << 30, 1 << 39], ids=["2GiB", "2TiB"])
@pytest.mark.parametrize("command", ["inspect", "decompress"])
def test_constant_bombs_are_refused_before_any_work(tmp_path: Path, numel: int, command: str) -> None:
    """A ~240-byte file declaring GiBs or TiBs of constant tensor is refused from its record table: no decoding,
    no hashing, no writing (without the limit, inspect would hash 2 TiB)."""
    src = tmp_path / "bomb.nzsf"
    size = _container(src, "w", "BF16", (numel,))
    args = [str(src)] if command == "inspect" else [str(src), str(tmp_path / "o.safetensors")]
    r = _measure(f"result = {{'rc': main([{command!r}, *{args!r}])}}")
    assert r["rc"] == 2 and "constant-valued tensors declare" in str(r["stderr"]), r
    assert int(str(r["grew"])) <= 2 * size + SLACK, r
    proc = _run_cli(command, *args)
    assert proc.returncode == 2 and proc.stderr.startswith("nz-lightning: error:") and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == ["bomb.nzsf"]


def test_load_compressed_checks_shapes_before_decoding(tmp_path: Path) -> None:
    src = tmp_path / "bomb.nzsf"
    size = _container(src, "weight", "F32", (1 << 30,))
    r = _measure(f"load_compressed(nn.Linear(4, 4), {str(src)!r}); result = {{}}")
    assert r["raised"] == "ValueError" and "does not match the model" in str(r["message"]), r
    assert int(str(r["grew"])) <= 2 * size + SLACK, r
    # keys match but the shape does not: refused before the 4 GiB constant is decoded
    _container(src, "weight", "F32", (1 << 15, 1 << 15))
    r = _measure(f"m = nn.Linear(4, 4, bias=False); load_compressed(m, {str(src)!r}); result = {{}}")
    assert r["raised"] == "ValueError" and "'weight': file has" in str(r["message"]), r
    assert int(str(r["grew"])) <= 2 * size + SLACK, r


def test_40_byte_constant_blob_is_refused_with_little_memory() -> None:
    blob = _const_blob(torch.float32, (1 << 30,))
    assert len(blob) <= 40
    r = _measure(f"CompressedTensor.from_bytes({blob!r}).decompress(); result = {{}}")
    assert r["raised"] == "ValueError" and "cap" in str(r["message"]), r
    assert int(str(r["grew"])) <= 2 * len(blob) + SLACK, r


def test_structure_is_checked_before_any_record_is_decoded(tmp_path: Path) -> None:
    src = tmp_path / "bad.nzsf"
    _container(src, "w", "BF16", (1 << 20,))
    data = src.read_bytes()
    src.write_bytes(data + b"x")  # trailing bytes
    with pytest.raises(ValueError, match="bad end record"):
        inspect_file(src)
    src.write_bytes(data[:-1])  # truncated end record
    with pytest.raises(ValueError, match="truncated"):
        decompress_file(src, tmp_path / "o")
    big = record(KIND_RAW, b"", 1 << 40)  # a raw record claiming more bytes than the file holds
    _container(src, "w", "BF16", (1 << 39,), [big])
    with pytest.raises(ValueError, match="not the kind|truncated"):
        decompress_file(src, tmp_path / "o")
    assert sorted(os.listdir(tmp_path)) == ["bad.nzsf"]


def test_constant_tensors_over_the_cap_still_round_trip(tmp_path: Path) -> None:
    model = nn.Linear(4200, 4096, bias=False)  # 68.8 MB of zeros: one constant blob over the 64 MiB default cap
    nn.init.zeros_(model.weight)
    save_compressed(model, tmp_path / "m.nzsf")
    assert (tmp_path / "m.nzsf").stat().st_size < 4096
    back = load_compressed(nn.Linear(4200, 4096, bias=False, device="meta"), tmp_path / "m.nzsf")
    assert torch.equal(back.weight, model.weight)
    digest = decompress_file(tmp_path / "m.nzsf", tmp_path / "m.safetensors")
    assert digest == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    report = inspect_file(tmp_path / "m.nzsf")
    assert report.tensors[0].mode == "const" and report.tensors[0].exponent_entropy == 0.0


def test_compress_refuses_to_replace_its_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "x.safetensors"
    src.write_bytes(b"unchanged")
    (tmp_path / "link").symlink_to(src)
    for out in (src, tmp_path / "link", tmp_path / "." / "x.safetensors"):
        for cmd in ("compress", "decompress"):
            assert main([cmd, str(src), str(out)]) == 2
            assert capsys.readouterr().err.startswith("nz-lightning: error: output")
    assert src.read_bytes() == b"unchanged"


def test_demo_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert main(["demo", "--out-dir", str(tmp_path), "--hidden", "32", "--layers", "1", "--vocab", "64"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "model.nzsf", "restored.safetensors"], 0o644)
