"""Crafted inputs for ``benchmarks/reliability.py``: decompression bombs, hostile pickles and bad arguments.

Each case runs in its own process (``python benchmarks/reliability_cases.py CASE WORKDIR``), which prints one JSON
line: the outcome (``error`` with the exception type and message, or ``ok``), the input's size and the peak
resident memory (``VmHWM``) above the baseline measured after the imports and the crafting of the input.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
_FILE_HEAD = struct.Struct("<4sHHQQI")  # NZSF: magic, version, flags, json_len, data_len, json_crc (+ u32 crc)
_REC_HEAD = struct.Struct("<B3xIQQ")  # record: kind, payload_crc, payload_len, out_len (+ u32 crc)
_U32 = struct.Struct("<I")
DTYPE_CODE = {"BF16": 1, "F16": 2, "F32": 3}
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


def vm_hwm() -> int:
    """Peak resident set size of this process so far, in bytes (``VmHWM`` of ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def const_blob(dtype: str, shape: tuple[int, ...], value: bytes | None = None) -> bytes:
    """A well-formed NZCT constant-mode blob (docs/FORMAT.md) declaring ``shape``: a few dozen bytes."""
    body = struct.pack("<4sBBBB", b"NZCT", 1, DTYPE_CODE[dtype], 3, len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
    body += value if value is not None else b"\x00" * ITEMSIZE[dtype]
    return body + _U32.pack(zlib.crc32(body))


def huge_lanes_blob() -> bytes:
    """A rANS blob of a real 4096-element bf16 tensor whose shape is rewritten to 2^36 elements and whose word
    count is rewritten to 2^40 (the CRC recomputed, so only the structural checks stand in the way)."""
    import torch

    from nz_lightning.kernels import compress

    b = bytearray(compress((torch.randn(64, 64) * 0.02).to(torch.bfloat16)).to_bytes())
    struct.pack_into("<QQ", b, 8, 1 << 18, 1 << 18)  # shape (2^18, 2^18)
    struct.pack_into("<Q", b, 8 + 16 + 8, 1 << 40)  # n_words of the coder header (prob_bits, fold, nsym, steps)
    return bytes(b[:-4]) + _U32.pack(zlib.crc32(bytes(b[:-4])))


def _record(kind: int, payload: bytes, out_len: int) -> bytes:
    head = _REC_HEAD.pack(kind, zlib.crc32(payload), len(payload), out_len)
    return head + _U32.pack(zlib.crc32(head)) + payload


def nzsf(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """An NZSF container whose tensors are all constant blobs declaring the given shapes; its END record's
    sha256 is zeros (a bomb is decoded before the END record is read)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    records, pos = [], 0
    for name, dtype, shape in tensors:
        size = ITEMSIZE[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + size]}
        records.append(_record(1, const_blob(dtype, shape), size))
        pos += size
    js = json.dumps(header).encode()
    head = _FILE_HEAD.pack(b"NZSF", 1, 0, len(js), pos, zlib.crc32(js))
    end = _record(255, b"\x00" * 32 + struct.pack("<Q", len(tensors)), 0)
    return head + _U32.pack(zlib.crc32(head)) + js + b"".join(records) + end


class RunsCode:
    """Unpickling this touches a marker file: it stands for any code a hostile checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def hostile_pickle(work: Path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: a torch.save file whose unpickling would create ``marker``."""
    import torch

    marker, path = work / "code-ran", work / "hostile.pt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, path)
    return path, marker


def cli(*args: str) -> None:
    """Run the ``nz-lightning`` CLI in this process; raise ``SystemExit`` with its exit status if not 0."""
    from nz_lightning.cli import main

    rc = main(list(args))
    if rc:
        raise SystemExit(rc)


def _tiny_linear() -> Any:
    import torch

    return torch.nn.Linear(4, 4)


# --- bombs: name -> (crafting function writing the input and returning its path, action on that path) ---------


def _bomb_files(work: Path) -> dict[str, tuple[Callable[[], Path], Callable[[Path], Any]]]:
    def write(name: str, data: bytes) -> Callable[[], Path]:
        def make() -> Path:
            (work / name).write_bytes(data)
            return work / name

        return make

    def blob_decode(p: Path) -> Any:
        from nz_lightning.kernels import CompressedTensor

        return CompressedTensor.from_bytes(p.read_bytes()).decompress(backend="torch")

    def load(p: Path) -> Any:
        from nz_lightning.formats.model_file import load_compressed

        return load_compressed(_tiny_linear(), p)

    two_g, two_t = nzsf([("w", "BF16", (GIB,))]), nzsf([("w", "BF16", (1 << 40,))])
    meta = {"nz_lightning.compressed": "[]"}
    huge_model = nzsf([("bias", "F32", (4,)), ("weight", "F32", (1 << 16, 1 << 16))], meta)
    return {
        "cli inspect: NZSF declaring a 2 GiB constant tensor": (
            write("2g.nzsf", two_g), lambda p: cli("inspect", str(p))),
        "cli decompress: NZSF declaring a 2 GiB constant tensor": (
            write("2g.nzsf", two_g), lambda p: cli("decompress", str(p), str(work / "out.safetensors"))),
        "cli inspect: NZSF declaring a 2 TiB constant tensor": (
            write("2t.nzsf", two_t), lambda p: cli("inspect", str(p))),
        "decompress_file: NZSF declaring 2 TiB": (write("2t.nzsf", two_t), lambda p: __import__(
            "nz_lightning.formats.nzsf", fromlist=["x"]).decompress_file(p, work / "out2.safetensors")),
        "blob: constant-mode blob declaring 4 GiB": (write("4g.nzct", const_blob("F32", (GIB,))), blob_decode),
        "blob: rANS blob declaring 2^36 elements, 2^40 words": (lambda: write("lanes.nzct", huge_lanes_blob())(),
                                                                   blob_decode),
        "load_compressed(nn.Linear(4,4)): file declaring a 16 GiB weight": (write("huge-model.nzsf", huge_model), load),
    }  # fmt: skip


def _pickle_cases(work: Path) -> dict[str, Callable[[Path], Any]]:
    def strategy(p: Path) -> Any:
        from nz_lightning.lightning.strategy import NeuZipStrategy

        return NeuZipStrategy().load_checkpoint(p)

    def weights_file(p: Path) -> Any:
        from nz_lightning.lm.evaluate import load_weights_file

        return dict(load_weights_file(str(p)))

    def load(p: Path) -> Any:
        from nz_lightning.formats.model_file import load_compressed

        return load_compressed(_tiny_linear(), p)

    def convert(p: Path) -> Any:
        from nz_lightning.tensor.convert import compress_model

        return compress_model(_tiny_linear(), weights=p)

    return {
        "cli inspect hostile.pt": lambda p: cli("inspect", str(p)),
        "cli decompress hostile.pt": lambda p: cli("decompress", str(p), str(work / "o.safetensors")),
        "cli compress hostile.pt": lambda p: cli("compress", str(p), str(work / "o.nzsf")),
        "load_compressed(model, hostile.pt)": load,
        "compress_model(model, weights=hostile.pt)": convert,
        "NeuZipStrategy().load_checkpoint(hostile.pt)": strategy,
        "evaluate.load_weights_file(hostile.pt)": weights_file,
    }


def _error(e: BaseException) -> dict[str, Any]:
    if isinstance(e, SystemExit):
        return {"outcome": "error", "type": "SystemExit", "exit_code": e.code, "message": ""}
    return {"outcome": "error", "type": type(e).__name__, "message": str(e)[:400]}


def run_bomb(name: str, work: Path) -> dict[str, Any]:
    """Craft bomb ``name`` in ``work``, run its action and measure the peak memory above the baseline."""
    import torch  # noqa: F401 - imports belong to the baseline

    import nz_lightning.cli  # noqa: F401
    import nz_lightning.formats.model_file  # noqa: F401

    make, action = _bomb_files(work)[name]
    path = make()
    base = vm_hwm()
    try:
        action(path)
        res: dict[str, Any] = {"outcome": "ok", "type": None, "message": "accepted (no error)"}
    except BaseException as e:  # noqa: BLE001 - recorded
        res = _error(e)
    res.update(input_bytes=path.stat().st_size, peak_bytes=max(0, vm_hwm() - base), baseline_bytes=base)
    return res


def run_pickle(name: str, work: Path) -> dict[str, Any]:
    """Feed the hostile pickle to entry point ``name``; report whether the marker appeared and the error."""
    path, marker = hostile_pickle(work)
    try:
        _pickle_cases(work)[name](path)
        res: dict[str, Any] = {"outcome": "ok", "type": None, "message": "loaded without error"}
    except BaseException as e:  # noqa: BLE001 - recorded
        res = _error(e)
    res["code_ran"] = marker.exists()
    return res


def main(argv: list[str]) -> int:
    """``KIND NAME WORKDIR`` (KIND: bomb or pickle): run one case and print its JSON result line."""
    kind, name, work = argv[0], argv[1], Path(argv[2])
    work.mkdir(parents=True, exist_ok=True)
    res = run_bomb(name, work) if kind == "bomb" else run_pickle(name, work)
    sys.stdout.flush()
    print("\nRESULT " + json.dumps(res), flush=True)
    return 0


def names() -> dict[str, list[str]]:
    """The case names of each kind."""
    return {"bomb": list(_bomb_files(Path("/nonexistent"))), "pickle": list(_pickle_cases(Path("/nonexistent")))}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
