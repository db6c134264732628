"""``NeuZipStrategy``: Lightning training on compressed weights with optimizer updates fused into backward.

``Trainer(strategy="neuzip")`` (``"lomo"``: the same without compression) keeps a plain ``LightningModule``; with
``devices=N`` / ``num_nodes=M`` every process trains a compressed replica on its share of each batch, gradients
averaged inside backward (data parallel, :class:`~nz_lightning.lightning.replica.ReplicaStrategy`). Setup
compresses the weights onto the device tensor by tensor (:func:`~nz_lightning.compress_model`; ``meta`` modules are
filled from ``weights=``). ``torch.optim.SGD`` / ``AdamW`` become the equivalent
:class:`~nz_lightning.optim.FusedOptimizer`, with LR schedulers, ``gradient_clip_val`` and
``accumulate_grad_batches`` carried over; :meth:`NeuZipStrategy.backward` updates every parameter inside backward.
Checkpoints are dense (portable) or compressed, written atomically, with the fused optimizer state. With
``mantissa_bits=k`` the strategy serves lossy inference (validate / test / predict) and refuses ``fit``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from nz_lightning.kernels import DEFAULT_BLOCK_SIZE
from nz_lightning.lightning.compat import (
    _DEVICE,
    _PATH,
    _call_callback_hooks,
    _call_lightning_module_hook,
    _optimizers_to_device,
)
from nz_lightning.lightning.optimizer_bridge import check_supported, rebind_schedulers, to_fused
from nz_lightning.lightning.replica import StartMethod
from nz_lightning.lightning.strategy_checkpoint import CheckpointFormat, StrategyCheckpointMixin
from nz_lightning.optim import FusedOptimizer
from nz_lightning.tensor.convert import WeightSource, compress_model
from nz_lightning.tensor.parameter import is_compressed

__all__ = ["NeuZipStrategy", "register_strategies"]


class NeuZipStrategy(StrategyCheckpointMixin):
    """Strategy that trains a losslessly compressed model with fused in-backward updates.

    Losses and weights are bit-identical to ``compress=False`` (the uncompressed LOMO-style baseline, registered as
    ``"lomo"``) and to driving :func:`~nz_lightning.fused_optimizer` by hand. Differences from Lightning's default
    optimization, all consequences of updating inside backward:

    * ``.grad`` is ``None`` after backward; ``on_before_optimizer_step`` runs after the weights were updated.
    * ``LightningModule.backward`` and ``configure_gradient_clipping`` overrides are not called (a warning says so).
    * Manual optimization, several optimizers, ``16-mixed`` (GradScaler) and clipping by value are refused.

    With several processes (``Trainer(devices=N, num_nodes=M)``) each holds a full compressed replica, rank 0's
    weights are copied to all at setup, and every gradient is averaged over the processes (all-reduce, one
    parameter or row block at a time, never a buffer for all gradients) before clipping, accumulation or the update,
    so the replicas stay bit-identical. Lightning adds the ``DistributedSampler``; rank 0 writes the checkpoints.

    Args:
        compress: Compress the weights (``False``: train the dense model with the same fused optimizer).
        include: fnmatch patterns of parameter names (relative to the LightningModule) to compress in addition to
            the default policy (float parameters with 2+ dimensions).
        exclude: fnmatch patterns of parameter names to keep dense.
        backend: Codec backend to force (``"torch"``, ``"cpu"``, ``"triton"``; ``None`` picks by device).
        weights: Values for parameters built on the ``meta`` device (state dict, safetensors path(s), or
            ``fn(name, shape, dtype)``); see :func:`~nz_lightning.compress_model`.
        stochastic_rounding: Round bf16 updates stochastically.
        seed: Seed of the stochastic rounding.
        blocked_head: HF causal LMs: loss, head and embedding updated by row blocks (``optim.blocked_head``).
        checkpoint_format: ``"dense"`` (portable) or ``"compressed"`` (weights stored as their encoded bytes).
        mantissa_bits: ``None`` (lossless) or the mantissa bits to keep: lossy weights for ``validate`` / ``test``
            / ``predict`` only (bf16 0-6, fp16 0-9, fp32 0-22; ``fit`` is refused when it starts).
        block_size: Lossy mode: elements per normalization block (a power of two; ``None``: no normalization).
        accelerator: As for Lightning's strategies.
        device: Force one device (default: the ones the Trainer's ``accelerator``/``devices`` select).
        checkpoint_io: Checkpoint plugin (default: :class:`~nz_lightning.lightning.checkpoint_io.AtomicCheckpointIO`).
        precision_plugin: As for Lightning's strategies.
        cluster_environment: With several processes: as for ``DDPStrategy``.
        process_group_backend: With several processes: ``"gloo"``, ``"nccl"``... (default: by device).
        timeout: With several processes: timeout of each collective (a dead rank fails the job after it).
        start_method: With several processes: ``"popen"`` (as ``ddp``), ``"spawn"`` or ``"fork"``.
        grad_overlap: With several processes: gradient all-reduces kept in flight while the previous weights are
            updated (0: each one awaited in its parameter's hook; the same bits either way).

    Raises:
        ValueError: A negative ``mantissa_bits``, lossy without ``compress``, a bad ``block_size`` or an unknown
            ``checkpoint_format``. Out-of-range ``mantissa_bits`` for the weights' dtype raise at setup.
    """

    strategy_name = "neuzip"

    def __init__(
        self,
        *,
        compress: bool = True,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        backend: str | None = None,
        weights: WeightSource | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        blocked_head: bool = True,
        checkpoint_format: CheckpointFormat = "dense",
        mantissa_bits: int | None = None,
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        accelerator: pl.accelerators.Accelerator | None = None,
        device: _DEVICE | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: StartMethod = "popen",
        grad_overlap: int = 1,
    ) -> None:
        if type(grad_overlap) is not int or grad_overlap < 0:
            raise ValueError(f"NeuZipStrategy(grad_overlap={grad_overlap!r}): must be an int >= 0")
        if mantissa_bits is not None and (type(mantissa_bits) is not int or mantissa_bits < 0 or not compress):
            why = "needs compress=True" if type(mantissa_bits) is int and mantissa_bits >= 0 else "must be an int >= 0"
            raise ValueError(f"NeuZipStrategy(mantissa_bits={mantissa_bits!r}): {why}")
        if block_size is not None and (block_size < 1 or block_size & (block_size - 1)):
            raise ValueError(f"NeuZipStrategy(block_size={block_size}): must be a power of two or None")
        if checkpoint_format not in ("dense", "compressed"):
            raise ValueError(f"checkpoint_format must be 'dense' or 'compressed', got {checkpoint_format!r}")
        super().__init__(
            device=device,
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            cluster_environment=cluster_environment,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.grad_overlap = grad_overlap
        self.compress = compress
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.backend = backend
        self.weights = weights
        self.stochastic_rounding = stochastic_rounding
        self.seed, self.blocked_head = int(seed), blocked_head
        self.checkpoint_format: CheckpointFormat = checkpoint_format
        self.mantissa_bits = mantissa_bits
        self.block_size = block_size
        self._fused: FusedOptimizer | None = None
        self._stepping = False
        self._verified: tuple[int, _PATH] | None = None  # (id, file) of the checkpoint load_checkpoint verified

    @override
    def setup_environment(self) -> None:
        """Refuse ``trainer.fit`` with lossy weights (before the model is built), then set up as usual.

        Raises:
            ValueError: ``mantissa_bits`` is set and the trainer is fitting.
        """
        module = self.lightning_module
        trainer = module._trainer if module is not None else None
        if self.mantissa_bits is not None and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            raise ValueError(
                f"NeuZipStrategy(mantissa_bits={self.mantissa_bits}) keeps lossy, read-only weights for inference: "
                "trainer.fit is not supported. Use trainer.validate / test / predict, or mantissa_bits=None "
                "(lossless NeuZip) to train"
            )
        super().setup_environment()

    # -- model -----------------------------------------------------------------------------------------------

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """Build modules (``configure_model``, ``trainer.init_module()``) on the CPU when compressing.

        The dense model then never exists on the accelerator: :meth:`model_to_device` compresses it onto the
        device tensor by tensor.
        """
        with super().tensor_init_context(empty_init=empty_init):
            if self.compress and self.root_device.type != "cpu":
                with torch.device("cpu"):
                    yield
            else:
                yield

    @override
    def model_to_device(self) -> None:
        """Copy rank 0's weights to every process, compress them onto the device, then move the rest."""
        assert self.model is not None
        self.broadcast_module_(self.model)
        if self.compress:
            try:
                compress_model(
                    self.model,
                    include=self.include,
                    exclude=self.exclude,
                    weights=self.weights,
                    device=self.root_device,
                    backend=self.backend,
                    mantissa_bits=self.mantissa_bits,
                    block_size=self.block_size,
                )
            except ValueError as err:
                if self.mantissa_bits is None:
                    raise
                raise ValueError(
                    f"NeuZipStrategy(mantissa_bits={self.mantissa_bits}, block_size={self.block_size}): {err}"
                ) from err
        elif self.weights is not None:  # fill meta parameters, compress nothing
            compress_model(self.model, exclude=["*"], weights=self.weights, device=self.root_device)
        on_meta = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if on_meta:
            raise ValueError(
                f"tensors still on the meta device: {', '.join(on_meta[:5])}; give their values with "
                "NeuZipStrategy(weights=...) (parameters) or create buffers on a real device"
            )
        self.model.to(self.root_device)

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """True: weights are restored into the already compressed model (no dense copy of the whole model)."""
        return True

    # -- optimizer -------------------------------------------------------------------------------------------

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        """Build the fused optimizer from ``configure_optimizers`` and re-point the LR schedulers at it.

        Raises:
            ValueError: Manual optimization, several optimizers, an untranslatable optimizer or param groups,
                ``16-mixed`` precision, or ``gradient_clip_algorithm="value"``.
        """
        module = self.lightning_module
        assert module is not None
        check_supported(module, trainer, self.precision_plugin)
        self._release_fused()
        super().setup_optimizers(trainer)
        if len(self.optimizers) != 1:
            raise ValueError(
                f"NeuZipStrategy supports one optimizer, configure_optimizers returned {len(self.optimizers)}"
            )
        clip = float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None
        fused = to_fused(
            module,
            self.optimizers[0],
            max_grad_norm=clip,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            stochastic_rounding=self.stochastic_rounding,
            seed=self.seed,
            blocked_head=self.blocked_head,
            grad_reducer=self._grad_reducer(),
        )
        rebind_schedulers((config.scheduler for config in self.lr_scheduler_configs), fused)
        self._fused = fused
        self.optimizers = [fused]

    def _grad_reducer(self) -> Callable[[Tensor], Tensor] | None:
        """What the fused optimizer applies to each gradient: the all-reduce average with several processes."""
        return self.gradient_averager if self.is_distributed else None

    def _release_fused(self) -> None:
        if self._fused is not None:
            self._fused.remove_hooks()
            self._fused = None

    def _require_fused(self, optimizer: Optimizer | None) -> FusedOptimizer:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap a LightningOptimizer
        if self._fused is None or optimizer is not self._fused:
            raise RuntimeError(
                "NeuZipStrategy: backward and optimizer steps must go through the fused optimizer built at setup "
                "(manual optimization is not supported)"
            )
        return self._fused

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        """Backpropagate with the fused optimizer: parameters are updated (or accumulated) inside backward.

        Lightning decides which micro-batches step: the ones run from :meth:`optimizer_step` update, the others
        (``accumulate_grad_batches``) accumulate. That also covers an epoch that ends mid-accumulation.
        Lightning's ``on_before_backward``/``on_after_backward`` hooks run as usual.

        Raises:
            ValueError: Extra arguments for ``Tensor.backward`` were given.
        """
        if args or kwargs:
            raise ValueError("NeuZipStrategy.backward takes no extra arguments for Tensor.backward")
        fused = self._require_fused(optimizer)
        module = self.lightning_module
        assert module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        k = fused.accumulate_grad_batches
        fused.accumulate_grad_batches = fused.micro_step + (1 if self._stepping else 2)
        try:
            fused.backward(closure_loss)
        finally:
            fused.accumulate_grad_batches = k
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the closure (forward + fused backward, which updates the weights); Lightning's clipping is skipped.

        ``on_before_optimizer_step`` hooks still run, after the update. The fused optimizer's no-op ``step()`` is
        called so that LR schedulers see a step.
        """
        fused = self._require_fused(optimizer)
        self._stepping = True
        try:
            result = closure()
        finally:
            self._stepping = False
        module = self.lightning_module
        assert module is not None
        _call_callback_hooks(module.trainer, "on_before_optimizer_step", fused)
        _call_lightning_module_hook(module.trainer, "on_before_optimizer_step", fused)
        fused.step()
        return result

    # -- teardown --------------------------------------------------------------------------------------------

    @override
    def teardown(self) -> None:
        """Detach the fused hooks; keep compressed weights where they are.

        Lightning moves the module to the CPU here. A compressed parameter cannot change device without being
        decoded, so a module holding compressed weights on an accelerator stays there (as does one left on ``meta``
        by a failed setup); other modules are moved as usual.
        """
        self._release_fused()
        if not self._weights_stay():
            super().teardown()
            return
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()
        _optimizers_to_device(self.optimizers, torch.device("cpu"))
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    def _weights_stay(self) -> bool:
        """Whether teardown leaves the module where it is (compressed weights on an accelerator, or ``meta``)."""
        module = self.lightning_module
        return module is not None and any(
            p.is_meta or (is_compressed(p) and p.device.type != "cpu") for p in module.parameters()
        )

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``"neuzip"`` and ``"lomo"`` (``compress=False``) in ``strategy_registry`` (idempotent)."""
        if "neuzip" not in strategy_registry:
            strategy_registry.register("neuzip", cls, description="NeuZip: compressed weights, fused optimizer")
        if "lomo" not in strategy_registry:
            strategy_registry.register("lomo", cls, description="Fused in-backward optimizer (LOMO)", compress=False)


def register_strategies() -> None:
    """Register ``"neuzip"`` and ``"lomo"`` in Lightning's ``StrategyRegistry`` (called at import; idempotent)."""
    NeuZipStrategy.register_strategies(StrategyRegistry)


register_strategies()
