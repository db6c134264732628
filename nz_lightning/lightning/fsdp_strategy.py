"""``NeuZipFSDPStrategy``: FSDP2-sharded NeuZip (``Trainer(strategy="neuzip_fsdp")``; ``"lomo_fsdp"``: dense shards).

Every rank holds only its dim-0 shard of each weight, compressed (:func:`~nz_lightning.distributed.shard_model`); a
layer's weight is all-gathered (as compressed bytes by default), decoded, used and freed; gradients are
reduce-scattered and the fused optimizer updates each rank's shard inside backward
(:class:`~nz_lightning.distributed.ShardedFusedOptimizer`). Checkpoints are written by rank 0 alone, atomically:
``checkpoint_format="dense"`` gathers whole dense tensors (portable, loadable at any world size and without
nz_lightning); ``"compressed"`` gathers every rank's compressed shards as they are held (same world size to resume).
Both carry every rank's optimizer state, so a run resumes bit-identically at the same world size. With
``meta_init=True`` the model is built with its parameters on ``meta`` and each FSDP unit is filled (from ``weights``,
a pretrained directory or a seeded init: :mod:`~nz_lightning.distributed.materialize`) just before it is sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from nz_lightning.lightning.compat import _distributed_is_initialized
from nz_lightning.lightning.replica import ReplicaStrategy, join_process_group
from nz_lightning.lightning.strategy import NeuZipStrategy

if TYPE_CHECKING:
    from nz_lightning.distributed.fsdp import Materializer
    from nz_lightning.tensor.convert import WeightReader

__all__ = ["NeuZipFSDPStrategy"]

_SHARDS_KEY = "nz_lightning_shards"
"""``checkpoint["state_dict"]`` key of the compressed format: every rank's :func:`shard_state_dict`, by rank."""


class NeuZipFSDPStrategy(NeuZipStrategy):
    """NeuZip on FSDP2: compressed weight shards, compressed all-gather, fused update of the local shard.

    Args:
        compressed_gather: All-gather the compressed bytes (fixed capacity per weight, dense fallback for a shard
            that outgrows it) and decode after the gather; ``False``: decode the shard, gather dense values. Both give
            bit-identical weights.
        modules: Submodules sharded on their own (FSDP2 units) before their root: ``"layers"`` (default: every
            element of every ``nn.ModuleList``, plus the untied embeddings and linear layers outside them, such as the
            output head), ``"weights"`` (those and every linear layer inside the blocks: one weight matrix gathered
            at a time, the lowest peak), fnmatch patterns of names, module classes or a predicate ``fn(name, module)``.
        gather_headroom: Capacity margin over the largest encoded shard at setup.
        split_bytes: Split an output head or embedding (with ``modules="weights"``, also a projection) larger than
            this many dense bytes into row-part units (``"auto"``: the largest unit inside the blocks, so only heads
            and embeddings; a number of bytes; ``None``: never). Checkpoints keep the unsplit names.
        backward_prefetch: FSDP2's implicit backward prefetch (gather the next unit during the current unit's
            backward: overlap on GPUs); ``False`` gathers each unit only when its backward starts (a lower peak).
        gather_heads: On GPUs, how ranks learn the layout of each other's compressed payloads: ``"exchange"``
            (default: over a gloo group with each all-gather, no device-to-host read; decode checks deferred to the
            end of each backward) or ``"read"`` (two small device-to-host copies per all-gather); see
            :func:`~nz_lightning.distributed.fsdp.shard_model`.
        meta_init: Build the model's parameters on ``meta`` (``configure_model`` / ``trainer.init_module()``; buffers
            are built for real on the CPU) and give them values one FSDP unit at a time as each is sharded, so that
            no rank ever holds the dense model whole: from ``weights=`` when given, else from the LightningModule's
            ``meta_weight_sources()`` (e.g. :class:`~nz_lightning.lm.modules.CausalLMModule` with ``pretrained``),
            else a seeded random init (:func:`~nz_lightning.distributed.materialize.seeded_init` with ``seed``: the
            same on every rank and at any world size). A model built outside those contexts is unaffected.
        **kwargs: :class:`~nz_lightning.NeuZipStrategy`'s options (``compress``, ``include``/``exclude``,
            ``checkpoint_format``, ``stochastic_rounding``, ``seed``, process-group options...). ``mantissa_bits``
            (lossy) and ``blocked_head`` are not supported on shards. ``weights``: values of ``meta`` parameters,
            keyed by the LightningModule's names (``model.model.layers.0...``); filled unit by unit.

    Raises:
        ValueError: ``mantissa_bits`` is set, ``meta_init``/``backward_prefetch`` is not a bool, ``split_bytes`` or
            ``modules`` is not one of the accepted forms. At setup: a weight whose dim 0 does
            not divide by the world size (the message names the fix), AdaLomo, parameters held directly by the
            LightningModule, ``meta`` tensors nothing fills, or a ``weights`` key missing or of the wrong shape.
    """

    strategy_name = "neuzip_fsdp"

    def __init__(
        self,
        *,
        compressed_gather: bool = True,
        modules: str | Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
        gather_headroom: float = 0.05,
        split_bytes: int | str | None = "auto",
        backward_prefetch: bool = True,
        gather_heads: str = "exchange",
        meta_init: bool = False,
        **kwargs: Any,
    ) -> None:
        if gather_heads not in ("exchange", "read"):
            raise ValueError(f"gather_heads must be 'exchange' or 'read', got {gather_heads!r}")
        for flag, value in (("meta_init", meta_init), ("backward_prefetch", backward_prefetch)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be a bool, got {value!r}")
        if not (split_bytes is None or split_bytes == "auto" or (isinstance(split_bytes, int) and split_bytes > 0)):
            raise ValueError(f"split_bytes must be 'auto', None or a positive number of bytes, got {split_bytes!r}")
        if kwargs.get("mantissa_bits") is not None:
            raise ValueError("NeuZipFSDPStrategy trains lossless shards: mantissa_bits is not supported")
        kwargs["blocked_head"] = False
        super().__init__(**kwargs)
        self.compressed_gather = compressed_gather
        if isinstance(modules, str) and modules not in ("layers", "weights"):
            raise ValueError(f"modules must be 'layers', 'weights', patterns, classes or a predicate, got {modules!r}")
        keep = modules is None or callable(modules) or isinstance(modules, str)
        self.modules = modules if keep else list(modules)  # type: ignore[arg-type]
        self.gather_headroom = gather_headroom
        self.split_bytes = split_bytes
        self.backward_prefetch = backward_prefetch
        self.gather_heads = gather_heads
        self.meta_init = meta_init

    # -- process group: FSDP2 needs one even for a single process ----------------------------------------------

    @override
    def setup_environment(self) -> None:
        """Set up as a data-parallel strategy; a single process still joins a (one-rank) process group."""
        super().setup_environment()
        if not _distributed_is_initialized():
            assert self.cluster_environment is not None
            self.set_world_ranks()
            backend = self._process_group_backend or ("nccl" if self.root_device.type == "cuda" else "gloo")
            join_process_group(self.cluster_environment, backend, self._timeout)

    # -- model -------------------------------------------------------------------------------------------------

    def sharded_roots(self) -> list[nn.Module]:
        """The LightningModule's children that hold parameters: each is sharded with its own FSDP2 root.

        Raises:
            ValueError: The LightningModule holds parameters itself.
        """
        return [root for _, root in self._named_roots()]

    def _named_roots(self) -> list[tuple[str, nn.Module]]:
        module = self.lightning_module
        assert module is not None
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            raise ValueError(
                f"NeuZipFSDPStrategy shards the LightningModule's submodules; it holds parameters itself "
                f"({', '.join(own[:3])}): move them into a submodule"
            )
        return [(name, child) for name, child in module.named_children() if any(True for _ in child.parameters())]

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """Build modules on the CPU (compressed or not): each FSDP unit moves to the device when it is sharded.

        With ``meta_init`` parameters are built on ``meta`` (no memory) and buffers on the CPU.
        """
        from nz_lightning.distributed.materialize import parameters_on_meta

        with ReplicaStrategy.tensor_init_context(self, empty_init=empty_init), torch.device("cpu"):
            if self.meta_init:
                with parameters_on_meta():
                    yield
            else:
                yield

    def materializer(self, name: str, root: nn.Module, reader: WeightReader | None) -> Materializer | None:
        """What gives the ``meta`` tensors of the LightningModule's child ``name`` (``root``) values, unit by unit.

        Args:
            name: The child's attribute name in the LightningModule.
            root: The child (the model given to ``shard_model``).
            reader: ``weights`` opened once for all children (``None``: no ``weights``).

        Returns:
            From ``weights`` (keys: ``name + "." +`` unit-relative names), else from the LightningModule's
            ``meta_weight_sources()[name]`` (keys relative to the child), else with ``meta_init`` a seeded init
            (``seed``), else ``None`` (``meta`` tensors then fail at setup with a message naming the fix).
        """
        from nz_lightning.distributed.materialize import META_WEIGHT_SOURCES, from_weights, seeded_init

        if reader is not None:
            return from_weights(reader, prefix=f"{name}.")
        sources = getattr(self.lightning_module, META_WEIGHT_SOURCES, None)
        source = sources().get(name) if callable(sources) else None
        if source is not None:
            return from_weights(source)
        if self.meta_init:
            return seeded_init(root, seed=self.seed, prefix=f"{name}.")
        return None

    @override
    def model_to_device(self) -> None:
        """Copy rank 0's weights everywhere (``meta`` tensors are not copied: every rank fills them identically), then
        shard each root unit by unit: fill the unit's ``meta`` tensors (:meth:`materializer`), move it to the device,
        keep this rank's rows (compressed).

        Raises:
            ValueError: ``meta`` tensors that nothing fills (the message names them and the fix), a ``weights`` key
                that is missing or of the wrong shape.
        """
        from nz_lightning.distributed import shard_model
        from nz_lightning.tensor.convert import WeightReader

        assert self.model is not None
        self.broadcast_module_(self.model)  # skips meta tensors
        reader = WeightReader(self.weights) if self.weights is not None else None
        for name, root in self._named_roots():
            materialize = self.materializer(name, root, reader)
            if materialize is None:
                _refuse_meta(root, name)
            shard_model(
                root,
                compress=self.compress,
                compressed_gather=self.compressed_gather,
                modules=self.modules,
                include=self.include,
                exclude=self.exclude,
                gather_headroom=self.gather_headroom,
                backend=self.backend,
                device=self.root_device,
                materialize=materialize,
                split_bytes=self.split_bytes,  # type: ignore[arg-type]
                backward_prefetch=self.backward_prefetch,
                gather_heads=self.gather_heads,  # type: ignore[arg-type]
            )
        _refuse_meta(self.model, "")
        self.model.to(self.root_device)  # what no root holds (buffers of the LightningModule itself)

    @override
    def _grad_reducer(self) -> Callable[[Tensor], Tensor] | None:
        return None  # FSDP2 reduce-scatters the gradients itself

    # -- checkpoints -------------------------------------------------------------------------------------------

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Whole dense tensors (``"dense"``), or every rank's compressed shards (``"compressed"``); on rank 0.

        A collective: Lightning calls it on every rank before rank 0 writes.
        """
        from nz_lightning.distributed import full_state_dict, shard_state_dict

        module = self.lightning_module
        assert module is not None
        if self.checkpoint_format == "dense":
            return full_state_dict(module, rank0_only=True)
        return {_SHARDS_KEY: self._gather_to_rank0(shard_state_dict(module))}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Every rank's fused-optimizer state (the moments of its shards), gathered on rank 0."""
        state = getattr(optimizer, "_optimizer", optimizer).state_dict()
        return {"fused": True, "sharded": self._gather_to_rank0(state), "world_size": dist.get_world_size()}

    def _gather_to_rank0(self, obj: Any) -> list[Any]:
        gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered or []

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Restore dense tensors (any world size) or this rank's compressed shards (the saving world size).

        Raises:
            ValueError: A compressed checkpoint of another world size, or tensors that do not fit the model.
        """
        from nz_lightning.distributed import load_full_state_dict, load_shard_state_dict, refresh_gather_capacities
        from nz_lightning.lightning.checkpoint_integrity import verify_checkpoint

        module = self.lightning_module
        assert module is not None
        verified, self._verified = self._verified, None
        if verified is None or verified[0] != id(checkpoint):
            verify_checkpoint(checkpoint, sections=("state_dict",))
        state = checkpoint["state_dict"]
        if _SHARDS_KEY in state:
            load_shard_state_dict(module, self._my_part(state[_SHARDS_KEY]))
        else:
            load_full_state_dict(module, state, strict=strict)
        for root in self.sharded_roots():
            refresh_gather_capacities(root)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Give each rank the fused-optimizer state of its rows (resharded if written at another world size).

        Raises:
            ValueError: The optimizer state is not a sharded fused optimizer's, or cannot be resharded (pending
                accumulation).
        """
        from nz_lightning.distributed.reshard import reshard_optimizer_state

        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            if "sharded" not in state:
                raise ValueError(
                    "the checkpoint's optimizer state was not written by NeuZipFSDPStrategy: load only its weights "
                    "(a dense checkpoint loads at any world size), then fit without ckpt_path"
                )
            parts = state["sharded"]
            if len(parts) == dist.get_world_size():
                optimizer.load_state_dict(parts[dist.get_rank()])
            else:
                fused = self._require_fused(optimizer)
                shapes = [p.shape for p in fused._params]
                optimizer.load_state_dict(
                    reshard_optimizer_state(parts, shapes, dist.get_world_size(), dist.get_rank())
                )

    def _my_part(self, parts: list[Any]) -> Any:
        world, rank = dist.get_world_size(), dist.get_rank()
        if len(parts) != world:
            raise ValueError(
                f"the checkpoint's compressed weights were written by {len(parts)} rank(s), this run has {world}: "
                f"resume at {len(parts)} rank(s), or write dense checkpoints (checkpoint_format='dense'), which load "
                "at any world size"
            )
        return parts[rank]

    @override
    def _weights_stay(self) -> bool:
        return True  # sharded weights stay where they are (they cannot leave their process group)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``"neuzip_fsdp"`` and ``"lomo_fsdp"`` (dense shards, the same fused update; idempotent)."""
        if "neuzip_fsdp" not in strategy_registry:
            strategy_registry.register("neuzip_fsdp", cls, description="NeuZip on FSDP2: compressed weight shards")
        if "lomo_fsdp" not in strategy_registry:
            strategy_registry.register(
                "lomo_fsdp", cls, description="FSDP2 with the fused in-backward update (dense shards)", compress=False
            )


def _refuse_meta(module: nn.Module, name: str) -> None:
    on_meta = [_join(name, n) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(
            f"tensors on the meta device: {', '.join(on_meta[:5])}; give their values with "
            "NeuZipFSDPStrategy(weights=...), or meta_init=True (a seeded random init of parameters; buffers must be "
            "built on a real device)"
        )


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def register_fsdp_strategies() -> None:
    """Register ``"neuzip_fsdp"`` and ``"lomo_fsdp"`` in Lightning's ``StrategyRegistry`` (idempotent)."""
    from lightning.pytorch.strategies import StrategyRegistry

    NeuZipFSDPStrategy.register_strategies(StrategyRegistry)


register_fsdp_strategies()
