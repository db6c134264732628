"""Checkpoint files for :class:`~nz_lightning.lightning.strategy.NeuZipStrategy`: atomic writes, compressed state.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the target directory and renames it
  over the target (``os.replace``), so a failed or interrupted write leaves the previous checkpoint intact.
* :func:`compressed_state_dict` stores each compressed weight as bytes in a 1-D ``uint8`` tensor: the portable
  bytes of its :class:`~kernels.CompressedTensor` (docs/FORMAT.md) when the weight is one block, else a row-block
  container (:func:`pack_blobs`: magic ``NZRB``, version, block count, block lengths, then the blocks' bytes). The
  file then holds only tensors and plain containers, so ``torch.load(weights_only=True)`` reads it and no object of
  ours is pickled. :func:`load_state_dict` restores such a state dict (old single-blob ones and dense ones too).
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn
from typing_extensions import override

from nz_lightning.formats.atomic import atomic_write
from nz_lightning.formats.safe_load import refuse_pickled_objects
from nz_lightning.lightning.compat import _PATH
from nz_lightning.tensor.parameter import NZParameter, WeightStore

__all__ = [
    "AtomicCheckpointIO",
    "atomic_save",
    "compressed_state_dict",
    "is_compressed_blob",
    "load_state_dict",
    "pack_blobs",
    "unpack_blobs",
]

_ROWS_MAGIC = b"NZRB"
_ROWS_HEAD = struct.Struct("<4sII")  # magic, version, number of blocks (then one uint64 length per block)


def pack_blobs(blobs: list[bytes]) -> bytes:
    """One byte string for the row blocks of a weight: the blob itself for one block, else an ``NZRB`` container."""
    if len(blobs) == 1:
        return blobs[0]
    lengths = struct.pack(f"<{len(blobs)}Q", *map(len, blobs))
    return b"".join([_ROWS_HEAD.pack(_ROWS_MAGIC, 1, len(blobs)), lengths, *blobs])


def unpack_blobs(data: bytes | memoryview) -> list[memoryview]:
    """The block blobs in bytes written by :func:`pack_blobs` (a plain blob is one block).

    Raises:
        ValueError: A truncated or inconsistent ``NZRB`` container, or an unknown version.
    """
    view = memoryview(data)
    if bytes(view[:4]) != _ROWS_MAGIC:
        return [view]
    if len(view) < _ROWS_HEAD.size:
        raise ValueError("truncated row-block container")
    _, version, count = _ROWS_HEAD.unpack_from(view)
    if version != 1 or count < 1:
        raise ValueError(f"unsupported row-block container (version {version}, {count} blocks)")
    offset = _ROWS_HEAD.size + 8 * count
    if len(view) < offset:
        raise ValueError("truncated row-block container")
    lengths = struct.unpack_from(f"<{count}Q", view, _ROWS_HEAD.size)
    if offset + sum(lengths) != len(view):
        raise ValueError("row-block container: block lengths do not add up to its size")
    blobs = []
    for n in lengths:
        blobs.append(view[offset : offset + n])
        offset += n
    return blobs


def atomic_save(obj: Any, path: _PATH) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    The temporary file (``.<name>.<random>.tmp``) is flushed and fsynced before the rename; on any error it is
    removed and the exception re-raised, leaving an existing ``path`` untouched.

    Args:
        obj: What to save.
        path: Local destination file (its directory is created if needed).
    """
    with atomic_write(path) as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local writes are atomic (temporary file + ``os.replace``).

    Lightning's default already serializes into memory before writing, but then writes the destination in place
    and holds a second copy of the checkpoint in RAM; this writes straight to a temporary file instead. Remote
    (``scheme://``) paths go through :class:`TorchCheckpointIO` unchanged.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: The checkpoint dict.
            path: Destination file.
            storage_options: Not supported (must be ``None``).

        Raises:
            TypeError: ``storage_options`` was given.
        """
        target = os.fspath(path)
        if "://" in str(target) and not str(target).startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not support `storage_options`")
        atomic_save(checkpoint, str(target).removeprefix("file://"))

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a checkpoint with ``torch.load(weights_only=True)``: tensors and plain containers, never code.

        Raises:
            ValueError: ``weights_only=False`` was asked for, the file holds other objects (unpickling them could
                run code), or it is not a checkpoint; the message names the file.
        """
        if weights_only is False:
            raise ValueError(
                f"{type(self).__name__} loads checkpoints with weights_only=True only (unpickling arbitrary objects "
                f"could run code); {path} was asked for with weights_only=False"
            )
        with refuse_pickled_objects(os.fspath(path)):
            checkpoint: dict[str, Any] = super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not isinstance(checkpoint, dict):
            raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
        return checkpoint


class _BlobDestination(OrderedDict):
    """A ``state_dict`` destination that stores full compressed parameters as their encoded bytes.

    ``Module.state_dict`` writes ``param.detach()`` (still compressed) into the destination; intercepting the write
    means no weight is ever decoded, and the dense-on-save hook of :func:`~nz_lightning.compress_model` then sees a
    ``uint8`` tensor and leaves it alone. Tied weights share one blob tensor (``torch.save`` stores it once).
    """

    def __init__(self) -> None:
        super().__init__()
        self._metadata: OrderedDict[str, Any] = OrderedDict()
        self._blobs: dict[int, Tensor] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, NZParameter) and value.is_whole_store():
            blob = self._blobs.get(id(value.store))
            if blob is None:
                data = bytearray(pack_blobs(value.store.to_blobs()))
                blob = self._blobs[id(value.store)] = torch.frombuffer(data, dtype=torch.uint8)
            value = blob
        super().__setitem__(key, value)


def compressed_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with every compressed weight as a ``uint8`` tensor of its portable bytes.

    Dense parameters and buffers are stored as usual. Nothing is decoded.

    Args:
        module: A (partly) compressed module.

    Returns:
        A plain ``OrderedDict`` (with torch's ``_metadata``), safe for ``torch.load(weights_only=True)``.
    """
    destination = _BlobDestination()
    module.state_dict(destination=destination)
    out: OrderedDict[str, Any] = OrderedDict(destination.items())
    setattr(out, "_metadata", destination._metadata)  # noqa: B010 - OrderedDict has no declared _metadata
    return out


def is_compressed_blob(value: Any, target: Tensor | None) -> bool:
    """Whether a state-dict value is an encoded weight for ``target`` (a 1-D uint8 tensor for a float parameter)."""
    return (
        isinstance(value, Tensor)
        and value.dtype == torch.uint8
        and value.dim() == 1
        and target is not None
        and target.dtype.is_floating_point
    )


def _decode_blob(key: str, blob: Tensor, target: Tensor, where: str) -> WeightStore:
    like = target.store if isinstance(target, NZParameter) else None
    try:
        store = WeightStore.from_blobs(
            unpack_blobs(blob.detach().cpu().contiguous().numpy().tobytes()),
            backend=None if like is None else like.backend,
            device=target.device,
            **({} if like is None else {"mantissa_bits": like.mantissa_bits, "block_size": like.block_size}),
        )
    except ValueError as err:
        raise ValueError(f"{where}: compressed weight {key!r} is unreadable ({err}); nothing was loaded") from err
    if store.shape != target.shape or store.dtype != target.dtype:
        raise ValueError(
            f"{where}: compressed weight {key!r} holds a {tuple(store.shape)} {store.dtype} tensor, the model "
            f"expects {tuple(target.shape)} {target.dtype}; nothing was loaded"
        )
    return store


def _expected_keys(module: nn.Module) -> set[str] | None:
    """The keys ``module.load_state_dict`` expects, or ``None`` where load hooks could remap them."""
    keys: set[str] = set()
    for prefix, m in module.named_modules(remove_duplicate=False):
        if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
            return None
        p = f"{prefix}." if prefix else ""
        keys.update(p + n for n, t in m._parameters.items() if t is not None)
        keys.update(p + n for n, t in m._buffers.items() if t is not None and n not in m._non_persistent_buffers_set)
        if type(m).get_extra_state is not nn.Module.get_extra_state:
            keys.add(f"{p}_extra_state")
    return keys


def _check_dense(module: nn.Module, dense: dict[str, Any], installed: set[str], strict: bool, where: str) -> None:
    """Raise before any assignment for what ``module.load_state_dict`` would reject (shapes, strict keys)."""
    tensors: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    for key, value in dense.items():
        target = tensors.get(key)
        if isinstance(value, Tensor) and target is not None and value.shape != target.shape:
            raise RuntimeError(
                f"{where}: size mismatch for {key!r}: the checkpoint holds {tuple(value.shape)}, the model "
                f"expects {tuple(target.shape)}; nothing was loaded"
            )
    expected = _expected_keys(module) if strict else None
    if expected is not None:
        missing = sorted(expected - dense.keys() - installed)
        unexpected = sorted(dense.keys() - expected)
        if missing or unexpected:
            raise RuntimeError(
                f"{where}: error(s) in loading state_dict for {type(module).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}; nothing was loaded"
            )


def load_state_dict(module: nn.Module, state_dict: dict[str, Any], strict: bool = True, source: Any = None) -> None:
    """Load a dense or :func:`compressed_state_dict` state dict into ``module``, all or nothing.

    Every encoded weight is decoded and validated (its blob CRC, shape, dtype) and the dense values' shapes and
    (``strict``) the keys are checked before anything is assigned, so a failure leaves the module as it was.
    Encoded weights then go straight into compressed parameters (no decode, no re-encode); for dense targets
    they are decoded. Dense values go through ``module.load_state_dict`` (compressed parameters re-compress them
    on copy).

    Args:
        module: The module (compressed or not).
        state_dict: The state dict.
        strict: Whether missing or unexpected keys raise.
        source: The checkpoint file, named in error messages (``None``: "the state dict").

    Raises:
        RuntimeError: ``strict`` and keys are missing or unexpected, or a dense value has the wrong shape.
        ValueError: An encoded weight is corrupt or has the wrong shape or dtype; the message names it.
    """
    where = f"checkpoint {source}" if source is not None else "the state dict"
    targets = dict(module.named_parameters(remove_duplicate=False))
    dense: OrderedDict[str, Any] = OrderedDict()
    stores: dict[str, WeightStore] = {}
    decoded: dict[tuple[int, int], WeightStore] = {}  # tied weights share one blob: decode it once
    for key, value in state_dict.items():  # 1. decode and validate everything
        target = targets.get(key)
        if target is None or not is_compressed_blob(value, target):
            dense[key] = value
            continue
        store = decoded.get((id(value), id(target)))
        if store is None:
            store = decoded[id(value), id(target)] = _decode_blob(key, value, target, where)
        if isinstance(target, NZParameter) and target.is_whole_store():
            stores[key] = store
        else:
            dense[key] = store.read()
    _check_dense(module, dense, set(stores), strict, where)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        setattr(dense, "_metadata", metadata)  # noqa: B010
    result = module.load_state_dict(dense, strict=False)  # 2. assign
    for key, store in stores.items():
        target = targets[key]
        assert isinstance(target, NZParameter)
        target.store.set_blocks(store.blocks)  # the saved row split is kept
    missing = [k for k in result.missing_keys if k not in stores]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__} from {where}: missing keys {missing}, "
            f"unexpected keys {list(result.unexpected_keys)}"
        )
