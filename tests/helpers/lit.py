"""A tiny LightningModule, its data and a CPU Trainer, shared by the Lightning-layer tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from nz_lightning.optim import fused_optimizer

VOCAB, WIDTH, SEQ, BATCH = 64, 32, 8, 4


class Tiny(pl.LightningModule):
    """Embedding + Linear + LayerNorm + head; next-token cross-entropy. ``opt`` picks configure_optimizers."""

    def __init__(self, opt: str = "sgd", dtype: torch.dtype = torch.bfloat16, lazy: bool = False) -> None:
        super().__init__()
        self.opt = opt
        self.dtype_ = dtype
        if not lazy:
            self.configure_model()

    def configure_model(self) -> None:
        if hasattr(self, "head"):
            return
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.to(self.dtype_)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ln(F.gelu(self.fc(self.emb(x)))))

    def loss(self, batch: list[Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x).float().flatten(0, 1), y.flatten())

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.loss(batch)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def predict_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
        if self.opt == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.opt == "adalomo":
            return fused_optimizer(self, "adalomo", lr=1e-2)
        if self.opt == "rmsprop":
            return torch.optim.RMSprop(self.parameters(), lr=1e-2)
        if self.opt == "two-groups":
            decay = [self.emb.weight, self.fc.weight, self.head.weight]
            rest = [self.fc.bias, self.ln.weight, self.ln.bias, self.head.bias]
            return torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)
        raise AssertionError(self.opt)


class Manual(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def batches(n: int, seed: int = 1) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n * BATCH, SEQ), generator=gen)
    return [[x[i : i + BATCH], x[i : i + BATCH].roll(1, 1)] for i in range(0, n * BATCH, BATCH)]


def loader(n: int) -> DataLoader:
    data = batches(n)
    return DataLoader(TensorDataset(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])), BATCH)


def build(opt: str = "sgd", **kwargs: Any) -> Tiny:
    torch.manual_seed(0)
    return Tiny(opt, **kwargs)


def trainer(strategy: Any, max_steps: int = 4, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(logger=False, enable_checkpointing=False, enable_model_summary=False)
    options.update(kwargs)
    return pl.Trainer(strategy=strategy, accelerator="cpu", max_steps=max_steps, enable_progress_bar=False, **options)


def fit(strategy: Any, opt: str = "sgd", n_batches: int = 4, **kwargs: Any) -> Tiny:
    model = build(opt)
    trainer(strategy, **kwargs).fit(model, loader(n_batches))
    return model
