"""Gradient reductions kept in flight while earlier weights are updated (``nz_lightning.optim.overlap``).

A fake asynchronous reducer (no process group) scales each gradient by 0.5 when it is finished, so the results must
equal those of the same scaling applied synchronously, bit for bit; the reducer records how many reductions were in
flight at once.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from nz_lightning.optim import fused_optimizer
from nz_lightning.optim.overlap import InflightReductions, is_async_reducer
from nz_lightning.tensor.reuse import REUSE
from tests.helpers.models import assert_same_state, batches, build, train


class HalvingReducer:
    """Asynchronous stand-in for an all-reduce average over two identical ranks: ``grad * 0.5`` when finished."""

    def __init__(self, depth: int, fail_at: int | None = None) -> None:
        self.depth = depth
        self.fail_at = fail_at
        self.open: list[int] = []
        self.most = 0
        self.started = 0
        self.finished: list[int] = []

    def __call__(self, grad: Tensor) -> Tensor:
        return self.finish(self.start(grad))

    def start(self, grad: Tensor) -> tuple[int, Tensor]:
        self.started += 1
        self.open.append(self.started)
        self.most = max(self.most, len(self.open))
        return self.started, grad

    def finish(self, handle: tuple[int, Tensor]) -> Tensor:
        ticket, grad = handle
        self.open.remove(ticket)
        self.finished.append(ticket)
        if ticket == self.fail_at:
            raise RuntimeError(f"reduction {ticket} failed")
        return grad.mul_(0.5)


def _train(kind: str, rule: str, lr: float, reducer: Any, **options: Any) -> tuple[list[float], torch.nn.Module]:
    model = build(kind, compressed=True)
    opt = fused_optimizer(model, rule, lr=lr, grad_reducer=reducer, **options)
    return train(model, opt, batches(3)), model


@pytest.mark.parametrize(
    ("kind", "rule", "lr", "options"),
    [
        ("llama-bf16", "sgd", 0.5, {}),
        ("llama-tied-bf16", "adamw", 1e-2, {"max_grad_norm": 1.0}),
        ("mlp-bf16", "adalomo", 1e-2, {"accumulate_grad_batches": 2}),
    ],
)
@pytest.mark.parametrize("depth", [1, 3])
def test_overlapped_reductions_give_the_same_bits(
    kind: str, rule: str, lr: float, options: dict[str, Any], depth: int
) -> None:
    sync_losses, sync_model = _train(kind, rule, lr, HalvingReducer(depth=0), **options)
    reducer = HalvingReducer(depth=depth)
    hits = REUSE.hits
    losses, model = _train(kind, rule, lr, reducer, **options)
    assert losses == sync_losses
    assert_same_state(model, sync_model)
    assert reducer.most == depth + 1  # the new one plus `depth` in flight, never more
    assert not reducer.open  # all drained (the blocked head's row blocks are reduced synchronously, in between)
    if kind.startswith("llama"):
        assert REUSE.hits > hits  # the held decodes outlive the reductions in flight
    assert REUSE.held == 0 and REUSE.capacity == 1


def test_synchronous_reducers_are_not_overlapped() -> None:
    assert not is_async_reducer(lambda g: g)
    assert not is_async_reducer(HalvingReducer(depth=0))
    assert is_async_reducer(HalvingReducer(depth=1))


def test_a_failed_reduction_is_raised_and_the_rest_waited_for() -> None:
    used: list[int] = []
    reducer = HalvingReducer(depth=2, fail_at=1)
    inflight = InflightReductions(reducer, lambda i, g: used.append(i))
    for i in range(2):
        inflight.push(i, torch.ones(2))
    with pytest.raises(RuntimeError, match="reduction 1 failed"):
        inflight.push(2, torch.ones(2))  # a third in flight: finishing the oldest fails
    assert used == []
    inflight.discard()
    assert not reducer.open and len(inflight) == 0


def test_backward_error_leaves_nothing_in_flight() -> None:
    model = build("llama-bf16", compressed=True)
    reducer = HalvingReducer(depth=2, fail_at=3)
    opt = fused_optimizer(model, "sgd", lr=0.5, grad_reducer=reducer)
    ids = batches(1)[0]
    with pytest.raises(RuntimeError, match="reduction 3 failed"):
        opt.backward(model(input_ids=ids, labels=ids).loss)
    assert not reducer.open and REUSE.held == 0 and REUSE.capacity == 1


def test_bad_overlap_options_are_refused() -> None:
    from nz_lightning import NeuZipStrategy
    from nz_lightning.distributed.grad_average import GradientAverager

    with pytest.raises(ValueError, match="grad_overlap"):
        NeuZipStrategy(grad_overlap=-1)
    with pytest.raises(ValueError, match="grad_overlap"):
        NeuZipStrategy(grad_overlap=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth"):
        GradientAverager(depth=-1)
    strategy = NeuZipStrategy(grad_overlap=2)
    assert strategy.gradient_averager.depth == 2 and strategy.gradient_averager is strategy.gradient_averager
    assert is_async_reducer(strategy.gradient_averager)
    assert not is_async_reducer(NeuZipStrategy(grad_overlap=0).gradient_averager)
