"""``ReplicaStrategy``: the device and process-group base of :class:`~nz_lightning.NeuZipStrategy`.

One device per process. With ``Trainer(devices=1)`` it behaves as a single-device strategy: no process group, no
distributed sampler. With several devices or nodes every process holds a full replica of the model and the
strategy provides what data parallelism needs without wrapping the model in ``DistributedDataParallel`` (whose
reducer would keep a bucket for every gradient): Lightning's launchers, a process group (gloo on CPU, NCCL on CUDA),
ranks, collectives, the ``DistributedSampler``, and :meth:`ReplicaStrategy.average_gradient`, which the fused
optimizer applies to each gradient inside backward. Checkpoints are written atomically, by rank 0 only.
"""

from __future__ import annotations

import atexit
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.strategy import TBroadcast
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from typing_extensions import override

from nz_lightning.distributed.grad_average import GradientAverager
from nz_lightning.lightning.checkpoint_io import AtomicCheckpointIO
from nz_lightning.lightning.compat import (
    _DEVICE,
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _MultiProcessingLauncher,
    _SubprocessScriptLauncher,
    _sync_ddp_if_available,
    _WrappingCheckpointIO,
)

__all__ = ["ReplicaStrategy", "StartMethod"]

StartMethod = Literal["popen", "spawn", "fork"]


def join_process_group(environment: Any, backend: str, timeout: Any) -> None:
    """Join the default process group; when the interpreter exits, leave it cleanly
    (:func:`~nz_lightning.distributed.process_group.leave_process_group`)."""
    from nz_lightning.distributed.process_group import leave_process_group

    _init_dist_connection(environment, backend, timeout=timeout)
    global _LEAVE_REGISTERED
    if not _LEAVE_REGISTERED:
        atexit.register(leave_process_group)
        _LEAVE_REGISTERED = True


_LEAVE_REGISTERED = False


class ReplicaStrategy(ParallelStrategy):
    """One device per process, a full model replica in each; a single-device strategy when there is one process.

    Args:
        device: Force this device and a single process per node (default: the devices the Trainer's
            ``accelerator``/``devices`` select, one process each).
        accelerator: As for ``ParallelStrategy``.
        checkpoint_io: Checkpoint plugin (default: :class:`~nz_lightning.lightning.checkpoint_io.AtomicCheckpointIO`).
        precision_plugin: As for ``ParallelStrategy``.
        cluster_environment: As for ``DDPStrategy`` (default: the one Lightning detects).
        process_group_backend: ``"gloo"``, ``"nccl"``... (default: by device type).
        timeout: Timeout of every collective; a rank that stops answering fails the job after it.
        start_method: How Lightning starts the other processes: ``"popen"`` (re-runs the script, as ``ddp``),
            ``"spawn"`` or ``"fork"`` (as ``ddp_spawn`` / ``ddp_fork``).

    Raises:
        ValueError: Unknown ``start_method``.
    """

    def __init__(
        self,
        device: _DEVICE | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        if start_method not in ("popen", "spawn", "fork"):
            raise ValueError(f"start_method must be 'popen', 'spawn' or 'fork', got {start_method!r}")
        super().__init__(
            accelerator=accelerator,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._device = torch.device(device) if device is not None else None
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._start_method: StartMethod = start_method

    # -- devices and ranks -----------------------------------------------------------------------------------

    @property
    @override
    def parallel_devices(self) -> list[torch.device] | None:
        """The devices of this node, one per process (``[device]`` when one was forced)."""
        return [self._device] if self._device is not None else self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        self._parallel_devices = devices

    @property
    @override
    def root_device(self) -> torch.device:
        """This process's device."""
        devices = self.parallel_devices
        if not devices:
            return torch.device("cpu")
        return devices[self.local_rank] if len(devices) > 1 else devices[0]

    @property
    def num_nodes(self) -> int:
        """Number of nodes (set from ``Trainer(num_nodes=...)``)."""
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = int(num_nodes)

    @property
    def num_processes(self) -> int:
        """Processes per node: one per device."""
        return len(self.parallel_devices) if self.parallel_devices else 1

    @property
    def is_distributed(self) -> bool:
        """Whether there are several processes (Lightning then adds the ``DistributedSampler``)."""
        return self.num_nodes * self.num_processes > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """``num_replicas`` and ``rank`` of this process's ``DistributedSampler``."""
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    def set_world_ranks(self) -> None:
        """Tell the cluster environment (and ``rank_zero_only``) this process's global rank and the world size."""
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]

    @override
    def _configure_launcher(self) -> None:
        if not self.is_distributed:
            self._launcher = None
        elif self._start_method == "popen":
            assert self.cluster_environment is not None
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        """Set up the device and, with several processes, join the process group."""
        super().setup_environment()
        if self.is_distributed:
            reset_seed()
            self.set_world_ranks()
            assert self.cluster_environment is not None
            backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
            self._process_group_backend = backend
            join_process_group(self.cluster_environment, backend, self._timeout)

    # -- collectives -----------------------------------------------------------------------------------------

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """Wait for every process (no-op with one)."""
        if _distributed_is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        """Rank ``src``'s ``obj`` on every process."""
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean") -> Any:
        """Reduce a tensor over the processes (``"mean"`` by default); other values are returned as they are."""
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    grad_overlap: int = 1
    """Gradient all-reduces a fused optimizer keeps in flight while it updates (0: each one waited for at once).
    Set it before ``fit``; results are the same bits either way (:mod:`nz_lightning.optim.overlap`)."""

    @property
    def gradient_averager(self) -> GradientAverager:
        """The reducer the fused optimizer applies to every gradient with several processes (one per strategy)."""
        averager = getattr(self, "_averager", None)
        if averager is None or averager.depth != self.grad_overlap:
            averager = self._averager = GradientAverager(depth=self.grad_overlap)
        return averager

    def average_gradient(self, grad: Tensor) -> Tensor:
        """The mean of ``grad`` over all processes (all-reduce sum, then divide): identical bits on every rank.

        Raises:
            RuntimeError: The all-reduce failed (another process died or timed out); the message says which rank.
        """
        return self.gradient_averager(grad)

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every replica (one tensor at a time, through the device)."""
        if not _distributed_is_initialized():
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.is_meta:
                    continue
                buf = tensor.detach().to(self.root_device)
                dist.broadcast(buf, 0)
                if buf.data_ptr() != tensor.data_ptr():
                    tensor.copy_(buf)

    # -- checkpoints -----------------------------------------------------------------------------------------

    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        """The checkpoint plugin (an atomic-writing ``TorchCheckpointIO`` unless one was given)."""
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        elif isinstance(self._checkpoint_io, _WrappingCheckpointIO):
            self._checkpoint_io.checkpoint_io = AtomicCheckpointIO()  # only taken if it has none yet
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io
