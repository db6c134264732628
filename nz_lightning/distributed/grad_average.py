"""The data-parallel gradient reducer: all-reduce (sum) over the processes, then divide by their number.

:class:`GradientAverager` works as a plain ``grad_reducer`` of a fused optimizer (``averager(grad)``) and as an
asynchronous one (``start`` / ``finish``, :class:`~nz_lightning.optim.overlap.AsyncGradReducer`): with ``depth >= 1``
the optimizer starts each gradient's all-reduce and finishes it, and updates the weight, only after the next
gradient's has started, so communication overlaps the update and the rest of backward. Either way the result is
the same bits on every rank.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = ["GradientAverager"]


class GradientAverager:
    """Average gradients over a process group (all-reduce SUM, then divide by the group's size).

    Args:
        group: The process group (``None``: the default group).
        depth: Reductions a fused optimizer may keep in flight (0: each one finished before it returns).

    Attributes:
        bytes: Gradient bytes passed to all-reduce so far.
        calls: All-reduces started so far.
    """

    def __init__(self, group: Any = None, depth: int = 1) -> None:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.group = group
        self.depth = depth
        self.bytes = 0
        self.calls = 0

    def __call__(self, grad: Tensor) -> Tensor:
        """The mean of ``grad`` over the group (reduced in place when ``grad`` is contiguous).

        Raises:
            RuntimeError: The all-reduce failed (another process died or timed out); the message says which rank.
        """
        return self.finish(self.start(grad))

    def start(self, grad: Tensor) -> tuple[Tensor, Any]:
        """Start the all-reduce of ``grad`` and return the handle :meth:`finish` takes.

        Raises:
            RuntimeError: The all-reduce could not be started.
        """
        out = grad if grad.is_contiguous() else grad.contiguous()
        try:
            work = dist.all_reduce(out, group=self.group, async_op=True)
        except Exception as err:  # gloo / NCCL raise several types (DistBackendError, RuntimeError)
            raise self._failure(err) from err
        self.bytes += out.numel() * out.element_size()
        self.calls += 1
        return out, work

    def finish(self, handle: tuple[Tensor, Any]) -> Tensor:
        """Wait for the all-reduce started by :meth:`start` and return the mean.

        Raises:
            RuntimeError: The all-reduce failed (another process died or timed out).
        """
        out, work = handle
        try:
            work.wait()
        except Exception as err:
            raise self._failure(err) from err
        return out.div_(dist.get_world_size(self.group))

    def _failure(self, err: Exception) -> RuntimeError:
        rank, world = dist.get_rank(), dist.get_world_size(self.group)
        return RuntimeError(
            f"data parallel: the gradient all-reduce failed on rank {rank} of {world} ({err}). "
            "Another process has probably died or stopped answering; see its log"
        )
