"""Compressed modules: bit-identical forward/backward, ties, dense state_dict, meta streaming, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import nz_lightning as nz
from nz_lightning.tensor.parameter import NZParameter


class TinyLM(nn.Module):
    """Embedding, biased Linear, LayerNorm and a tied head: every parameter kind a transformer has."""

    def __init__(self, vocab: int = 40, dim: int = 24) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(2 * dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.out(torch.relu(self.proj(h)))
        return self.head(self.norm(h))


def _twins(dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = TinyLM().to(dtype)
    b = TinyLM().to(dtype)
    b.load_state_dict(a.state_dict())
    return a, nz.compress_model(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_backward_bit_identical(dtype: torch.dtype) -> None:
    dense, comp = _twins(dtype)
    idx = torch.randint(0, 40, (3, 9))
    outs, grads = [], []
    for m in (dense, comp):
        out = m(idx)
        out.float().square().mean().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert type(grads[1][n]) is torch.Tensor
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_what_gets_compressed_and_ties() -> None:
    _, comp = _twins(torch.bfloat16)
    names = {n for n, _ in nz.compressed_parameters(comp)}
    assert names == {"emb.weight", "proj.weight", "out.weight"}  # head.weight is emb.weight (tied)
    assert comp.head.weight is comp.emb.weight
    assert not nz.is_compressed(comp.proj.bias) and not nz.is_compressed(comp.norm.weight)
    comp2 = nz.compress_model(TinyLM(), exclude=["proj.*"], include=["norm.weight"])
    assert not nz.is_compressed(comp2.proj.weight) and nz.is_compressed(comp2.norm.weight)


@pytest.mark.parametrize("shape", [(24,), (5, 24), (2, 3, 24), (2, 2, 2, 24)])
def test_linear_any_input_rank(shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(24, 7).to(torch.bfloat16)
    ref = nn.Linear(24, 7).to(torch.bfloat16)
    ref.load_state_dict(lin.state_dict())
    nz.compress_model(lin)
    x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    lin(x).sum().backward()
    ref(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(lin.weight.grad, ref.weight.grad)


def test_hf_conv1d() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 8)
    ref = Conv1D(12, 8)
    ref.load_state_dict(conv.state_dict())
    nz.compress_model(conv)
    assert nz.is_compressed(conv.weight)
    x = torch.randn(2, 5, 8)
    assert torch.equal(conv(x), ref(x))
    assert transformers is not None


def test_dense_weight_not_saved_for_backward() -> None:
    _, comp = _twins(torch.bfloat16)
    weight_shapes = {tuple(p.shape) for _, p in nz.compressed_parameters(comp)}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        comp(torch.randint(0, 40, (2, 5))).sum().backward()
    dense_weights = [t for t in saved if not isinstance(t, NZParameter) and tuple(t.shape) in weight_shapes]
    assert not dense_weights
    assert any(isinstance(t, NZParameter) for t in saved)


def test_state_dict_is_dense_and_portable() -> None:
    dense, comp = _twins(torch.bfloat16)
    sd = comp.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values())
    assert sd.keys() == dense.state_dict().keys()
    plain = TinyLM().to(torch.bfloat16)
    plain.load_state_dict(sd)
    idx = torch.randint(0, 40, (2, 4))
    assert torch.equal(plain(idx), comp(idx))


def test_load_state_dict_compresses_and_decompress_restores() -> None:
    _, comp = _twins(torch.float32)
    new = {k: v * 2 for k, v in comp.state_dict().items()}
    comp.load_state_dict(new)
    assert nz.is_compressed(comp.proj.weight)
    assert all(torch.equal(v, new[k]) for k, v in comp.state_dict().items())
    nz.decompress_model(comp)
    assert not any(nz.is_compressed(p) for p in comp.parameters())
    assert comp.head.weight is comp.emb.weight
    assert torch.equal(comp.proj.weight, new["proj.weight"])


def test_inplace_ops_recompress() -> None:
    _, comp = _twins(torch.float32)
    with torch.no_grad():
        comp.proj.weight.mul_(0.5)
        comp.proj.weight[0].zero_()
    assert nz.is_compressed(comp.proj.weight)
    w = comp.proj.weight.dense()
    assert torch.equal(w[0], torch.zeros_like(w[0]))


@pytest.mark.parametrize("kind", ["dict", "file", "callable"])
def test_meta_model_streams_from_source(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = TinyLM().to(torch.bfloat16)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "head.weight"}
    source: object
    if kind == "dict":
        source = sd
    elif kind == "file":
        save_file(sd, str(tmp_path / "w.safetensors"))
        source = tmp_path / "w.safetensors"
    else:
        source = lambda name, shape, dtype: sd[name]  # noqa: E731
    with torch.device("meta"):
        meta = TinyLM().to(torch.bfloat16)
    nz.compress_model(meta, weights=source)  # type: ignore[arg-type]
    assert meta.head.weight is meta.emb.weight
    assert all(p.device.type == "cpu" for p in meta.parameters())
    idx = torch.randint(0, 40, (2, 4))
    assert torch.equal(meta(idx), ref(idx))


def test_meta_errors() -> None:
    with torch.device("meta"):
        meta = TinyLM()
    with pytest.raises(ValueError, match="no value"):
        nz.compress_model(meta, weights={})
    with torch.device("meta"):
        meta = TinyLM()
    bad = {k: torch.zeros(1) for k in TinyLM().state_dict()}
    with pytest.raises(ValueError, match="shape"):
        nz.compress_model(meta, weights=bad)


def test_compressed_bytes_are_smaller() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024, bias=False).to(torch.bfloat16)
    nn.init.normal_(lin.weight, std=0.02)
    nz.compress_model(lin)
    p = lin.weight
    assert isinstance(p, NZParameter)
    assert p.store.nbytes / (1024 * 1024 * 2) < 0.68


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    dense, comp = _twins(torch.bfloat16)
    idx = torch.randint(0, 40, (2, 6))
    grads = []
    for m in (dense, comp):
        h = m.emb(idx).detach().requires_grad_()
        out = checkpoint(lambda t, m=m: m.out(torch.relu(m.proj(t))), h, use_reentrant=reentrant)
        out.float().square().sum().backward()
        grads.append((h.grad, m.proj.weight.grad, m.out.weight.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_copying_ops_on_views_are_computed_not_aliased() -> None:
    _, comp = _twins(torch.float32)
    w = comp.proj.weight
    dense = w.dense()
    assert torch.equal(w.t().contiguous(), dense.t().contiguous())
    half = w.to(torch.float16)
    assert type(half) is torch.Tensor and half.dtype == torch.float16
    assert torch.equal(half, dense.to(torch.float16))
    assert torch.equal(w.t()[1:3].clone(), dense.t()[1:3])
