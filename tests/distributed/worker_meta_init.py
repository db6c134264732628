"""One rank of the ``NeuZipFSDPStrategy(meta_init=True)`` tests (tests/distributed/test_meta_init.py runs it).

``python -m tests.distributed.worker_meta_init --out DIR --job JOB [--pretrained DIR --files DIR]``; each rank writes
``DIR/rank{R}.json`` and rank 0 ``DIR/{run}.pt`` (the gathered dense state of each run after setup and after
training). Jobs:

* ``main`` (2 ranks): a tiny tied Llama trained 2 steps from the ``--pretrained`` directory built eagerly
  (``from_pretrained``, the existing path: ``eager``), built on meta and filled from its safetensors file
  (``meta_pretrained``), and built on meta from the config and filled from ``weights=`` (``meta_weights``, keys of the
  LightningModule); an untied one built on meta and initialized from the seed, twice (``seeded``, ``seeded_again``);
  then the errors of ``weights=`` files with a missing key and a wrong shape.
* ``seeded`` (any world size): ``seeded`` alone.

Every run records, in each call of the strategy's materializer, the parameters dense (neither meta nor sharded) in
the whole model before and after the call, and a digest of what the call produced.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from nz_lightning.distributed import full_state_dict
from nz_lightning.distributed.fsdp import Materializer
from nz_lightning.lightning.fsdp_strategy import NeuZipFSDPStrategy
from nz_lightning.lm.modules import CausalLMModule
from nz_lightning.tensor.convert import WeightReader
from tests.distributed.worker_dp import Record, Tokens, checksum
from tests.helpers.shard_models import digest

CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def dense_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters that are dense right now: neither on meta nor sharded (DTensor)."""
    return {
        n: p.detach() for n, p in module.named_parameters() if not isinstance(p, DTensor) and p.device.type != "meta"
    }


class Recording(NeuZipFSDPStrategy):
    """Records, around each materializer call, the dense parameters in the whole model and what the call made."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[dict[str, Any]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def model_to_device(self) -> None:
        super().model_to_device()
        assert self.lightning_module is not None
        state = full_state_dict(self.lightning_module, rank0_only=False)  # after setup, before training
        self.initial = dict(state)  # full_state_dict never aliases a live parameter (at 1 rank either)

    def materializer(self, name: str, root: nn.Module, reader: WeightReader | None) -> Materializer | None:
        inner = super().materializer(name, root, reader)

        def record(unit_name: str, unit: nn.Module) -> None:
            before = dense_params(root)
            if inner is not None:
                inner(unit_name, unit)
            after = dense_params(root)
            made = dense_params(unit)  # the unit's own parameters (those of units sharded before are DTensors)
            self.calls.append(
                {
                    "unit": f"{name}.{unit_name}".rstrip("."),
                    "before": len(before),
                    "after": len(after),
                    "unit_dense": len(made),
                    "digest": digest(made),
                }
            )

        return record


def run(
    out: Path, tag: str, world: int, rank: int, module_options: dict[str, Any], strategy_options: dict[str, Any]
) -> dict[str, Any]:
    """Fit 2 steps with ``Recording(**strategy_options)``; the gathered dense states go to ``out/{tag}.pt``."""
    torch.manual_seed(1234 + 17 * rank)  # a different global RNG state on every rank and in every run
    module = CausalLMModule(optimizer={"name": "sgd", "lr": 0.1}, dtype="float32", **module_options)
    strategy = Recording(timeout=timedelta(seconds=60), **strategy_options)
    record = Record(None)
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=world,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    tokens = Tokens(4 * 2)
    sampler: DistributedSampler[Any] | None = None
    if world > 1:
        sampler = DistributedSampler(tokens, world, rank, shuffle=False)
    trainer.fit(module, DataLoader(tokens, batch_size=4 // world, sampler=sampler))
    state = full_state_dict(module, rank0_only=False)
    if rank == 0:
        torch.save({"initial": strategy.initial, "final": state}, out / f"{tag}.pt")
    model: Any = module.model
    buffers = {n: b.detach().cpu() for n, b in model.named_buffers()}
    return {
        "losses": record.losses,
        "checksum": checksum(state),
        "initial_checksum": checksum(strategy.initial),
        "calls": strategy.calls,
        "buffers": digest(buffers),
        "eager_buffers": digest({n: b for n, b in eager_model(module_options).named_buffers()}),
    }


def eager_model(module_options: dict[str, Any]) -> nn.Module:
    """The same architecture built eagerly (random values: for its buffers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if "config" in module_options:
        config = CausalLMModule(config=module_options["config"]).build_hf_config()
    else:
        config = AutoConfig.from_pretrained(module_options["pretrained"])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def error_of(
    out: Path, tag: str, world: int, rank: int, module_options: dict[str, Any], strategy_options: dict[str, Any]
) -> str:
    try:
        run(out, tag, world, rank, module_options, strategy_options)
    except ValueError as err:
        return str(err)
    return "no error"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--job", choices=["main", "seeded"], required=True)
    parser.add_argument("--pretrained", type=Path, default=None)
    parser.add_argument("--files", type=Path, default=None, help="weights.safetensors, missing.*, shape.*")
    args = parser.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    seeded: tuple[dict[str, Any], dict[str, Any]] = ({"config": CONFIG}, {"meta_init": True, "seed": 5})
    result: dict[str, Any] = {"rank": rank, "world": world}
    if args.job == "seeded":
        result["seeded"] = run(out, "seeded", world, rank, *seeded)
    else:
        tied = {"config": {**CONFIG, "tie_word_embeddings": True}}
        pretrained = {"pretrained": str(args.pretrained)}
        result["eager"] = run(out, "eager", world, rank, pretrained, {})
        result["meta_pretrained"] = run(out, "meta_pretrained", world, rank, pretrained, {"meta_init": True})
        weights = {"meta_init": True, "weights": str(args.files / "weights.safetensors")}
        result["meta_weights"] = run(out, "meta_weights", world, rank, tied, weights)
        result["seeded"] = run(out, "seeded", world, rank, *seeded)
        result["seeded_again"] = run(out, "seeded_again", world, rank, *seeded)
        for bad in ("missing", "shape"):
            strategy = {"meta_init": True, "weights": str(args.files / f"{bad}.safetensors")}
            result[f"error_{bad}"] = error_of(out, bad, world, rank, tied, strategy)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
