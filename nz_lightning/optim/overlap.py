"""Overlapping gradient reductions with updates: the next all-reduce runs while the previous weight is updated.

A fused optimizer with a synchronous ``grad_reducer`` (data parallelism: all-reduce, then divide) waits for each
gradient's all-reduce before updating the weight, so communication never overlaps the update (decode, rule,
re-encode) or the rest of backward. A reducer that can start a reduction and finish it later
(:class:`AsyncGradReducer`: ``start(grad)`` returns a handle, ``finish(handle)`` the reduced gradient) lets
:class:`InflightReductions` keep up to ``depth`` reductions in flight: each new gradient's reduction is started, then
the oldest ones beyond ``depth`` are finished and used, in arrival order. At the end of backward every reduction
still in flight is finished and used.

Results are the same bits as with the synchronous reducer: each gradient is reduced by the same collective, and each
update depends only on its own gradient, state and value. Memory: up to ``depth`` dense gradients wait in flight
(never a buffer for all of them). Collectives are started in the same order on every rank (backward's order).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["AsyncGradReducer", "InflightReductions", "is_async_reducer"]


@runtime_checkable
class AsyncGradReducer(Protocol):
    """A gradient reducer whose reduction can be started and finished apart.

    Attributes:
        depth: How many reductions may be in flight at once (0: finish each at once, as a synchronous reducer).
    """

    depth: int

    def __call__(self, grad: Tensor) -> Tensor:
        """Reduce ``grad`` now (same result as ``finish(start(grad))``)."""
        ...

    def start(self, grad: Tensor) -> Any:
        """Start reducing ``grad`` and return a handle for :meth:`finish`."""
        ...

    def finish(self, handle: Any) -> Tensor:
        """Wait for the reduction of ``handle`` and return the reduced gradient."""
        ...


def is_async_reducer(reducer: object) -> bool:
    """Whether ``reducer`` can overlap (an :class:`AsyncGradReducer` with ``depth >= 1``)."""
    return isinstance(reducer, AsyncGradReducer) and int(reducer.depth) >= 1


class InflightReductions:
    """Gradients whose reduction has started, finished and used in arrival order, at most ``depth`` in flight.

    Args:
        reducer: The asynchronous reducer.
        use: Called with ``(index, reduced gradient)`` for each finished reduction, in arrival order.
    """

    def __init__(self, reducer: AsyncGradReducer, use: Callable[[int, Tensor], None]) -> None:
        self.reducer = reducer
        self.depth = int(reducer.depth)
        self._use = use
        self._queue: deque[tuple[int, Any]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, index: int, grad: Tensor) -> None:
        """Start reducing parameter ``index``'s gradient; finish and use the oldest beyond ``depth``."""
        self._queue.append((index, self.reducer.start(grad)))
        while len(self._queue) > self.depth:
            self._finish_oldest()

    def drain(self) -> None:
        """Finish and use every reduction still in flight (end of backward)."""
        while self._queue:
            self._finish_oldest()

    def discard(self) -> None:
        """Wait for the reductions in flight without using them (after an error; their errors are not raised)."""
        while self._queue:
            _, handle = self._queue.popleft()
            try:
                self.reducer.finish(handle)
            except Exception:  # noqa: BLE001 - already failing: the first error is the one reported
                pass

    def _finish_oldest(self) -> None:
        index, handle = self._queue.popleft()
        self._use(index, self.reducer.finish(handle))
