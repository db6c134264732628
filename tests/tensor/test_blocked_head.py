"""Blocked head + loss: matches torch / HF's loss, NeuZip == LOMO bit for bit, close to the plain head, options."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

import nz_lightning.tensor.workspace as workspace
from nz_lightning.optim import causal_lm_loss, fused_optimizer, linear_ce, linear_cross_entropy
from nz_lightning.optim.blocked_embedding import BlockedEmbedding
from nz_lightning.optim.blocked_head import BlockedHead, DeferredLogits, _forward_fits
from nz_lightning.tensor.convert import compress_model
from nz_lightning.tensor.parameter import make_parameter
from tests.helpers.models import RULE_LR, assert_same_state, batches, build, llama, loss_of, train

BLOCK_BYTES = 3000  # several row blocks for the tiny models' 128 x 64 head and embedding


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", BLOCK_BYTES)


def _inputs(dtype: torch.dtype, n: int = 21, h: int = 16, v: int = 100) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(dtype)
    bias = (torch.randn(v, generator=gen) * 0.1).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::4] = -100
    return [hidden, weight, bias, targets]


def _torch_loss(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor, **kw: Any) -> torch.Tensor:
    num = kw.pop("num_items_in_batch", None)
    z = F.linear(h, w, b).float()
    loss = F.cross_entropy(z, t, reduction="mean" if num is None else "sum", **kw)
    return loss if num is None else loss / num


def _grads(fn: Any, tensors: list[torch.Tensor | None]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1}, {"num_items_in_batch": 7}, {"label_smoothing": 0.2, "chunk": 7}]
)
def test_matches_torch_cross_entropy(
    dtype: torch.dtype, bias: bool, options: dict[str, Any], small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several row blocks (and chunks within them), ignored targets, smoothing, HF's num_items normalisation."""
    options = dict(options)
    if options.pop("chunk", None):
        monkeypatch.setattr(linear_ce, "LOGITS_CHUNK_ELEMENTS", 21 * 7)  # 7 vocabulary rows per chunk
    hidden, weight, b, targets = _inputs(dtype)
    args: list[torch.Tensor | None] = [hidden, weight, b if bias else None]
    want, want_grads = _grads(lambda h, w, bb: _torch_loss(h, w, bb, targets, **options), args)
    got, got_grads = _grads(lambda h, w, bb: linear_cross_entropy(h, w, targets, bb, **options), args)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 1.6e-2}
    torch.testing.assert_close(got, want, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else tol))
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)


def test_compressed_weight_gives_the_same_bits(small_blocks: None) -> None:
    hidden, weight, _, targets = _inputs(torch.bfloat16)
    packed = make_parameter(weight)
    assert len(packed.store.bounds) > 1
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    dense = weight.clone().requires_grad_()
    a, b = linear_cross_entropy(h1, dense, targets), linear_cross_entropy(h2, packed, targets)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(h1.grad, h2.grad) and torch.equal(dense.grad, packed.grad)


@pytest.mark.parametrize("options", [{}, {"num_items_in_batch": torch.tensor(5)}, {"shift": True}])
def test_causal_lm_loss_matches_hf(options: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 6, 16, generator=gen), torch.randn(50, 16, generator=gen)
    labels = torch.randint(0, 50, (2, 6), generator=gen)
    labels[0, :2] = -100
    options = dict(options)
    if options.pop("shift", False):
        options["shift_labels"] = torch.roll(labels, -2, dims=1)
    want = ForCausalLMLoss(F.linear(hidden, weight), labels, 50, **options)
    torch.testing.assert_close(causal_lm_loss(hidden, weight, labels, **options), want, atol=1e-6, rtol=1e-6)


def test_bad_input_errors() -> None:
    hidden, weight, _, targets = _inputs(torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        linear_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, targets, label_smoothing=1.0)
    with pytest.raises(RuntimeError, match="out of bounds"):
        linear_cross_entropy(hidden, weight, targets.clamp(min=0) + 100)


class _SlicedHead(nn.Module):  # transformers 5.17's LlamaForCausalLM.forward, reduced to its head and loss
    def forward(self, hidden_states: Any, labels: Any = None, logits_to_keep: int = 0) -> Any:
        slice_indices = slice(-logits_to_keep, None)
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=8)
        return loss, logits


class _PlainHead(nn.Module):  # transformers 5.25's form
    def forward(self, hidden_states: Any, labels: Any = None) -> Any:
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=8)
        return loss, logits


class _CappedHead(nn.Module):  # post-processes the logits: the blocked head must not be used
    def forward(self, hidden_states: Any, labels: Any = None) -> Any:
        logits = self.lm_head(hidden_states[:, -1:, :])
        logits = torch.tanh(logits / 30.0) * 30.0
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=8)
        return loss, logits


@pytest.mark.parametrize(("cls", "fits"), [(_SlicedHead, True), (_PlainHead, True), (_CappedHead, False)])
def test_forward_fits_reads_both_transformers_forms(cls: type[nn.Module], fits: bool) -> None:
    assert _forward_fits(cls(), "lm_head") is fits


# -- on Hugging Face models ------------------------------------------------------------------------------------


def test_installed_on_hf_causal_lms_and_removed() -> None:
    model, ids = build("llama-tied-bf16"), batches(1)[0]
    with torch.no_grad():
        plain = loss_of(model, ids)
    opt = fused_optimizer(model, "sgd", lr=0.5)
    assert opt.blocked_modules == ["lm_head", "model.embed_tokens"]
    assert type(model.lm_head) is BlockedHead and type(model.model.embed_tokens) is BlockedEmbedding
    out = model(input_ids=ids, labels=ids)
    assert isinstance(out.logits, DeferredLogits) and "not computed" in repr(out.logits)
    with pytest.raises(RuntimeError, match="logits were not computed"):
        out.logits.float()
    torch.testing.assert_close(out.loss, plain, atol=1e-5, rtol=1e-5)
    assert model(input_ids=ids).logits.shape == (*ids.shape, 128)  # no labels: real logits
    with pytest.raises(RuntimeError, match="opt.backward"):
        out.loss.backward()
    opt.remove_hooks()
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert "_loss_function" not in model.__dict__ and not isinstance(
        model(input_ids=ids, labels=ids).logits, DeferredLogits
    )
    assert fused_optimizer(build("mlp-fp32"), "sgd", lr=0.5).blocked_modules == []  # not an HF causal LM
    assert fused_optimizer(build("gpt2-fp32"), "sgd", lr=0.5).blocked_modules == ["lm_head", "transformer.wte"]


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "momentum": ("sgd", {"momentum": 0.9, "weight_decay": 0.1, "nesterov": True}),
    "adamw": ("adamw", {}),
    "adalomo": ("adalomo", {"weight_decay": 0.01}),
    "clip": ("adamw", {"max_grad_norm": 0.5}),
    "adalomo-clip": ("adalomo", {"max_grad_norm": 0.5}),
    "accum": ("sgd", {"accumulate_grad_batches": 2}),
    "accum-adalomo": ("adalomo", {"accumulate_grad_batches": 2}),
    "accum-clip": ("adamw", {"accumulate_grad_batches": 2, "max_grad_norm": 0.5}),
    "sr": ("adamw", {"stochastic_rounding": True, "seed": 7}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["llama-bf16", "llama-tied-bf16"])
def test_neuzip_equals_lomo_bit_for_bit(kind: str, case: str, small_blocks: None) -> None:
    rule, options = CASES[case]
    dense, comp, data = build(kind), build(kind, compressed=True), batches(4)
    assert len(comp.lm_head.weight.store.bounds) > 1
    opts = [fused_optimizer(m, rule, lr=RULE_LR[rule], **options) for m in (dense, comp)]
    assert opts[0].blocked_modules == opts[1].blocked_modules == ["lm_head", "model.embed_tokens"]
    losses = [train(m, opt, data) for m, opt in zip((dense, comp), opts, strict=True)]
    assert losses[0] == losses[1]
    assert_same_state(dense, comp)
    assert [int(s["step"]) for s in opts[0].state.values()] == [int(s["step"]) for s in opts[1].state.values()]


@pytest.mark.parametrize("case", ["sgd", "adalomo-clip", "accum"])
@pytest.mark.parametrize("kind", ["llama-bf16", "llama-tied-bf16"])
def test_neuzip_equals_lomo_recomputing_logits(
    kind: str, case: str, small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logits recomputed in backward, several chunks per row block (the long-context path)."""
    monkeypatch.setattr(linear_ce, "LOGITS_CHUNK_ELEMENTS", 24 * 10)  # 24 tokens: 10 vocabulary rows per chunk
    test_neuzip_equals_lomo_bit_for_bit(kind, case, None)


def _fp32_llama(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    return llama(tied=tied).float()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("rule", "options"), [("sgd", {"momentum": 0.9}), ("adalomo", {}), ("sgd", {"clip": 0.1})])
def test_close_to_the_plain_head(tied: bool, rule: str, options: dict[str, Any], small_blocks: None) -> None:
    """fp32: three steps with the blocked head stay within 1e-5 of the plain head (sums differ only in order)."""
    options = dict(options)
    clip = options.pop("clip", None)
    blocked, plain, data = _fp32_llama(tied), _fp32_llama(tied), batches(3)
    kw = {"lr": 0.1, "max_grad_norm": clip, **options}
    a = train(blocked, fused_optimizer(blocked, rule, **kw), data)
    b = train(plain, fused_optimizer(plain, rule, blocked_head=False, **kw), data)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
    for (name, x), y in zip(blocked.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)


def test_tied_head_without_embedding_gradient(small_blocks: None) -> None:
    """With ``inputs_embeds`` the tied weight gets only the head's part: applied when backward ends."""
    models = [compress_model(_fp32_llama(True)), _fp32_llama(True)]
    opts = [fused_optimizer(models[0], "sgd", lr=0.1), fused_optimizer(models[1], "sgd", lr=0.1, blocked_head=False)]
    ids = batches(1)[0]
    for model, opt in zip(models, opts, strict=True):
        embeds = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(3))
        opt.backward(model(inputs_embeds=embeds, labels=ids).loss)
    torch.testing.assert_close(models[0].lm_head.weight.dense(), models[1].lm_head.weight.detach(), atol=1e-6, rtol=0)


def test_grad_reducer_sees_every_gradient(small_blocks: None) -> None:
    """Halving every gradient (blocks included) is halving the loss, bit for bit; blocks reach the reducer."""
    seen: list[tuple[int, ...]] = []

    def halve(g: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(g.shape))
        return g * 0.5

    reduced, scaled, data = build("llama-tied-bf16", True), build("llama-tied-bf16", True), batches(2)
    opt_r = fused_optimizer(reduced, "sgd", lr=0.5, grad_reducer=halve)
    opt_s = fused_optimizer(scaled, "sgd", lr=0.5)
    for ids in data:
        opt_r.backward(loss_of(reduced, ids))
        opt_s.backward(loss_of(scaled, ids) * 0.5)
    assert_same_state(reduced, scaled)
    head_blocks = [b - a for a, b in reduced.lm_head.weight.store.bounds]
    assert len(head_blocks) > 1 and {(r, 64) for r in head_blocks} <= set(seen)  # row blocks (23 rows)
    assert (64,) in seen  # whole (norm weight) gradients too
