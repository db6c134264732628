"""One rank of a data-parallel or FSDP2 NeuZip / LOMO job on a tiny Llama (tests/distributed/test_*.py run it).

Each rank writes ``rank{R}.json`` (weight checksum, losses, steps) and ``rank{R}.pt`` (dense weights) into ``--out``.
The world comes from torchrun-style environment variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

try:
    import nz_lightning.kernels  # noqa: F401
except ModuleNotFoundError:  # a GPU machine running the checkout as it is (make test-gpu): map kernels/ as pip would
    from benchmarks.gpu_check_env import ensure_importable

    ensure_importable()
from nz_lightning.distributed import comm_stats, full_state_dict, local_shard  # noqa: E402
from nz_lightning.lightning.fsdp_strategy import NeuZipFSDPStrategy  # noqa: E402
from nz_lightning.lightning.strategy import NeuZipStrategy  # noqa: E402
from nz_lightning.lm.modules import CausalLMModule  # noqa: E402
from nz_lightning.tensor.parameter import is_compressed  # noqa: E402

VOCAB, SEQ = 96, 12
CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "adamw": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.01},
}


class Tokens(Dataset):  # type: ignore[type-arg]
    """``n`` fixed random sequences as HF causal-LM batches."""

    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Record(Callback):
    """Keeps the training losses; ``die_at``: this rank exits abruptly when that step starts."""

    def __init__(self, die_at: int | None) -> None:
        self.losses: list[float] = []
        self.die_at = die_at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.die_at is not None and trainer.global_step == self.die_at:
            os._exit(3)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))


def dense_weights(module: torch.nn.Module) -> dict[str, Tensor]:
    """Every parameter's value as a dense CPU tensor."""
    return {n: (p.dense() if is_compressed(p) else p.detach()).cpu().clone() for n, p in module.named_parameters()}


def checksum(weights: dict[str, Tensor]) -> str:
    """sha256 over every tensor's bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compress", type=int, default=1)
    parser.add_argument("--opt", default="sgd", choices=sorted(OPTIMIZERS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--ckpt", type=int, default=0, help="1: checkpoint at the end of every epoch")
    parser.add_argument("--steps-per-epoch", type=int, default=2)
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--die-rank", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--own-sampler", type=int, default=0, help="1: unshuffled sampler")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--fsdp", type=int, default=0, help="1: NeuZipFSDPStrategy (else NeuZipStrategy)")
    parser.add_argument("--gather", default="compressed", choices=["dense", "compressed"])
    parser.add_argument("--format", default="dense", choices=["dense", "compressed"])
    parser.add_argument("--grad-overlap", type=int, default=1, help="data parallel: all-reduces kept in flight")
    args = parser.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed + rank)  # different init per rank: the strategy must broadcast rank 0's weights
    module = CausalLMModule(config=dict(CONFIG), optimizer=dict(OPTIMIZERS[args.opt]), dtype=args.dtype)
    record = Record(args.die_at if rank == args.die_rank else None)
    callbacks: list[Callback] = [record]
    if args.ckpt:
        every = ModelCheckpoint(
            dirpath=args.out / "ckpt", filename="{epoch}", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
        )
        callbacks.append(every)
    options: dict[str, Any] = {"compress": bool(args.compress), "checkpoint_format": args.format}
    if args.fsdp:
        strategy: NeuZipStrategy = NeuZipFSDPStrategy(
            compressed_gather=args.gather == "compressed", timeout=timedelta(seconds=60), **options
        )
    else:
        strategy = NeuZipStrategy(timeout=timedelta(seconds=60), grad_overlap=args.grad_overlap, **options)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=world,
        max_steps=args.steps,
        gradient_clip_val=args.clip,
        accumulate_grad_batches=args.accum,
        logger=False,
        enable_checkpointing=bool(args.ckpt),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    tokens = Tokens(args.global_batch * args.steps_per_epoch * args.accum)
    # Lightning's DistributedSampler shuffles training data; the unshuffled one makes the union of the ranks' batches
    # equal to a single process's sequential batch
    sampler = DistributedSampler(tokens, world, rank, shuffle=False) if args.own_sampler and world > 1 else None
    data = DataLoader(tokens, batch_size=args.global_batch // world, sampler=sampler)
    trainer.fit(module, data, ckpt_path=args.resume)
    if args.fsdp:
        weights = full_state_dict(module, rank0_only=False)
        held = [local_shard(p) for p in module.model.model.layers.parameters() if p.dim() > 1]
        stats = comm_stats(module.model)
        comm = {"all_gather_bytes": stats.all_gather_bytes, "all_gather_dense_bytes": stats.all_gather_dense_bytes}
    else:
        weights, held, comm = dense_weights(module), list(module.model.model.layers.parameters()), {}
    assert all(is_compressed(p) for p in held if p.dim() > 1) == bool(args.compress)
    result = {"rank": rank, "world": world, "checksum": checksum(weights), "losses": record.losses, **comm}
    result["global_step"] = trainer.global_step
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.save(weights, args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
