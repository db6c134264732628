"""FSDP2-sharded NeuZip: each rank holds only its dim-0 shard of each weight, compressed.

:func:`shard_model` applies FSDP2's ``fully_shard`` to chosen submodules (by default every block of every
``nn.ModuleList``: the transformer layers) and then to the root. With ``compress=True`` the eligible weights
(:func:`~nz_lightning.tensor.convert.default_should_compress`: floating-point, 2-D or more) are held, on each rank,
as an :class:`~nz_lightning.distributed.fsdp_tensor.NZShard` of their shard; a weight exists dense only between
FSDP's all-gather before its module computes and its reshard after (forward and backward). Gradients are
reduce-scattered by FSDP; :func:`~nz_lightning.distributed.fsdp_optim.sharded_fused_optimizer` updates each local
shard inside backward.

With ``compressed_gather=True`` the all-gathers move each shard's compressed bytes in a payload of a fixed capacity
agreed by all ranks here (the largest rank's encoded size times ``1 + gather_headroom``); see
:mod:`~nz_lightning.distributed.fsdp_payload`.
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from nz_lightning.distributed import fsdp_tensor
from nz_lightning.distributed.fsdp_payload import encoded_size
from nz_lightning.distributed.fsdp_tensor import CommStats, GatherSpec, NZShard, PendingShard
from nz_lightning.distributed.fsdp_units import ModuleSelector, select_units, shard_unit
from nz_lightning.distributed.row_split import UnitSplitter
from nz_lightning.tensor.convert import default_should_compress
from nz_lightning.tensor.parameter import NZParameter, read_dense
from nz_lightning.tensor.workspace import DECODE_POOL

__all__ = [
    "Materializer",
    "ModuleSelector",
    "comm_stats",
    "local_shard",
    "refresh_gather_capacities",
    "shard_bytes",
    "shard_model",
    "shard_rows",
]

Materializer = Callable[[str, nn.Module], None]
"""``fn(name, module)``: give a unit's ``meta`` tensors values just before it is sharded (see :func:`shard_model`)."""

_INFO = "_nz_fsdp_info"


@dataclass
class _ShardInfo:
    """What :func:`shard_model` leaves on the model: byte counters and how capacities are agreed."""

    stats: CommStats
    group: Any
    headroom: float


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` rows of dim 0 that FSDP2 gives ``rank`` of ``world`` (``torch.chunk``'s split)."""
    chunk = math.ceil(rows / world) if rows else 0
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def _swap_for_pending(
    model: nn.Module,
    world: int,
    compress: bool,
    compressed_gather: bool,
    include: Iterable[str] | None,
    exclude: Iterable[str] | None,
    backend: str | None,
    stats: CommStats,
    exchange: Any,
    *,
    prefix: str = "",
    done: dict[int, tuple[weakref.ref[nn.Parameter], nn.Parameter]] | None = None,
    skip_sharded: bool = False,
) -> None:
    """Replace eligible parameters by :class:`PendingShard` (compress) and compressed others by dense ones.

    ``prefix``: ``model``'s name in the whole model (for ``include``/``exclude``); ``done``: replacements made by
    earlier calls (tied parameters), by ``id`` with a weak reference to the original (a freed original's ``id`` can
    come back for a new parameter a materializer installs); ``skip_sharded``: leave DTensors (units sharded before)
    alone instead of raising.
    """
    include, exclude = list(include or []), list(exclude or [])
    done = {} if done is None else done
    for module_name, module in list(model.named_modules(remove_duplicate=False)):
        for pname, param in list(module.named_parameters(recurse=False)):
            full = ".".join(x for x in (prefix, module_name, pname) if x)
            seen = done.get(id(param))
            if seen is not None and seen[0]() is param:
                setattr(module, pname, seen[1])
                continue
            if isinstance(param, DTensor):
                if skip_sharded:
                    continue
                raise ValueError(f"parameter {full!r} is already a DTensor: the model is already sharded")
            if param.device.type == "meta":
                raise ValueError(f"parameter {full!r} is on the meta device: materialize the model before sharding it")
            if isinstance(param, NZParameter) and param.store.lossy:
                raise ValueError(
                    f"parameter {full!r} is held with lossy compression: sharded training needs lossless weights "
                    "(compress without mantissa_bits)"
                )
            wanted = compress and (default_should_compress(param) or _matches(full, include))
            wanted = wanted and not _matches(full, exclude)
            if wanted and (param.dim() == 0 or param.shape[0] % world):
                raise ValueError(
                    f"parameter {full!r} of shape {tuple(param.shape)}: dim 0 does not divide by the world size "
                    f"{world}, so its shards cannot all be held compressed. Pad that dimension to a multiple of "
                    f"{world}, or keep it dense-sharded with exclude=[{full!r}]"
                )
            if wanted:
                spec = GatherSpec(
                    name=full, compressed=compressed_gather, stats=stats, requested=compressed_gather, exchange=exchange
                )
                value = read_dense(param).contiguous()
                new = nn.Parameter(PendingShard(value, spec, backend), requires_grad=param.requires_grad)
            elif isinstance(param, NZParameter):
                new = nn.Parameter(param.dense(), requires_grad=param.requires_grad)
            else:
                done[id(param)] = (weakref.ref(param), param)
                continue
            done[id(param)] = (weakref.ref(param), new)
            setattr(module, pname, new)


def _agree_capacities(shards: list[NZShard], group: Any, headroom: float) -> bool:
    """Set every compressed-gather shard's capacity to the largest rank's encoded size times ``1 + headroom``.

    A parameter whose capacity would reach its dense shard size is gathered dense (compression would not pay).
    A collective over ``group``. Returns False (and changes nothing) once an all-gather has sized FSDP's buffers.
    """
    if any(s.gather_spec.frozen for s in shards):
        return False
    wanted = [s for s in shards if s.gather_spec.requested]
    if not wanted:
        return True
    sizes = torch.tensor([encoded_size(s.store) for s in wanted], dtype=torch.int64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    for shard, size in zip(wanted, sizes.tolist(), strict=True):
        capacity = -(-math.ceil(size * (1.0 + headroom)) // 64) * 64
        spec = shard.gather_spec
        spec.compressed = capacity < shard.numel() * shard.element_size()
        spec.capacity = capacity if spec.compressed else 0
    return True


def refresh_gather_capacities(model: nn.Module) -> bool:
    """Agree the compressed-gather capacities again from the shards' current encodings (e.g. after loading weights).

    A collective: call it on every rank. Only possible before the model's first all-gather (FSDP sizes its gather
    buffers then); afterwards a shard that outgrew its capacity is gathered dense, still exactly.

    Returns:
        Whether the capacities were agreed again (False once the model has all-gathered).
    """
    info = _info(model)
    nz = [s for s in (local_shard(p) for p in model.parameters()) if isinstance(s, NZShard)]
    return _agree_capacities(nz, info.group, info.headroom)


def shard_model(
    model: nn.Module,
    *,
    mesh: DeviceMesh | None = None,
    compress: bool = True,
    compressed_gather: bool = True,
    reshard_after_forward: bool = True,
    modules: ModuleSelector | Literal["layers", "weights"] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    gather_headroom: float = 0.05,
    backend: str | None = None,
    device: torch.device | str | None = None,
    materialize: Materializer | None = None,
    split_bytes: int | Literal["auto"] | None = "auto",
    backward_prefetch: bool = True,
    gather_heads: Literal["exchange", "read"] = "exchange",
) -> nn.Module:
    """Shard ``model`` with FSDP2 in place, each rank holding its dim-0 shard of each weight (compressed).

    Call it on every rank with the same model (same values everywhere: e.g. seeded, or loaded), after
    ``torch.distributed`` is initialized and the model is on its device. The model may hold dense or losslessly
    compressed (:func:`~nz_lightning.tensor.convert.compress_model`) parameters.

    Args:
        model: The model (modified in place).
        mesh: A 1-D device mesh (``None``: all ranks, on the model's device type).
        compress: Hold eligible weights' shards compressed (:class:`NZShard`); ``False``: plain FSDP2 (the dense
            reference, compressed parameters are decompressed first).
        compressed_gather: All-gather compressed payloads (``False``: decode the shard and gather dense values).
            Both give bit-identical unsharded weights.
        reshard_after_forward: FSDP2's option (free unsharded weights after forward; re-gather in backward).
        modules: Submodules sharded on their own before the root (see :data:`ModuleSelector`). ``None`` or
            ``"layers"``: every element of every ``nn.ModuleList`` with parameters, and the untied embeddings and
            linear layers outside them, such as the output head. ``"weights"``: those and every linear layer or
            embedding inside the blocks, so that one weight matrix at a time is gathered dense (more, smaller
            collectives; a lower peak).
        include: fnmatch patterns of parameter names to compress beyond the default policy.
        exclude: fnmatch patterns of parameter names to keep dense-sharded (e.g. a weight whose dim 0 does not divide
            by the world size).
        gather_headroom: Capacity margin over the largest encoded shard at setup (weights drift while training; a
            shard that outgrows the capacity is gathered dense, never wrongly).
        backend: Codec backend to force.
        device: Move each FSDP unit to this device just before sharding it, so the dense model may start on the CPU
            and only one unit is dense on the device at a time (``None``: the model is on its device already). The
            checks on the whole model (divisibility, lossy, meta) then run unit by unit.
        materialize: Called as ``materialize(name, module)`` for each FSDP unit (children first, the root last with
            name ``""``) just before it is moved to ``device`` and sharded: it must replace the ``meta`` parameters
            and buffers the unit holds outside units already sharded (e.g. from a checkpoint file, or a seeded
            init), so that a model built on ``meta`` is never dense as a whole on any rank.
        split_bytes: Split a unit that is a plain, untied ``nn.Linear`` or ``nn.Embedding`` (the output head,
            embeddings; with ``modules="weights"`` also each projection) larger than this many dense bytes into row
            parts, each a unit of its own
            (:mod:`~nz_lightning.distributed.row_split`; checkpoints keep the unsplit names). ``"auto"``: no larger
            than the largest unit inside an ``nn.ModuleList`` (a decoder layer, or its largest projection when those
            are units); ``None``: never split.
        backward_prefetch: FSDP2's implicit backward prefetch: all-gather the next unit's weight while the current
            unit's backward runs (overlap on a GPU). ``False``: gather each unit only when its own backward starts,
            so at most one unit's gathered weight is live in backward (a lower peak, no overlap).
        gather_heads: On a GPU, compressed payloads are packed on the device
            (:mod:`~nz_lightning.distributed.fsdp_payload_pack`) and decoded in place; how each rank learns the
            layout of the others' payloads. ``"exchange"``: their host-side heads are all-gathered over a gloo
            process group (created here when the default backend is not gloo) with each all-gather, so no rank reads
            a gathered payload back to the host, and each gathered decode's consistency check is deferred to
            ``CompressedTensor.check_deferred`` (the fused optimizer reads it at the end of each backward).
            ``"read"``: read from the gathered buffer (two small device-to-host copies per all-gather, each decode
            checked at once). On the CPU payloads are packed and parsed on the host, and this does not apply.

    Returns:
        ``model``; its parameters are now DTensors (``fully_shard``). :func:`comm_stats` gives its byte counters.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
        ValueError: A weight to compress whose dim 0 does not divide by the world size, a lossy weight, a meta or
            already sharded parameter, a mesh that is not 1-D, a bad ``gather_headroom`` or ``split_bytes``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed initialized (init_process_group) on every rank")
    if not isinstance(reshard_after_forward, bool):
        raise ValueError(f"reshard_after_forward must be a bool, got {reshard_after_forward!r}")
    if not isinstance(backward_prefetch, bool):
        raise ValueError(f"backward_prefetch must be a bool, got {backward_prefetch!r}")
    if gather_heads not in ("exchange", "read"):
        raise ValueError(f"gather_heads must be 'exchange' or 'read', got {gather_heads!r}")
    if not gather_headroom > -1.0:
        raise ValueError(f"gather_headroom must be > -1, got {gather_headroom}")
    if mesh is None:
        first = next(model.parameters(), None)
        if device is not None:
            device_type = torch.device(device).type
        else:
            device_type = first.device.type if first is not None else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"shard_model takes a 1-D device mesh, got {mesh.ndim} dimensions")
    stats = CommStats()
    world = mesh.size()
    exchange = _exchange_group(mesh) if compress and compressed_gather and gather_heads == "exchange" else None
    options = (world, compress, compressed_gather, include, exclude, backend, stats, exchange)
    units = select_units(model, modules)
    names = {id(m): n for n, m in model.named_modules()}
    splitter = UnitSplitter(model, units, split_bytes, world)
    if device is None and materialize is None:
        units = [part for module in units for _, part in splitter.split(names[id(module)], module)]
        _swap_for_pending(model, *options)
        for module in units:
            shard_unit(module, mesh, reshard_after_forward, backward_prefetch)
    else:  # one unit dense (and on the device) at a time
        done: dict[int, tuple[weakref.ref[nn.Parameter], nn.Parameter]] = {}
        for unit in [*units, model]:
            if materialize is not None:
                materialize(names[id(unit)], unit)
            for name, module in splitter.split(names[id(unit)], unit):
                if device is not None:
                    module.to(device)
                _swap_for_pending(module, *options, prefix=name, done=done, skip_sharded=True)
                if module is not model:
                    shard_unit(module, mesh, reshard_after_forward, backward_prefetch)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if not backward_prefetch:
        model.set_modules_to_backward_prefetch([model])  # type: ignore[operator]
    shards = [local_shard(p) for p in model.parameters()]
    nz = [s for s in shards if isinstance(s, NZShard)]
    _agree_capacities(nz, mesh.get_group(), gather_headroom)
    for p in model.parameters():
        if isinstance(p, DTensor) and p.requires_grad:
            start, stop = shard_rows(p.shape[0], world, 0)
            padded = (stop - start) * world * (p.numel() // max(p.shape[0], 1)) * p.element_size()
            p.register_post_accumulate_grad_hook(_count_reduce_scatter(stats, padded))
    block_bytes = [
        (stop - start) * s.store.shape[1:].numel() * s.element_size() for s in nz for start, stop in s.store.bounds
    ]
    DECODE_POOL.fit(max(block_bytes, default=0))
    setattr(model, _INFO, _ShardInfo(stats, mesh.get_group(), gather_headroom))
    return model


def _exchange_group(mesh: DeviceMesh) -> Any:
    """A host (gloo) group over ``mesh``'s ranks for payload heads, or ``None`` where payloads are parsed on the host.

    Created with local synchronization: only the mesh's ranks take part, so a 1-D slice of a larger mesh (each
    replica group calling with its own ranks) works too.
    """
    if mesh.device_type == "cpu" and not fsdp_tensor.DEVICE_PATH_ON_CPU:
        return None
    group = mesh.get_group()
    if dist.get_backend(group) == "gloo":
        return group
    return dist.new_group(ranks=dist.get_process_group_ranks(group), backend="gloo", use_local_synchronization=True)


def _count_reduce_scatter(stats: CommStats, nbytes: int) -> Callable[[Tensor], None]:
    def hook(p: Tensor) -> None:
        stats.reduce_scatter_bytes += nbytes

    return hook


def local_shard(p: Tensor) -> Tensor:
    """The tensor this rank holds for parameter ``p``: a DTensor's local tensor (an :class:`NZShard` or dense), or
    ``p`` itself for a parameter that is not sharded."""
    return p._local_tensor if isinstance(p, DTensor) else p


def comm_stats(model: nn.Module) -> CommStats:
    """The byte counters of a model built by :func:`shard_model`.

    Raises:
        ValueError: ``model`` was not built by :func:`shard_model`.
    """
    return _info(model).stats


def _info(model: nn.Module) -> _ShardInfo:
    info = getattr(model, _INFO, None)
    if not isinstance(info, _ShardInfo):
        raise ValueError("this model was not sharded by shard_model")
    return info


def shard_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds for the model's parameters (each tied parameter once).

    Returns:
        ``{"compressed": ..., "dense": ..., "total": ..., "dense_equivalent": ...}``: compressed shards' held bytes
        (blobs and cached tables), dense local tensors' bytes, their sum, and what all local shards take dense.
    """
    compressed = dense = equivalent = 0
    for p in model.parameters():
        local = local_shard(p)
        size = local.numel() * local.element_size()
        equivalent += size
        if isinstance(local, NZParameter):
            compressed += local.store.nbytes
        else:
            dense += size
    return {"compressed": compressed, "dense": dense, "total": compressed + dense, "dense_equivalent": equivalent}
