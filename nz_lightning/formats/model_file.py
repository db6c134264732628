"""Whole models in one file without pickle: :func:`save_compressed` / :func:`load_compressed`.

The file is an NZSF container (docs/FORMAT.md §2): it restores, byte for byte, a safetensors file of the model's
state dict (``nz-lightning decompress`` turns it into one, loadable without nz_lightning). Compressed parameters are
written as their own blobs, lossless or lossy, without re-encoding; other floating-point tensors are coded
losslessly and everything else is stored raw. ``__metadata__`` records which tensors were compressed parameters
and which keys are tied to another, so :func:`load_compressed` rebuilds the same model: compressed parameters
straight from their blobs (the dense model never exists whole) and ties kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from nz_lightning.formats.atomic import atomic_write
from nz_lightning.formats.nzsf import _FILE_HEAD, MAGIC, VERSION, Layout, parse_header, read_container_layout
from nz_lightning.formats.records import _END, _U32, KIND_END, KIND_NZCT, decode_records, record
from nz_lightning.kernels import CompressedTensor, compress
from nz_lightning.tensor.convert import install_state_dict_hooks
from nz_lightning.tensor.parameter import NZParameter, WeightStore

PathLike = str | os.PathLike[str]
META_COMPRESSED = "nz_lightning.compressed"
META_TIED = "nz_lightning.tied"
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODED = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class ModelFileReport:
    """What :func:`save_compressed` wrote.

    Attributes:
        path: The file.
        file_bytes: Its size.
        bf16_safetensors_bytes: Size of a safetensors file of the same tensors with floats in bf16 (ties once).
        tensors: Tensors stored (each tied tensor once).
        compressed: Of those, compressed parameters (their blobs written as they are).
        lossy: Of those, lossily compressed ones.
    """

    path: str
    file_bytes: int
    bf16_safetensors_bytes: int
    tensors: int
    compressed: int
    lossy: int

    @property
    def ratio_vs_bf16(self) -> float:
        """``file_bytes / bf16_safetensors_bytes``."""
        return self.file_bytes / max(1, self.bf16_safetensors_bytes)


def _state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Distinct state-dict tensors by first name (no dense copies of compressed ones) and ``alias -> name`` ties."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        items = list(module._parameters.items()) + [
            (n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set
        ]
        for name, t in items:
            if t is None:
                continue
            key = prefix + name
            if key in tensors or key in tied:
                continue
            if id(t) in first:
                tied[key] = first[id(t)]
                continue
            first[id(t)] = key
            tensors[key] = t
    return tensors, tied


def _dtype_name(key: str, t: torch.Tensor) -> str:
    name = SAFETENSORS_DTYPES.get(t.dtype)
    if name is None:
        raise TypeError(f"tensor {key!r} has dtype {t.dtype}, which save_compressed cannot store")
    return name


def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, int]:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        entries[key] = {"dtype": _dtype_name(key, t), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    js = json.dumps(entries, separators=(",", ":")).encode()
    return js + b" " * (-len(js) % 8), offset


def save_compressed(model: nn.Module, path: PathLike, *, backend: str | None = None) -> ModelFileReport:
    """Write a model's state (weights, compressed or not, and persistent buffers) to one file, atomically.

    Args:
        model: Any module; compressed parameters (lossless or lossy) are stored as they are held.
        path: Destination (replaced atomically; a failed write leaves an existing file untouched).
        backend: Codec backend for coding the dense floating-point tensors (``None``: by device).

    Returns:
        The file size and the size of the same weights as a bf16 safetensors file.

    Raises:
        TypeError: A tensor has a dtype safetensors cannot hold. OSError: Writing failed.
    """
    tensors, tied = _state_tensors(model)
    compressed = [k for k, t in tensors.items() if isinstance(t, NZParameter)]
    meta = {META_COMPRESSED: json.dumps(compressed), META_TIED: json.dumps(tied)}
    js, data_len = _header(tensors, meta)
    lossy = 0
    with atomic_write(path) as out:
        head = _FILE_HEAD.pack(MAGIC, VERSION, 0, len(js), data_len, zlib.crc32(js))
        out.write(head + _U32.pack(zlib.crc32(head)) + js)
        sha = hashlib.sha256(len(js).to_bytes(8, "little") + js)
        for seg in parse_header(js, data_len).segments:  # the order a reader expects (by offset, then name)
            assert seg.name is not None
            t = tensors[seg.name]
            ct: CompressedTensor | None
            if isinstance(t, NZParameter):
                blocks = t.store.blocks
                ct = blocks[0] if len(blocks) == 1 else compress(t.dense(), backend=backend)
                lossy += int(ct.lossy)
                dense = ct.decompress()
            else:
                dense = t.detach().contiguous()
                ct = compress(dense, backend=backend) if dense.dtype in _CODED else None
            raw = dense.reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if dense.numel() else b""
            del dense
            sha.update(raw)
            if ct is None:
                out.write(record(0, raw, len(raw)))
            else:
                out.write(record(KIND_NZCT, ct.to_bytes(), len(raw)))
        out.write(record(KIND_END, _END.pack(sha.digest(), len(tensors)), 0))
        written = out.tell()
    bf16 = 8 + len(js) + sum(t.numel() * (2 if t.dtype in _CODED else t.element_size()) for t in tensors.values())
    return ModelFileReport(os.fspath(path), written, bf16, len(tensors), len(compressed), lossy)


def _compressed_parameter(
    ct: CompressedTensor, dense: torch.Tensor, device: torch.device, backend: str | None
) -> nn.Parameter:
    store = WeightStore(None, backend, mantissa_bits=ct.mantissa_bits, block_size=ct.block_size)
    if ct.lossy:
        store.set_blocks([ct.to(device)])
    else:
        store.write(dense.to(device))  # lossless: re-split into the store's row blocks
    base = torch.empty(store.shape, device="meta")
    return nn.Parameter(NZParameter(store, base.shape, base.stride(), 0), requires_grad=not store.lossy)


def load_compressed(
    model: nn.Module, path: PathLike, *, device: torch.device | str | None = None, backend: str | None = None
) -> nn.Module:
    """Load a file written by :func:`save_compressed` into ``model`` (which may be built on ``meta``), in place.

    Parameters that were compressed when saved come back compressed with the same settings (lossy ones from
    their blobs as they are); the others come back dense. Every tensor must match the model's key, shape and
    dtype; ties in the model are kept.

    Args:
        model: A module with the same architecture.
        path: The file.
        device: Where the weights go (default: CPU).
        backend: Codec backend for decoding.

    Returns:
        ``model``.

    Raises:
        ValueError: Not an NZSF model file, corrupt or truncated (checked before anything is assigned), or a
            key, shape or dtype mismatch with the model.
    """
    target = torch.device(device) if device is not None else torch.device("cpu")
    loaded: dict[str, tuple[torch.Tensor, CompressedTensor | None]] = {}
    with open(path, "rb") as f:
        layout = read_container_layout(f)
        compressed, tied = _metadata(layout)
        _check_layout(model, layout, tied)  # keys, dtypes and shapes, before any record is decoded
        names = [s for s in layout.segments if s.name is not None]
        records = decode_records(f, layout, backend, expand_const=True)  # sizes vouched for by the model
        for seg, (data, _, t, ct) in zip(layout.segments, records, strict=False):
            if seg.name is None:
                continue
            if t is None:
                dtype = next((d for d, n in SAFETENSORS_DTYPES.items() if n == seg.dtype), None)
                if dtype is None:
                    raise ValueError(f"model file: tensor {seg.name!r} has unsupported dtype {seg.dtype}")
                t = torch.frombuffer(bytearray(data or b""), dtype=dtype) if data else torch.empty(0, dtype=dtype)
            loaded[seg.name] = (t.reshape(seg.shape), ct if seg.name in compressed else None)
        for _ in records:  # the end record: count, trailing bytes and the sha256 of everything
            pass
    if len(loaded) != len(names):
        raise ValueError(f"corrupt model file: {len(names)} tensors declared, {len(loaded)} read")
    _assign(model, loaded, tied, target, backend)
    install_state_dict_hooks(model)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(
            f"still on the meta device after loading: {', '.join(on_meta[:5])} (non-persistent buffers are not "
            "stored in the file; create them on a real device)"
        )
    return model


def _metadata(layout: Layout) -> tuple[set[str], dict[str, str]]:
    """The compressed keys and ``alias -> name`` ties recorded in a model file's ``__metadata__``."""
    meta = json.loads(layout.json_bytes).get("__metadata__") or {}
    try:
        compressed = json.loads(meta.get(META_COMPRESSED, "[]"))
        tied = json.loads(meta.get(META_TIED, "{}"))
    except ValueError as e:
        raise ValueError(f"corrupt model file: bad __metadata__ ({e})") from None
    if not isinstance(compressed, list) or not all(isinstance(k, str) for k in compressed):
        raise ValueError(f"corrupt model file: {META_COMPRESSED} is not a list of names")
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise ValueError(f"corrupt model file: {META_TIED} does not map names to names")
    return set(compressed), tied


def _check_layout(model: nn.Module, layout: Layout, tied: dict[str, str]) -> None:
    """Check the declared tensors against the model (keys, dtypes, shapes) before anything is decoded.

    Raises:
        ValueError: A key missing or unexpected, or a dtype or shape that is not the model's.
    """
    state, _ = _state_tensors(model)
    declared = {s.name: s for s in layout.segments if s.name is not None}
    missing = sorted(k for k in state if tied.get(k, k) not in declared)
    unexpected = sorted(k for k in declared if k not in state and k not in tied.values())
    if missing or unexpected:
        raise ValueError(f"model file does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, old in state.items():
        seg = declared[tied.get(key, key)]
        if seg.shape != tuple(old.shape) or seg.dtype != SAFETENSORS_DTYPES.get(old.dtype):
            raise ValueError(f"{key!r}: file has {seg.shape} {seg.dtype}, model {tuple(old.shape)} {old.dtype}")


def _assign(
    model: nn.Module,
    loaded: dict[str, tuple[torch.Tensor, CompressedTensor | None]],
    tied: dict[str, str],
    device: torch.device,
    backend: str | None,
) -> None:
    state, _ = _state_tensors(model)
    wanted = set(state) | {k for k in tied if k in state}
    missing = sorted(k for k in wanted if tied.get(k, k) not in loaded)
    unexpected = sorted(k for k in loaded if k not in state and k not in tied.values())
    if missing or unexpected:
        raise ValueError(f"model file does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, old in state.items():  # check everything before assigning anything
        value = loaded[tied.get(key, key)][0]
        if value.shape != old.shape or value.dtype != old.dtype:
            raise ValueError(
                f"{key!r}: file has {tuple(value.shape)} {value.dtype}, model {tuple(old.shape)} {old.dtype}"
            )
    done: dict[int, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for name, old in list(module._parameters.items()) + list(module._buffers.items()):
            key = prefix + name
            if old is None or (name in module._buffers and name in module._non_persistent_buffers_set):
                continue
            if id(old) not in done:
                value, ct = loaded[tied.get(key, key)]
                if name in module._buffers:
                    done[id(old)] = value.to(device)
                elif ct is not None:
                    done[id(old)] = _compressed_parameter(ct, value, device, backend)
                else:
                    done[id(old)] = nn.Parameter(value.to(device).clone(), requires_grad=old.requires_grad)
            new = done[id(old)]
            if name in module._buffers:
                module._buffers[name] = new
            else:
                setattr(module, name, new)
