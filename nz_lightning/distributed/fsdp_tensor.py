"""The compressed local shard FSDP2 holds: :class:`NZShard`, with FSDP2's all-gather extension.

FSDP2 (``fully_shard``) keeps each parameter as a DTensor whose local tensor is this rank's dim-0 shard. Here that
local tensor is an :class:`NZShard`: an :class:`~nz_lightning.tensor.parameter.NZParameter` (a lazily decoded view
of a :class:`~nz_lightning.tensor.store.WeightStore`) with ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``:

* compressed gather: each rank hands FSDP a fixed-capacity uint8 payload of its shard's blobs
  (:mod:`~nz_lightning.distributed.fsdp_payload`); after the all-gather every rank decodes every rank's part into the
  unsharded dense weight. A shard that does not fit its capacity makes every rank gather the dense shards instead
  (the overflow flag travels in the payload, so all ranks take that branch together).
* dense gather: the local shard is decoded and the dense values are gathered (what plain FSDP2 moves).

The unsharded weight is a plain dense tensor that FSDP frees when it reshards (after forward, after backward).
A :class:`PendingShard` stands in for a parameter between :func:`~nz_lightning.distributed.fsdp.shard_model`'s swap
and ``fully_shard``: it holds the dense full value and makes ``fully_shard``'s ``new_zeros`` build an empty
``NZShard``, so that each rank only ever encodes its own shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._pytree import tree_map

from nz_lightning.distributed.collectives import all_gather_flat
from nz_lightning.distributed.fsdp_payload import memory_alias, pack_payload, payload_overflowed, unpack_payload
from nz_lightning.distributed.fsdp_payload_device import unpack_payloads_in_place
from nz_lightning.distributed.fsdp_payload_pack import HeadExchange, pack_payload_on_device
from nz_lightning.tensor.parameter import NZParameter, WeightStore

__all__ = ["CommStats", "GatherSpec", "NZShard", "PendingShard"]

aten = torch.ops.aten


@dataclass
class CommStats:
    """Bytes moved by the collectives of one sharded model (summed over calls; :meth:`reset` between steps).

    Attributes:
        all_gather_bytes: All-gather output bytes of the compressed weights (``world_size`` times each rank's input:
            payloads in compressed mode, dense shards in dense mode), dense fallbacks after an overflow included.
        all_gather_dense_bytes: What the same all-gathers move as dense weights (the baseline for the ratio).
        reduce_scatter_bytes: Reduce-scatter input bytes of every sharded parameter's gradient (padded).
        all_gathers: Number of weight all-gathers counted.
        overflows: All-gathers that fell back to dense because a shard did not fit its capacity.
    """

    all_gather_bytes: int = 0
    all_gather_dense_bytes: int = 0
    reduce_scatter_bytes: int = 0
    all_gathers: int = 0
    overflows: int = 0

    def reset(self) -> None:
        """Zero every counter."""
        self.all_gather_bytes = self.all_gather_dense_bytes = self.reduce_scatter_bytes = 0
        self.all_gathers = self.overflows = 0

    @property
    def gather_ratio(self) -> float:
        """``all_gather_bytes / all_gather_dense_bytes`` (1.0 before any gather)."""
        return self.all_gather_bytes / self.all_gather_dense_bytes if self.all_gather_dense_bytes else 1.0


@dataclass
class GatherSpec:
    """How one compressed parameter is all-gathered (shared by all views of its shard).

    Attributes:
        name: The parameter's name (for errors).
        compressed: Gather compressed payloads (else dense values).
        capacity: Payload bytes per rank (compressed mode; agreed by every rank, fixed from the first all-gather on).
        stats: The model's byte counters.
        requested: Whether compressed gather was asked for (``compressed`` may be off where it would not pay).
        frozen: Set by the first all-gather: FSDP has sized its buffers, the capacity may no longer change.
        exchange: A host (gloo) process group over the same ranks: payloads packed on a device then come with their
            heads exchanged over it (:class:`~nz_lightning.distributed.fsdp_payload_pack.HeadExchange`), so that no
            rank reads a gathered payload back to the host. ``None``: the heads are read from the gathered buffer.
        head_slot: Bytes per head in the exchange's all-gather (grown by the first exchanges, then fixed).
    """

    name: str
    compressed: bool
    capacity: int = 0
    stats: CommStats = field(default_factory=CommStats)
    requested: bool = False
    frozen: bool = False
    exchange: Any = None
    head_slot: int = 0


class NZShard(NZParameter):
    """A rank's compressed dim-0 shard of a parameter, as FSDP2's local tensor (see the module docstring)."""

    _gather: GatherSpec

    @staticmethod
    def __new__(
        cls,
        store: WeightStore,
        size: Any,
        stride: Any,
        offset: int,
        requires_grad: bool = False,
        *,
        gather: GatherSpec,
    ) -> NZShard:
        t = NZParameter.__new__(cls, store, size, stride, offset, requires_grad)
        assert isinstance(t, NZShard)
        t._gather = gather
        return t

    @property
    def gather_spec(self) -> GatherSpec:
        """How this shard is all-gathered."""
        return self._gather

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        spec = next((a._gather for a in args if isinstance(a, NZShard)), None)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if spec is None:
            return out

        def rewrap(x: Any) -> Any:  # views come back as plain NZParameters: keep them shards
            if type(x) is NZParameter:
                size, stride, offset = x._view
                return NZShard(x.store, size, stride, offset, x.requires_grad, gather=spec)
            return x

        return tree_map(rewrap, out)

    # -- FSDP2 all-gather extension -------------------------------------------------------------------------------

    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: Any, mp_policy: Any
    ) -> tuple[tuple[Tensor, ...], Any]:
        """This rank's all-gather input: its fixed-capacity payload (compressed) or its decoded shard (dense).

        Raises:
            NotImplementedError: A mixed-precision ``param_dtype`` other than the stored dtype.
            RuntimeError: The local tensor is not a whole shard, or no capacity was agreed.
        """
        spec = self._gather
        param_dtype = getattr(mp_policy, "param_dtype", None)
        if param_dtype is not None and param_dtype != self.dtype:
            raise NotImplementedError(
                f"{spec.name}: compressed shards are gathered in their stored dtype {self.dtype}, not {param_dtype}"
            )
        if not self.is_whole_store():
            raise RuntimeError(f"{spec.name}: FSDP's local tensor is a partial view of its compressed shard")
        world = mesh.size()
        spec.frozen = True
        dense_bytes = self.numel() * self.element_size()
        spec.stats.all_gathers += 1
        spec.stats.all_gather_dense_bytes += dense_bytes * world
        meta = (tuple(outer_size), mesh.get_group(), None)
        if not spec.compressed:
            spec.stats.all_gather_bytes += dense_bytes * world
            return (self.store.read(),), meta
        if spec.capacity <= 0:
            raise RuntimeError(f"{spec.name}: no gather capacity was agreed (build the model with shard_model)")
        spec.stats.all_gather_bytes += spec.capacity * world
        if not _on_device(self.device):
            payload, _ = pack_payload(self.store, spec.capacity, self.device)
            return (payload,), meta
        payload, head = pack_payload_on_device(self.store, spec.capacity, self.device)
        exchange = None if spec.exchange is None else HeadExchange(head, spec.exchange, spec.head_slot)
        on_device = _OnDevice(exchange, defer_checks=bool(getattr(module, "training", True)))
        return (payload,), (*meta[:2], on_device)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]] | None:
        """Build (or refill ``out`` with) the unsharded dense weight from the gathered inputs.

        Raises:
            RuntimeError: The gathered payloads do not match the agreed capacity (a rank packed another one), or a
                payload is malformed.
        """
        (gathered,) = all_gather_outputs
        outer_size, group, on_device = metadata
        spec = self._gather
        if not spec.compressed:
            full = gathered.view(outer_size)
            if out is None:
                return full, ()
            if out.untyped_storage().data_ptr() != full.untyped_storage().data_ptr():
                with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(out):
                    out.detach().copy_(full)
            return None
        cap = spec.capacity
        world = dist.get_world_size(group)
        heads = None
        if on_device is not None and on_device.exchange is not None:
            # first, so that every rank finishes its exchange (a second round included) whatever fails below
            heads = on_device.exchange.wait()
            spec.head_slot = on_device.exchange.slot
        if gathered.numel() != cap * world:
            raise RuntimeError(
                f"{spec.name}: the all-gather output holds {gathered.numel()} bytes, expected {world} payloads of the "
                f"agreed capacity {cap}: the capacity changed after the first all-gather or differs between ranks"
            )
        target = torch.empty(outer_size, dtype=self.dtype, device=self.device) if out is None else out
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(target):
            dense = target.detach()
            rows = dense.view(world, -1, *dense.shape[1:])
            if on_device is not None:  # headers and tables came exchanged, or are read back
                decoded = unpack_payloads_in_place(
                    gathered, world, cap, rows, heads, defer_checks=on_device.defer_checks
                )
            else:
                raw = _host_bytes(gathered)
                parts = [raw[r * cap : (r + 1) * cap] for r in range(world)]
                decoded = not any(payload_overflowed(part, cap) for part in parts)
                for r, part in enumerate(parts if decoded else []):
                    unpack_payload(part, cap, rows[r])
            if not decoded:
                spec.stats.overflows += 1
                local = self.store.read().reshape(-1)
                spec.stats.all_gather_bytes += local.numel() * local.element_size() * world
                all_gather_flat(dense.view(-1), local, group=group)
        if gathered.untyped_storage().size() > 0:  # the payloads are decoded: FSDP re-allocates them per gather
            gathered.untyped_storage().resize_(0)
        return (target, (target,)) if out is None else None


@dataclass(frozen=True)
class _OnDevice:
    """All-gather metadata of a payload packed on the device.

    Attributes:
        exchange: The exchange of every rank's payload head over the host (started when packing, waited for after
            the all-gather), or ``None``: the heads are read back from the gathered buffer.
        defer_checks: With ``heads``: leave the decode checks to the end of the backward (the module trains), or
            make them when the payloads are decoded (one sync; evaluation, whose outputs no backward checks).
    """

    exchange: HeadExchange | None
    defer_checks: bool


DEVICE_PATH_ON_CPU = False
"""Pack and decode CPU payloads the way a GPU does (:mod:`~nz_lightning.distributed.fsdp_payload_pack`,
:mod:`~nz_lightning.distributed.fsdp_payload_device`): tests set it, so that the path GPUs take runs on the CPU."""


def _on_device(device: torch.device) -> bool:
    """Whether payloads on ``device`` are packed where they are and decoded in place (GPUs; CPUs in tests)."""
    return device.type != "cpu" or DEVICE_PATH_ON_CPU


def _host_bytes(gathered: Tensor) -> memoryview:
    """The gathered payload bytes as a host memoryview (CPU payloads only; read in place).

    On the CPU no copy is made and FSDP's buffer is not exported to numpy (that would make it unresizable): the view
    is of a :func:`~nz_lightning.distributed.fsdp_payload.memory_alias` of it, used only before the buffer is freed.
    Blobs parsed from it on the CPU view its bytes (``from_bytes(copy=False)``) and are decoded and dropped at once,
    so nothing points into it once the payloads are decoded.
    """
    flat = gathered.detach().reshape(-1)
    if flat.dtype != torch.uint8 or not flat.is_contiguous():
        raise RuntimeError(f"all-gather payloads must be contiguous uint8, got {flat.dtype}")
    return memoryview(memory_alias(flat).numpy().data)


class PendingShard(torch.Tensor):
    """A parameter's dense full value waiting for ``fully_shard`` to cut it into an :class:`NZShard`.

    ``fully_shard`` chunks it (dense views), asks it for a zero padded shard (``new_zeros``: an empty compressed
    ``NZShard``) and copies this rank's chunk in (one encode). Any other op sees the dense value.
    """

    _full: Tensor
    _gather: GatherSpec
    _backend: str | None

    @staticmethod
    def __new__(cls, full: Tensor, gather: GatherSpec, backend: str | None = None) -> PendingShard:
        t = torch.Tensor._make_wrapper_subclass(
            cls,
            full.shape,
            strides=full.stride(),
            storage_offset=0,
            dtype=full.dtype,
            device=full.device,
            requires_grad=full.requires_grad,
        )
        t._full, t._gather, t._backend = full, gather, backend
        return t

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return f"PendingShard(shape={tuple(self.shape)}, dtype={self.dtype}, name={self._gather.name!r})"

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, PendingShard):
            if func in (aten.detach.default, aten.alias.default):
                return PendingShard(first._full, first._gather, first._backend)
            dtype = kwargs.get("dtype")
            if func is aten.new_zeros.default and (dtype is None or dtype == first.dtype):
                size = torch.Size(args[1])
                store = WeightStore(torch.zeros(size, dtype=first.dtype, device=first.device), first._backend)
                meta = torch.empty(size, device="meta")
                return NZShard(store, meta.shape, meta.stride(), 0, gather=first._gather)

        def unwrap(a: Any) -> Any:
            return a._full if isinstance(a, PendingShard) else a

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
