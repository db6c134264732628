"""Model conversion: compress a model's weights in place (streaming from meta if needed), and undo it."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from nz_lightning.kernels import DEFAULT_BLOCK_SIZE, CompressedTensor
from nz_lightning.tensor.parameter import NZParameter, make_parameter
from nz_lightning.tensor.workspace import DECODE_POOL

WeightSource = (
    Mapping[str, torch.Tensor]
    | str
    | os.PathLike
    | Iterable[str | os.PathLike]
    | Callable[[str, torch.Size, torch.dtype], torch.Tensor]
)
"""Where meta parameters get their values: a state_dict, safetensors file(s), or ``fn(name, shape, dtype)``."""

_HOOKED = "_nz_state_dict_hooked"


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def default_should_compress(param: torch.Tensor) -> bool:
    """The default policy: every floating-point (bf16/fp16/fp32) parameter with 2 or more dimensions.

    That covers Linear, Embedding, HF Conv1D, lm_head and tied weights. Biases and norm weights (1-D) stay
    dense: together they are ~0.01% of an LLM's parameters, and coding them separately costs more in
    tables and lane headers than it saves (norm vectors initialised to 1.0 would code to the 8 raw
    sign+mantissa bits plus ~0.75 bit/weight of lane overhead at 2048 elements).
    """
    return param.dim() >= 2 and param.dtype in (torch.bfloat16, torch.float16, torch.float32)


class WeightReader:
    """Uniform, lazy access to a :data:`WeightSource`: safetensors files are opened (memory-mapped) here and each
    tensor is read only when :meth:`get` asks for it.

    Args:
        source: A state_dict, safetensors path(s), ``fn(name, shape, dtype)``, or ``None`` (nothing: every
            :meth:`get` returns ``None``).

    Raises:
        FileNotFoundError: A safetensors path does not exist.
        ValueError: A file is not a readable safetensors file.
    """

    def __init__(self, source: WeightSource | None) -> None:
        self.fn: Callable[[str, torch.Size, torch.dtype], torch.Tensor] | None = None
        self.mapping: Mapping[str, torch.Tensor] | None = None
        self.files: dict[str, Any] = {}
        if source is None:
            return
        if callable(source) and not isinstance(source, Mapping):
            self.fn = source
        elif isinstance(source, Mapping):
            self.mapping = source
        else:
            from safetensors import safe_open

            paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
            for path in paths:
                try:
                    handle = safe_open(os.fspath(path), framework="pt")
                except Exception as err:  # safetensors raises its own error types (not OSError / ValueError)
                    if isinstance(err, FileNotFoundError):
                        raise
                    raise ValueError(
                        f"weights file {os.fspath(path)} is not a readable safetensors file ({err}); compress_model "
                        "reads weights from safetensors files only, never from pickles (.pt/.bin): convert it first, "
                        "or pass a state_dict"
                    ) from err
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self.files[key] = handle

    def get(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """The source's tensor for ``name`` (``shape``/``dtype``: what the model expects), or ``None``."""
        if self.fn is not None:
            return self.fn(name, shape, dtype)
        if self.mapping is not None:
            return self.mapping.get(name)
        handle = self.files.get(name)
        return None if handle is None else handle.get_tensor(name)


def check_value(name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` in ``like``'s dtype.

    Raises:
        ValueError: ``value``'s shape is not ``like``'s (the message names ``name``).
    """
    if value.shape != like.shape:
        raise ValueError(f"weight {name!r}: source has shape {tuple(value.shape)}, model expects {tuple(like.shape)}")
    return value.to(like.dtype)


def compress_model(
    model: nn.Module,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    weights: WeightSource | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
    mantissa_bits: int | None = None,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
) -> nn.Module:
    """Replace the model's weights by compressed parameters, in place, one tensor at a time.

    Lossless by default (training and inference). With ``mantissa_bits`` the weights are stored lossily for
    inference: each keeps its exponent (entropy-coded) and its top ``mantissa_bits`` mantissa bits, rounded to
    nearest even after block normalization (see :func:`kernels.compress`); such parameters get
    ``requires_grad=False`` and the fused optimizers refuse them.

    Args:
        model: Any module. Parameters on the ``meta`` device are filled from ``weights`` (so a model built
            on meta is materialized and compressed tensor by tensor and never exists dense as a whole).
        include: fnmatch patterns of parameter names to compress in addition to the default policy
            (:func:`default_should_compress`).
        exclude: fnmatch patterns of parameter names to keep dense.
        weights: Values for meta parameters: a state_dict, safetensors path(s), or ``fn(name, shape, dtype)``.
        device: Where materialized parameters go (default: CPU for meta parameters, else where they are).
        backend: Codec backend to force.
        mantissa_bits: ``None`` (lossless) or the mantissa bits to keep (bf16 0-6, fp16 0-9, fp32 0-22).
        block_size: Lossy mode only: elements per normalization block (a power of two) or ``None`` for none.

    Returns:
        ``model``, converted. Tied parameters stay tied (compressed once). Parameters already compressed with
        other settings are re-encoded from their current values.

    Raises:
        ValueError: A meta parameter has no value in ``weights``, or a value has the wrong shape.
    """
    source = WeightReader(weights)
    done: dict[int, torch.Tensor] = {}
    for module_name, module in list(model.named_modules(remove_duplicate=False)):
        for pname, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{pname}" if module_name else pname
            if id(param) in done:
                setattr(module, pname, done[id(param)])
                continue
            value: torch.Tensor = param.detach()
            if isinstance(param, NZParameter):
                store = param.store
                if store.mantissa_bits == mantissa_bits and (mantissa_bits is None or store.block_size == block_size):
                    done[id(param)] = param
                    continue
                value = param.dense()
            if param.device.type == "meta":
                loaded = source.get(full, param.shape, param.dtype)
                if loaded is None:
                    raise ValueError(f"parameter {full!r} is on the meta device and has no value in `weights`")
                value = check_value(full, loaded, param)
            target = (
                torch.device(device)
                if device is not None
                else (torch.device("cpu") if value.device.type == "meta" else value.device)
            )
            value = value.to(target)
            wanted = (default_should_compress(param) or _matches(full, include)) and not _matches(full, exclude)
            if wanted:
                new = make_parameter(
                    value,
                    requires_grad=param.requires_grad,
                    backend=backend,
                    mantissa_bits=mantissa_bits,
                    block_size=block_size,
                )
            else:
                new = nn.Parameter(value.clone() if value is param else value, requires_grad=param.requires_grad)
            done[id(param)] = new
            setattr(module, pname, new)
        _install_state_dict_hook(module)
    DECODE_POOL.fit(pool_bytes(model))
    return model


def pool_bytes(model: nn.Module) -> int:
    """What :data:`~nz_lightning.tensor.workspace.DECODE_POOL` should keep for ``model``: its largest weight held as
    one block (decoded whole at every use), else its largest row block (0 without compressed parameters).

    Row blocks of larger weights (decoded one at a time by the fused update, the blocked head and embedding, row
    gathers) then get short-lived buffers, so that they are not resident while the rest of the step runs.
    """
    whole, blocks = 0, 0
    for _, p in compressed_parameters(model):
        row = p.store.shape[1:].numel() * p.element_size() if p.store.shape else p.element_size()
        sizes = [(stop - start) * row for start, stop in p.store.bounds]
        if len(sizes) == 1:
            whole = max(whole, sizes[0])
        blocks = max([blocks, *sizes])
    return whole or blocks


def decompress_model(model: nn.Module) -> nn.Module:
    """Turn every compressed parameter back into a plain dense ``nn.Parameter`` (bit-exact; ties kept)."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, NZParameter):
                continue
            if id(param) not in done:
                done[id(param)] = nn.Parameter(param.dense(), requires_grad=param.requires_grad)
            setattr(module, pname, done[id(param)])
    return model


def compressed_parameters(model: nn.Module) -> list[tuple[str, NZParameter]]:
    """The model's compressed parameters (each tied parameter once) with their names."""
    return [(n, p) for n, p in model.named_parameters() if isinstance(p, NZParameter)]


def _dense_state_dict_hook(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    CompressedTensor.check_deferred()  # a save must not write values a deferred decode check rejects
    for key in list(state_dict):
        if key.startswith(prefix) and isinstance(state_dict[key], NZParameter):
            state_dict[key] = state_dict[key].dense()


def install_state_dict_hooks(model: nn.Module) -> None:
    """Make ``model.state_dict()`` yield dense tensors for compressed parameters (idempotent)."""
    for module in model.modules():
        _install_state_dict_hook(module)


def _install_state_dict_hook(module: nn.Module) -> None:
    if not getattr(module, _HOOKED, False):
        module._register_state_dict_hook(_dense_state_dict_hook)
        setattr(module, _HOOKED, True)
