"""Blocked embedding backward: row blocks summed in torch's order (bit-identical on CPU), fused updates by blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nz_lightning.tensor.workspace as workspace
from nz_lightning.optim import fused_optimizer
from nz_lightning.optim.blocked_embedding import BlockedEmbedding, embedding_block_grad, install_blocked_embedding
from nz_lightning.tensor.convert import compress_model
from tests.helpers.models import VOCAB, assert_same_state, batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("padding_idx", "by_freq"), [(None, False), (5, False), (None, True), (40, True)])
def test_blocks_equal_torch_dense_backward(dtype: torch.dtype, padding_idx: int | None, by_freq: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(100, 24, generator=gen).to(dtype).requires_grad_()
    ids = torch.randint(0, 100, (7, 60), generator=gen)
    ids[0, :9] = 5  # repeated rows: their sums depend on the order
    ids[1, :9] = 40
    out = F.embedding(ids, weight, padding_idx, scale_grad_by_freq=by_freq)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(grad_out)
    flat = grad_out.reshape(-1, 24)
    for bounds in ([(0, 100)], [(0, 33), (33, 66), (66, 100)], [(k, k + 1) for k in range(100)]):
        blocks = [embedding_block_grad(flat, ids.reshape(-1), a, b, padding_idx, by_freq) for a, b in bounds]
        assert all(g.shape == (b - a, 24) for g, (a, b) in zip(blocks, bounds, strict=True))
        assert torch.equal(torch.cat(blocks), weight.grad), bounds


class EmbLM(nn.Module):
    """Embedding (with a padding row) + Linear, not a Hugging Face model: only the embedding is blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 64, padding_idx=0)
        self.out = nn.Linear(64, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.out(torch.tanh(self.emb(input_ids))).flatten(0, 1), labels.flatten())


@pytest.mark.parametrize("rule", ["sgd", "adamw", "adalomo"])
@pytest.mark.parametrize("compressed", [False, True])
def test_fused_training_bit_identical_to_dense_gradient(
    rule: str, compressed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", 3000)  # 128 x 64 fp32 embedding: 11 row blocks
    torch.manual_seed(0)
    plain = EmbLM()
    blocked = copy.deepcopy(plain)
    if compressed:
        plain, blocked = compress_model(plain), compress_model(blocked)
        assert len(blocked.emb.weight.store.bounds) > 1
    opts = [fused_optimizer(m, rule, lr=1e-2) for m in (plain, blocked)]
    assert install_blocked_embedding(blocked.emb, opts[1]) and type(blocked.emb) is BlockedEmbedding
    data = batches(3)
    data[0][0, :5] = 0  # padding rows get no gradient
    for ids in data:
        for model, opt in zip((plain, blocked), opts, strict=True):
            opt.backward(model(ids, ids))
    if rule == "adalomo":  # two sweeps: column sums and the update RMS are summed block by block (rounding only)
        for (name, a), b in zip(plain.state_dict().items(), blocked.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    else:  # elementwise rules: the same gradient bits, the same updates
        assert_same_state(plain, blocked)
    assert all(p.grad is None for p in blocked.parameters())
    with torch.no_grad():  # outside training it is a plain embedding
        assert torch.equal(blocked(data[0], data[0]), plain(data[0], data[0]))
