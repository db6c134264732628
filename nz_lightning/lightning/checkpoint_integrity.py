"""Per-tensor checksums of Lightning checkpoints, written on save and verified on load before anything is assigned.

:class:`~nz_lightning.lightning.strategy.NeuZipStrategy` stores, in the checkpoint's ``"nz_lightning"`` entry::

    "checksums": {
        "version": 1,
        "algorithm": "crc32",
        "state_dict": {"fc.weight": 2864434397, ...},                    # by state-dict key
        "other": {"optimizer_states/0/state/0/exp_avg": 1234567, ...},  # every other tensor, by path
    }

Each value is ``zlib.crc32`` of the tensor's bytes in memory order (C-contiguous, native little-endian): for a
dense weight its elements, for a compressed weight the bytes of its ``uint8`` blob tensor. Other tensors (optimizer
moments, RNG states, callback state) are keyed by their path in the checkpoint: dict keys and list indices joined
with ``/``. Sparse, quantized and ``meta`` tensors, and paths that are ambiguous (a dict with both ``1`` and
``"1"``), carry no checksum. The entries are plain ints and strings, so a dense checkpoint stays loadable by plain
``torch.load(weights_only=True)`` and Lightning.

:func:`verify_checkpoint` checks every tensor before any is used, and raises :class:`CheckpointIntegrityError`
(a ``ValueError``) naming the first tensor that fails and the file. Checkpoints written before checksums existed
load unverified.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHECKSUM_ALGORITHM",
    "CHECKSUM_VERSION",
    "CheckpointIntegrityError",
    "checkpoint_checksums",
    "tensor_crc32",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

METADATA_KEY = "nz_lightning"
"""The checkpoint entry holding the strategy's metadata (format, checksums)."""
CHECKSUM_VERSION = 1
CHECKSUM_ALGORITHM = "crc32"


class CheckpointIntegrityError(ValueError):
    """A checkpoint tensor does not match its recorded checksum (or is missing): the file is corrupt."""


def tensor_crc32(t: Tensor) -> int | None:
    """``zlib.crc32`` of a tensor's bytes in C order (copied to the CPU if needed); ``None`` if not checksummable.

    Args:
        t: A strided tensor of any dtype (``bfloat16`` included) on any device.

    Returns:
        The unsigned CRC32, or ``None`` for sparse, quantized or ``meta`` tensors.
    """
    if t.layout != torch.strided or t.is_quantized or t.is_meta:
        return None
    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous().reshape(-1)
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    return zlib.crc32(data.numpy().data) & 0xFFFFFFFF


def _tensors(obj: Any, path: tuple[str, ...]) -> Iterator[tuple[str, Tensor]]:
    """Every tensor in nested dicts / lists / tuples, with its ``/``-joined path (str and int keys only)."""
    if isinstance(obj, Tensor):
        yield "/".join(path), obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if isinstance(key, (str, int)) and not isinstance(key, bool):
                yield from _tensors(value, (*path, str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, (*path, str(i)))


def _sections(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """The checkpoint's tensors: ``state_dict`` by key, every other one (outside our metadata) by path."""
    state = checkpoint.get("state_dict")
    model = {k: v for k, v in state.items() if isinstance(v, Tensor)} if isinstance(state, Mapping) else {}
    other: dict[str, Tensor] = {}
    ambiguous: set[str] = set()
    for key, value in checkpoint.items():
        if key in ("state_dict", METADATA_KEY) or not isinstance(key, str):
            continue
        for path, t in _tensors(value, (key,)):
            if path in other:
                ambiguous.add(path)
            other[path] = t
    for path in ambiguous:
        del other[path]
    return {"state_dict": model, "other": other}


def checkpoint_checksums(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The ``"checksums"`` metadata entry for ``checkpoint`` (see the module doc).

    Args:
        checkpoint: A Lightning checkpoint dict, as about to be saved.

    Returns:
        ``{"version", "algorithm", "state_dict": {key: crc}, "other": {path: crc}}``.
    """
    out: dict[str, Any] = {"version": CHECKSUM_VERSION, "algorithm": CHECKSUM_ALGORITHM}
    for section, tensors in _sections(checkpoint).items():
        done: dict[int, int | None] = {}  # tied tensors are hashed once
        sums: dict[str, int] = {}
        for key, t in tensors.items():
            if id(t) not in done:
                done[id(t)] = tensor_crc32(t)
            crc = done[id(t)]
            if crc is not None:
                sums[key] = crc
        out[section] = sums
    return out


def _where(section: str, key: str) -> str:
    return f"tensor {key!r}" + (" (model state_dict)" if section == "state_dict" else "")


def verify_checkpoint(checkpoint: Mapping[str, Any], path: Any = None, *, sections: tuple[str, ...] = ()) -> bool:
    """Check every tensor of ``checkpoint`` against its recorded checksum, before anything is loaded.

    Args:
        checkpoint: A Lightning checkpoint dict as read from ``path``.
        path: The file, for messages (``None``: "the checkpoint").
        sections: Only these sections (``"state_dict"``, ``"other"``); default all.

    Returns:
        ``True`` if checksums were found and all match, ``False`` for a checkpoint without checksums.

    Raises:
        CheckpointIntegrityError: A tensor's bytes do not match its checksum, a checksummed tensor is missing, or
            the checksum metadata is malformed; the message names the tensor and the file.
    """
    where = f"checkpoint {path}" if path is not None else "the checkpoint"
    meta = checkpoint.get(METADATA_KEY)
    sums = meta.get("checksums") if isinstance(meta, Mapping) else None
    if sums is None:
        log.debug("%s has no per-tensor checksums (written before nz_lightning recorded them): not verified", where)
        return False
    if (
        not isinstance(sums, Mapping)
        or sums.get("algorithm") != CHECKSUM_ALGORITHM
        or sums.get("version") != CHECKSUM_VERSION
    ):
        raise CheckpointIntegrityError(f"{where}: unreadable checksum metadata {METADATA_KEY}['checksums']")
    done: dict[int, int | None] = {}
    for section, tensors in _sections(checkpoint).items():
        if sections and section not in sections:
            continue
        recorded = sums.get(section, {})
        if not isinstance(recorded, Mapping):
            raise CheckpointIntegrityError(f"{where}: unreadable checksum metadata for {section!r}")
        for key, expected in recorded.items():
            t = tensors.get(key)
            if t is None:
                raise CheckpointIntegrityError(
                    f"{where} is corrupt: {_where(section, key)} has a checksum but is missing from the file; "
                    "nothing was loaded"
                )
            if id(t) not in done:
                done[id(t)] = tensor_crc32(t)
            actual = done[id(t)]
            if actual != expected:
                found = "no checksum" if actual is None else f"{actual:#010x}"
                raise CheckpointIntegrityError(
                    f"{where} is corrupt: {_where(section, key)} fails its CRC32 check (recorded "
                    f"{int(expected):#010x}, read {found}); nothing was loaded"
                )
        if section == "state_dict":
            extra = [k for k, t in tensors.items() if k not in recorded and tensor_crc32(t) is not None]
            if extra:
                raise CheckpointIntegrityError(
                    f"{where} is corrupt: {_where(section, extra[0])} has no recorded checksum (a damaged key?); "
                    "nothing was loaded"
                )
    return True
