"""One rank of the row-split FSDP tests (run by tests/distributed/test_row_split.py through ``run_ranks``).

``python -m tests.distributed.worker_row_split --out DIR``; each rank writes ``DIR/rank{R}.json``. A tiny LM whose
embedding and head (1024 rows) are 4x larger than a block is trained 3 SGD steps as plain FSDP2 and as NeuZip-FSDP
(compressed gather), with the head and embedding split into row parts (``split_bytes="auto"``) and not
(``split_bytes=None``); then a split model loads the unsplit run's dense state dict.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nz_lightning.distributed import full_state_dict, load_full_state_dict, shard_model, sharded_fused_optimizer
from nz_lightning.distributed.process_group import leave_process_group
from nz_lightning.distributed.row_split import EmbeddingRows, RowSplitEmbedding, RowSplitLinear
from tests.helpers.shard_models import MlpBlock, digest

VOCAB, DIM = 1024, 32


class WideLM(nn.Module):
    """Embedding and head of 1024 x 32 (64 KiB in bf16), two blocks of ~17 KiB."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([MlpBlock(DIM) for _ in range(2)])
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return F.cross_entropy(self.head(x).float().flatten(0, 1), labels.flatten())


def build(seed: int = 0) -> WideLM:
    torch.manual_seed(seed)
    return WideLM().to(torch.bfloat16)


def batch(step: int, rank: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (2, 16), generator=gen), torch.randint(0, VOCAB, (2, 16), generator=gen)


def train(compress: bool, split: bool) -> tuple[dict[str, Any], dict[str, Tensor], nn.Module]:
    rank = dist.get_rank()
    model = shard_model(build(), compress=compress, split_bytes="auto" if split else None)
    widest: dict[str, int] = {}  # rows of the largest weight each Linear / Embedding computed with (unsharded)

    def record(module: nn.Module, args: Any) -> None:
        kind = "embedding" if isinstance(module, (nn.Embedding, EmbeddingRows)) else "linear"
        widest[kind] = max(widest.get(kind, 0), int(module.weight.shape[0]))

    for module in model.modules():
        if isinstance(module, (nn.Embedding, EmbeddingRows, nn.Linear)):
            module.register_forward_pre_hook(record)
    opt = sharded_fused_optimizer(model, "sgd", 0.5)
    losses = []
    for step in range(3):
        loss = model(*batch(step, rank))
        losses.append(float(loss.detach()))
        opt.backward(loss)
    sd = full_state_dict(model)
    head, emb = model.head, model.emb
    return (
        {
            "losses": losses,
            "checksum": digest(sd) if rank == 0 else None,
            "keys": list(sd) if rank == 0 else None,
            "head_parts": len(head.parts) if isinstance(head, RowSplitLinear) else 0,
            "emb_parts": len(emb.parts) if isinstance(emb, RowSplitEmbedding) else 0,
            "widest": widest,
        },
        sd,
        model,
    )


def embedding_gradient_error() -> float:
    """Largest difference between the FSDP2 gradient of the (split, not re-gathered in backward) embedding and the
    single-process gradient of the mean of both ranks' losses (fp32, plain autograd)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = build().float()
    model = shard_model(build().float(), compress=False, split_bytes="auto")
    assert isinstance(model.emb, RowSplitEmbedding)
    model(*batch(0, rank)).backward()
    grads = [p.grad.full_tensor() for p in model.emb.parameters()]  # type: ignore[union-attr]
    sum(reference(*batch(0, r)) for r in range(world)).backward()
    expected = reference.emb.weight.grad / world
    return float((torch.cat(grads) - expected).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        result: dict[str, Any] = {}
        for compress in (False, True):
            for split in (False, True):
                run, sd, model = train(compress, split)
                result[f"{'nz' if compress else 'dense'}-{'split' if split else 'whole'}"] = run
                if compress and not split:
                    unsplit_sd = sd
        fresh = shard_model(build(seed=1), split_bytes="auto")  # other values: every tensor must be overwritten
        load_full_state_dict(fresh, unsplit_sd, from_rank0=True)
        result["embedding_grad_error"] = embedding_gradient_error()
        reloaded = full_state_dict(fresh)  # a collective: every rank
        result["reloaded"] = digest(reloaded) if dist.get_rank() == 0 else None
        (args.out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    finally:
        leave_process_group()


if __name__ == "__main__":
    main()
