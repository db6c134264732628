"""Fused in-backward optimizers: compressed == dense bit for bit, torch.optim parity, clipping, accumulation, LR, SR."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nz_lightning.lm.checkpointing import enable_activation_checkpointing
from nz_lightning.optim import AdaLomo, AdamW, fused_optimizer, stochastic_round_to_bf16
from nz_lightning.tensor.convert import compress_model
from nz_lightning.tensor.parameter import is_compressed
from tests.helpers.models import (
    MODELS,
    RULE_LR,
    assert_same_state,
    batches,
    build,
    check_resume,
    loss_of,
    snapshot,
    train,
)

# -- 1. compressed == uncompressed, bit for bit -------------------------------------------------------------


@pytest.mark.parametrize("rule", ["sgd", "adamw", "adalomo"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_compressed_training_bit_identical(kind: str, rule: str) -> None:
    dense, comp, data = build(kind), build(kind, compressed=True), batches(3)
    before = snapshot(dense)
    losses = [train(m, fused_optimizer(m, rule, lr=RULE_LR[rule]), data) for m in (dense, comp)]
    assert losses[0] == losses[1]
    assert_same_state(dense, comp)
    compressed = {n for n, p in comp.named_parameters() if is_compressed(p)}
    assert compressed and compressed == {n for n, p in comp.named_parameters() if p.dim() >= 2}
    after = comp.state_dict()
    for name in compressed:
        assert not torch.equal(after[name], before[name]), f"{name} did not change"
    assert all(p.grad is None for p in comp.parameters())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_bit_identical(use_reentrant: bool) -> None:
    models = [build("llama-tied-bf16"), build("llama-tied-bf16", compressed=True), build("llama-tied-bf16")]
    for model in models[:2]:
        enable_activation_checkpointing(model, use_reentrant=use_reentrant)
    data = batches(3)
    losses = [train(m, fused_optimizer(m, "adamw", lr=1e-2, max_grad_norm=1.0), data) for m in models]
    assert losses[0] == losses[1] == losses[2]  # checkpointed (dense, compressed) == not checkpointed
    assert_same_state(models[0], models[1])
    assert_same_state(models[0], models[2])


OPTION_CASES: dict[str, dict[str, Any]] = {
    "sr": {"stochastic_rounding": True, "seed": 7},
    "clip": {"max_grad_norm": 0.5},
    "accum-clip": {"accumulate_grad_batches": 2, "max_grad_norm": 0.5},
    "momentum": {"momentum": 0.9, "weight_decay": 0.1, "nesterov": True},
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_compressed_bit_identical_with_options(case: str) -> None:
    rule, options = ("sgd" if case == "momentum" else "adamw"), OPTION_CASES[case]
    dense, comp, data = build("llama-tied-bf16"), build("llama-tied-bf16", compressed=True), batches(4)
    losses = [train(m, fused_optimizer(m, rule, lr=RULE_LR[rule], **options), data) for m in (dense, comp)]
    assert losses[0] == losses[1]
    assert_same_state(dense, comp)


# -- 2. parity with torch.optim -------------------------------------------------------------------------------


def torch_train(
    model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor], clip: float | None = None
) -> list[float]:
    losses = []
    for ids in data:
        opt.zero_grad()
        loss = loss_of(model, ids)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return losses


SGD_CASES = [{}, {"momentum": 0.9, "weight_decay": 0.01}, {"momentum": 0.9, "nesterov": True}]


@pytest.mark.parametrize("kind", ["mlp-fp32", "llama-tied-bf16"])
@pytest.mark.parametrize("options", [*SGD_CASES, {"momentum": 0.5, "dampening": 0.3}])
def test_sgd_matches_torch_bit_for_bit(kind: str, options: dict[str, Any]) -> None:
    ref, fused, data = build(kind), build(kind), batches(3)
    expected = torch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.5, foreach=False, **options), data)
    opt = fused_optimizer(fused, "sgd", lr=0.5, blocked_head=False, **options)  # torch's plain head
    assert train(fused, opt, data) == expected
    assert_same_state(ref, fused)


def test_adamw_matches_torch() -> None:
    ref, fused, data = build("mlp-fp32"), build("mlp-fp32"), batches(4)
    kw = {"betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.05}
    expected = torch_train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False, **kw), data)  # type: ignore[arg-type]
    assert train(fused, fused_optimizer(fused, "adamw", lr=1e-2, **kw), data) == expected
    assert_same_state(ref, fused)  # the same single-tensor formula in fp32: bit-identical


def test_adamw_bf16_states_close() -> None:
    ref, fused, data = build("mlp-fp32"), build("mlp-fp32"), batches(3)
    torch_train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False), data)
    train(fused, opt := fused_optimizer(fused, "adamw", lr=1e-2, state_dtype=torch.bfloat16), data)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0, msg=name)


def test_adalomo_state_is_factored() -> None:
    model = build("llama-bf16", compressed=True)
    opt = fused_optimizer(model, "adalomo", lr=1e-2, weight_decay=0.01)
    train(model, opt, batches(2))
    for p in model.parameters():
        moments = [t for k, t in opt.state[p].items() if k != "step"]
        shapes = [p.shape[:-1], p.shape[-1:]] if p.dim() >= 2 else [p.shape]  # O(rows + cols) for matrices
        assert opt.state[p]["step"] == 2 and [t.shape for t in moments] == shapes
        assert all(t.dtype == torch.float32 for t in moments)


def test_adalomo_rule_reduces_quadratic() -> None:
    rule, start = AdaLomo(), torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    p, state = start, rule.init_state(start)
    for step in range(1, 51):
        p = rule.update(p, 2 * p, state, lr=0.1, step=step)  # gradient of ||p||^2; `start` is not mutated
    assert p.norm() < 0.5 * start.norm()


# -- 3./4. clipping and accumulation ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clipping_matches_torch(max_norm: float) -> None:
    ref, fused, data = build("mlp-fp32"), build("mlp-fp32"), batches(3)
    expected = torch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.5, foreach=False), data, clip=max_norm)
    assert train(fused, fused_optimizer(fused, "sgd", lr=0.5, max_grad_norm=max_norm), data) == expected
    assert_same_state(ref, fused)


# bf16 with buffers in the param dtype is torch's own .grad accumulation; with fp32 buffers it is more exact.
ACCUM_CASES = [("mlp-fp32", torch.float32, None), ("mlp-fp32", torch.float32, 0.05), ("mlp-bf16", None, None)]


@pytest.mark.parametrize(("kind", "accum_dtype", "clip"), [*ACCUM_CASES, ("mlp-bf16", torch.float32, None)])
def test_accumulation_sums_micro_batch_gradients(
    kind: str, accum_dtype: torch.dtype | None, clip: float | None
) -> None:
    ref, fused = build(kind), build(kind)
    data = batches(4, batch=4)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.5, foreach=False)
    for ids in data:
        sgd.zero_grad()
        for half in ids.chunk(2):
            (loss_of(ref, half) / 2).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        sgd.step()
    opt = fused_optimizer(fused, "sgd", lr=0.5, accumulate_grad_batches=2, max_grad_norm=clip, accum_dtype=accum_dtype)
    for ids in data:
        first, second = ids.chunk(2)
        before = snapshot(fused)
        opt.backward(loss_of(fused, first) / 2)
        assert opt.micro_step == 1 and all(torch.equal(v, before[k]) for k, v in fused.state_dict().items())
        opt.backward(loss_of(fused, second) / 2)
        assert opt.micro_step == 0 and not opt.state_dict()["fused"]["accum"]
    exact = accum_dtype is None or MODELS[kind][1] == accum_dtype
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values(), strict=True):
        if exact:  # same sums in the same dtype as torch's .grad accumulation: bit-identical
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, atol=1e-2, rtol=0, msg=name)


# -- 5. learning rate -----------------------------------------------------------------------------------------


def test_lr_property_and_scheduler() -> None:
    model = build("mlp-fp32")
    opt, before = fused_optimizer(model, "sgd", lr=0.5), snapshot(model)
    opt.lr = 0.0
    train(model, opt, batches(1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    ref, fused = build("mlp-fp32"), build("mlp-fp32")
    sgd = torch.optim.SGD(ref.parameters(), lr=0.5, foreach=False)
    opt = fused_optimizer(fused, "sgd", lr=0.5)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.3) for o in (sgd, opt)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        for ids in batches(3):
            torch_train(ref, sgd, [ids])
            train(fused, opt, [ids])
            opt.step()
            for sched in scheds:
                sched.step()
    assert opt.lr == pytest.approx(0.5 * 0.3**3) and opt.lr == sgd.param_groups[0]["lr"]
    assert_same_state(ref, fused)


# -- 6. stochastic rounding -------------------------------------------------------------------------------------


def test_stochastic_round_function() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16 (1 + 2**-7)
    r = stochastic_round_to_bf16(x, gen)
    assert r.dtype == torch.bfloat16 and set(r.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.float().mean().item() - x[0].item()) < 2e-5
    exact = torch.tensor([0.0, -0.0, 1.5, -3.0, 2.0**-130], dtype=torch.bfloat16).float()
    assert torch.equal(stochastic_round_to_bf16(exact, gen).float(), exact)
    special = stochastic_round_to_bf16(torch.tensor([float("nan"), float("inf"), -float("inf"), -1e-3]), gen)
    assert special[0].isnan() and special[1] == float("inf") and special[2] == -float("inf") and special[3] < 0


def _sr_model(compressed: bool) -> Any:
    torch.manual_seed(0)
    model = nn.Linear(256, 256, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return compress_model(model) if compressed else model


def _sr_step(options: dict[str, Any], compressed: bool = True, steps: int = 1) -> torch.Tensor:
    model = _sr_model(compressed)
    opt = fused_optimizer(model, "sgd", lr=1e-3, **options)
    for _ in range(steps):
        opt.backward(model.weight.float().sum())  # grad 1 everywhere: update 1e-3 < half a bf16 ulp at 1.0
    return model.weight.detach().float().clone()


def test_stochastic_rounding_unbiased_deterministic_nan() -> None:
    rtn = _sr_step({})
    assert torch.equal(rtn, torch.ones_like(rtn))  # round to nearest: the update vanishes
    sr = _sr_step({"stochastic_rounding": True, "seed": 3}, steps=2)
    assert abs(sr.mean().item() - (1 - 2e-3)) < 1e-4  # unbiased: the mean follows the exact update
    assert torch.equal(sr, _sr_step({"stochastic_rounding": True, "seed": 3}, steps=2))
    assert torch.equal(sr, _sr_step({"stochastic_rounding": True, "seed": 3}, compressed=False, steps=2))
    assert not torch.equal(sr, _sr_step({"stochastic_rounding": True, "seed": 4}, steps=2))
    model = _sr_model(compressed=True)
    opt = fused_optimizer(model, "adamw", lr=1e-3, stochastic_rounding=True)
    opt.backward(model.weight.float().sum() * float("nan"))
    assert model.weight.detach().isnan().all()  # NaN survives stochastic rounding


# -- 7. resume ----------------------------------------------------------------------------------------------------


RESUME_CASES: dict[str, dict[str, Any]] = {
    "adamw": {"stochastic_rounding": True, "max_grad_norm": 1.0},
    "adalomo": {"accumulate_grad_batches": 2},
}


@pytest.mark.parametrize("rule", [*RESUME_CASES, "sgd"])
def test_state_dict_round_trip(rule: str) -> None:
    check_resume(rule, RESUME_CASES.get(rule, {"momentum": 0.9}), 1e-2)  # accumulation: saved mid-update


# -- 8. errors ----------------------------------------------------------------------------------------------------


def test_bad_input_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("mlp-fp32", compressed=True)
    with pytest.raises(ValueError, match=r"'lion'.*sgd, adamw, adalomo"):
        fused_optimizer(model, "lion", lr=0.1)
    with pytest.raises(ValueError, match=r"betaz.*betas"):
        fused_optimizer(model, "adamw", lr=0.1, betaz=(0.9, 0.99))
    with pytest.raises(ValueError, match="momentum"):
        fused_optimizer(model, "adalomo", lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        fused_optimizer(model, "sgd", lr=0.1, accumulate_grad_batches=0)
    with pytest.raises(ValueError, match="state_dtype"):
        AdamW(state_dtype=torch.int8)

    opt = fused_optimizer(model, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="state_dict is for the 'sgd' rule"):
        fused_optimizer(build("mlp-fp32"), "adamw", lr=0.1).load_state_dict(copy.deepcopy(opt.state_dict()))
    with pytest.raises(ValueError, match=r"opt\.backward"):
        opt.step(lambda: 0.0)
    opt.step()
    opt.zero_grad()
    ids = batches(1)[0]
    with pytest.raises(RuntimeError, match=r"opt\.backward\(loss\)"):
        loss_of(model, ids).backward()
    opt.remove_hooks()
    loss_of(model, ids).backward()  # detached: plain gradients again
    assert model.fc1.weight.grad is not None

    lin = nn.Linear(4, 4)  # a weight used inside and outside a reentrant checkpoint gets two gradients
    guard = fused_optimizer(lin, "sgd", lr=0.1, max_grad_norm=1.0)  # caught in the norm pass, before any update
    with pytest.raises(RuntimeError, match="gradient twice"):
        guard.backward(lin(checkpoint(lin, torch.randn(2, 4, requires_grad=True), use_reentrant=True)).sum())

    store = model.fc1.weight.store
    monkeypatch.setattr(store, "mantissa_bits", 3)  # marks the store lossy
    with pytest.raises(ValueError, match="lossy compression cannot be trained"):
        fused_optimizer(model, "sgd", lr=0.1)
