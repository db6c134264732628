"""Models built on ``meta`` and given values one FSDP unit at a time, so that no rank ever holds them dense whole.

* :func:`parameters_on_meta`: a context in which modules create their parameters on ``meta`` (no memory) while
  buffers are built for real where the ambient device says (e.g. Llama's rotary ``inv_freq``, computed at
  construction and absent from checkpoints).
* Materializers for :func:`~nz_lightning.distributed.fsdp.shard_model`'s ``materialize=`` hook, called for each
  FSDP unit just before it is sharded: :func:`from_weights` reads the unit's tensors from a
  :data:`~nz_lightning.tensor.convert.WeightSource` (a state dict, safetensors files read lazily, or a function);
  :func:`seeded_init` initializes them at random, identically on every rank and whatever the world size.
* :func:`hf_weight_files`: the safetensors file(s) of a Hugging Face model directory.

A LightningModule that builds a pretrained model on ``meta`` names the sources of its children's weights with a
``meta_weight_sources()`` method (see :data:`META_WEIGHT_SOURCES`); :class:`~nz_lightning.NeuZipFSDPStrategy` uses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from nz_lightning.tensor.convert import WeightReader, WeightSource, check_value

__all__ = [
    "META_WEIGHT_SOURCES",
    "building_on_meta",
    "from_weights",
    "hf_weight_files",
    "parameters_on_meta",
    "seeded_init",
    "unit_seed",
]

META_WEIGHT_SOURCES = "meta_weight_sources"
"""Name of the optional LightningModule method ``meta_weight_sources() -> Mapping[str, WeightSource]``: for a child
module's name, the source of that child's ``meta`` parameters, keyed by names relative to the child (e.g. ``{"model":
[".../model.safetensors"]}`` for a Hugging Face model held as ``self.model``)."""

Materializer = Callable[[str, nn.Module], None]  # the same as nz_lightning.distributed.fsdp.Materializer

_depth = 0  # how many parameters_on_meta contexts are active


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every parameter registered while active on ``meta``; buffers are left where they were built.

    ``nn.Module.register_parameter`` (which ``module.weight = nn.Parameter(...)`` calls) is patched while the context
    is active: a parameter is replaced by a ``meta`` parameter of the same shape, dtype and ``requires_grad``. A
    weight is still allocated (``torch.empty``: untouched memory) and initialized on ``meta`` (no work) one module at
    a time. Tied parameters stay tied (the same ``meta`` object). Nested contexts are fine; not thread-safe.

    Raises:
        TypeError: A parameter of a subclass of ``nn.Parameter`` (e.g. a quantized one) is registered: it cannot be
            rebuilt on ``meta``.
    """
    global _depth
    original = nn.Module.register_parameter
    outermost = _depth == 0

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            if type(param) is not nn.Parameter:
                raise TypeError(
                    f"parameters_on_meta: cannot rebuild a {type(param).__name__} parameter {name!r} on meta "
                    "(only plain nn.Parameter): build this model without meta_init"
                )
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    if outermost:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if outermost:
            nn.Module.register_parameter = original  # type: ignore[method-assign]


def building_on_meta() -> bool:
    """Whether new parameters land on ``meta`` now (:func:`parameters_on_meta` active, or ``meta`` the default)."""
    return _depth > 0 or torch.empty(0).device.type == "meta"


def hf_weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors file(s) of a Hugging Face model directory: ``model.safetensors``, or the shards listed in
    ``model.safetensors.index.json``. Their keys are names relative to the model (``model.layers.0...``).

    Raises:
        FileNotFoundError: ``directory`` is not a directory, or holds neither file (pickled ``.bin`` weights are not
            read: convert them to safetensors), or the index lists a missing shard.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{os.fspath(directory)!r} is not a local directory: building a pretrained model on meta reads its "
            "safetensors files from a local directory (download the model first, e.g. `hf download <name> "
            "--local-dir <dir>`)"
        )
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    index = root / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{root} has neither model.safetensors nor model.safetensors.index.json (weights are read from "
            "safetensors files only, never from pickles: convert .bin weights first)"
        )
    files = [root / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shard(s) that do not exist: {', '.join(missing[:3])}")
    return files


@dataclass
class _MetaTensor:
    """One ``meta`` tensor of a unit and every ``(module, attribute, name)`` that holds it (ties)."""

    tensor: Tensor
    parameter: bool
    holders: list[tuple[nn.Module, str, str]] = field(default_factory=list)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _meta_tensors(name: str, unit: nn.Module) -> list[_MetaTensor]:
    """The unit's ``meta`` parameters and buffers (units sharded before hold DTensors: never ``meta``), in order."""
    found: dict[int, _MetaTensor] = {}
    for module_name, module in unit.named_modules(remove_duplicate=False):
        for table, parameter in ((module._parameters, True), (module._buffers, False)):
            for attr, tensor in table.items():
                if tensor is not None and tensor.is_meta:
                    entry = found.setdefault(id(tensor), _MetaTensor(tensor, parameter))
                    entry.holders.append((module, attr, _join(name, module_name, attr)))
    return list(found.values())


def _replace(entry: _MetaTensor, value: Tensor) -> Tensor:
    """Give ``entry``'s tensor ``value`` in place (:func:`torch.utils.swap_tensors`: the same Python object, so ties
    and references stay valid, and no new object can take the ``id`` of one freed earlier); the tensor.

    Its attributes are kept, except Hugging Face's ``_is_hf_initialized`` (its initializers skip tensors marked so).
    """
    old = entry.tensor
    new: Tensor = nn.Parameter(value, requires_grad=old.requires_grad) if entry.parameter else value
    attributes = {k: v for k, v in vars(old).items() if k != "_is_hf_initialized"}
    try:
        torch.utils.swap_tensors(old, new)
    except RuntimeError:  # e.g. a weak reference to it exists: put the new tensor wherever the old one was held
        for module, attr, _ in entry.holders:
            table = module._parameters if entry.parameter else module._buffers
            table[attr] = new  # type: ignore[assignment]
        old = new
    vars(old).clear()
    vars(old).update(attributes)
    return old


def from_weights(source: WeightSource | WeightReader, prefix: str = "") -> Materializer:
    """A materializer that reads each ``meta`` tensor of a unit from ``source`` when that unit is sharded.

    A tensor named ``n`` relative to the model given to ``shard_model`` is looked up as ``prefix + n``; a tied
    tensor under any of its names (a tied ``lm_head.weight`` is usually absent from a Hugging Face file). Values are
    cast to the model's dtype and land on the CPU (``shard_model`` then moves the unit to its device).

    Args:
        source: A :data:`~nz_lightning.tensor.convert.WeightSource` (safetensors files are opened once, here, and
            each tensor is read when its unit is materialized) or an open :class:`WeightReader`.
        prefix: Prepended to unit-relative names to form the source's keys (e.g. ``"model."`` when the source is
            keyed by the LightningModule's names and ``shard_model`` gets its child ``model``).

    Returns:
        ``fn(name, unit)`` for ``shard_model(materialize=...)``. It raises ``ValueError`` naming the key for a
        tensor the source lacks (non-persistent buffers are never in files: build them for real, see
        :func:`parameters_on_meta`) or a shape that does not match.
    """
    reader = source if isinstance(source, WeightReader) else WeightReader(source)

    def materialize(name: str, unit: nn.Module) -> None:
        with torch.no_grad():
            for entry in _meta_tensors(name, unit):
                keys = [prefix + full for _, _, full in entry.holders]
                value = None
                for key in keys:
                    value = reader.get(key, entry.tensor.shape, entry.tensor.dtype)
                    if value is not None:
                        break
                if value is None:
                    kind = "parameter" if entry.parameter else "buffer"
                    also = f" (nor under {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
                    raise ValueError(
                        f"meta {kind} {keys[0]!r} (FSDP unit {name or '<root>'!r}) has no value in the weight "
                        f"source{also}"
                    )
                _replace(entry, check_value(key, value, entry.tensor).to("cpu"))

    return materialize


def unit_seed(seed: int, name: str) -> int:
    """The RNG seed of the module called ``name``: a hash of ``(seed, name)`` (63 bits)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _hf_initializer(name: str, modules: dict[str, nn.Module]) -> Callable[[nn.Module], None] | None:
    """``_init_weights`` of the nearest Hugging Face ``PreTrainedModel`` at or above the module ``name``."""
    if "transformers" not in sys.modules:  # no Hugging Face model can exist
        return None
    from transformers import PreTrainedModel

    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        ancestor = modules.get(".".join(parts[:depth]))
        if isinstance(ancestor, PreTrainedModel):
            init: Callable[[nn.Module], None] = ancestor._init_weights
            return init
    return None


def _unfilled(tensors: list[Tensor]) -> bool:
    return any(t.is_floating_point() and bool(torch.isnan(t).any()) for t in tensors)


def seeded_init(root: nn.Module, seed: int = 0, prefix: str = "") -> Materializer:
    """A materializer that initializes each ``meta`` parameter of a unit at random, on the CPU, when it is sharded.

    Every module that holds ``meta`` parameters directly is initialized on its own, with the global RNG seeded from
    ``(seed, prefix + its name)`` (:func:`unit_seed`; the caller's RNG state is restored): the values are the same on
    every rank and do not depend on the world size, the FSDP units chosen or their order. The initializer is that of
    the nearest Hugging Face ``PreTrainedModel`` at or above the module (``_init_weights(module)``, as ``from_config``
    uses, so the distributions match), else the module's ``reset_parameters()``. The values are not those of an
    eager ``from_config`` with the same global seed (that draws all weights from one RNG stream in another order).

    Args:
        root: The model given to ``shard_model`` (read now: its module names locate Hugging Face ancestors).
        seed: The run's seed.
        prefix: Prepended to module names for seeding (e.g. the LightningModule's child name and a dot, so that two
            children's modules of the same name get different values).

    Returns:
        ``fn(name, unit)`` for ``shard_model(materialize=...)``. It raises ``ValueError`` for a ``meta`` buffer (build
        buffers for real: :func:`parameters_on_meta`) or a ``meta`` parameter that neither initializer fills.
    """
    modules = dict(root.named_modules(remove_duplicate=False))

    def materialize(name: str, unit: nn.Module) -> None:
        entries = _meta_tensors(name, unit)
        buffers = [e.holders[0][2] for e in entries if not e.parameter]
        if buffers:
            raise ValueError(
                f"meta buffer(s) {', '.join(repr(b) for b in buffers[:3])} (FSDP unit {name or '<root>'!r}): a "
                "random init cannot recreate buffers; build them on a real device (parameters_on_meta does)"
            )
        owners: dict[int, tuple[str, nn.Module, list[_MetaTensor]]] = {}  # by the first module holding each
        for entry in entries:
            module, attr, full = entry.holders[0]
            owners.setdefault(id(module), (full[: -len(attr)].rstrip("."), module, []))[2].append(entry)
        with torch.no_grad():
            for owner_name, owner, owned in owners.values():
                _init_owner(owner_name, owner, owned, modules, unit_seed(seed, prefix + owner_name), name)

    return materialize


def _init_owner(
    name: str, owner: nn.Module, entries: list[_MetaTensor], modules: dict[str, nn.Module], seed: int, unit: str
) -> None:
    """Replace ``entries`` (``meta`` parameters ``owner`` holds; ties too) by fresh ones and initialize them through
    ``owner``; its other parameters are left as they were."""
    fresh = [_replace(e, torch.empty(e.tensor.shape, dtype=e.tensor.dtype)) for e in entries]
    for t in fresh:  # NaN marks what no initializer wrote (integer parameters: zeros, unchecked)
        if t.is_floating_point():
            t.fill_(math.nan)
        else:
            t.zero_()
    fresh_ids = {id(t) for t in fresh}
    kept = {a: p.detach().clone() for a, p in owner._parameters.items() if p is not None and id(p) not in fresh_ids}
    candidates = [_hf_initializer(name, modules)]
    reset = getattr(owner, "reset_parameters", None)
    if callable(reset):
        candidates.append(lambda _: reset())
    for init in (c for c in candidates if c is not None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init(owner)
        if not _unfilled(fresh):
            break
    else:
        names = ", ".join(repr(e.holders[0][2]) for e in entries)
        raise ValueError(
            f"meta parameter(s) {names} (FSDP unit {unit or '<root>'!r}): {type(owner).__name__} has no "
            "initializer that fills them (no Hugging Face _init_weights for it, no reset_parameters): give their "
            "values with weights=, or build them for real"
        )
    for attr, value in kept.items():  # an initializer also resets tensors that were not meta: undo that
        held = owner._parameters[attr]
        assert held is not None
        held.copy_(value)
