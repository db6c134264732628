"""One rank of the FSDP2-sharded NeuZip tests (run by tests/distributed/test_fsdp.py through ``run_ranks``).

``python -m tests.distributed.worker_fsdp --out DIR --job JOB``; each rank writes ``DIR/rank{R}.json`` (and rank 0
``DIR/{mode}.pt``, dense full state dicts). Jobs:

* ``train``: for each rule and clipping setting, the same tiny bf16 model trained 3 steps with the fused update in
  backward as plain FSDP2 (``dense``), compressed shards with dense all-gather (``nz-dense``), with compressed
  all-gather (``nz-comp``) and with a capacity too small for any shard (``nz-overflow``: dense fallback). Records
  losses, the full state dict's checksum, the unsharded weights every rank computed with, and the bytes moved.
* ``state``: full state dict of a trained sharded model loaded (from rank 0) into a fresh sharded compressed model.
* ``errors``: bad input (non-divisible dims, lossy weights, AdaLomo, a changed capacity) and what it raises.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nz_lightning.distributed import (
    comm_stats,
    fsdp_tensor,
    full_state_dict,
    load_full_state_dict,
    load_shard_state_dict,
    refresh_gather_capacities,
    shard_bytes,
    shard_model,
    shard_state_dict,
    sharded_fused_optimizer,
)
from nz_lightning.distributed.fsdp import local_shard
from nz_lightning.distributed.fsdp_tensor import NZShard
from nz_lightning.distributed.process_group import leave_process_group
from nz_lightning.tensor.convert import compress_model
from tests.helpers.shard_models import MlpBlock, digest

VOCAB, DIM, HEAD = 64, 64, 10
MODES: dict[str, dict[str, Any]] = {
    "dense": {"compress": False},
    "nz-dense": {"compress": True, "compressed_gather": False},
    "nz-comp": {"compress": True, "compressed_gather": True},
    "nz-overflow": {"compress": True, "compressed_gather": True, "gather_headroom": -0.9},
    # the payload path GPUs take (packed where the blocks are, arrays decoded in place), run on the CPU: headers and
    # tables read back from the gathered buffer, or exchanged over the host group with each all-gather
    "nz-inplace": {"compress": True, "compressed_gather": True, "device_path": True, "gather_heads": "read"},
    "nz-inplace-overflow": {
        "compress": True,
        "compressed_gather": True,
        "gather_headroom": -0.9,
        "device_path": True,
        "gather_heads": "read",
    },
    "nz-exchange": {"compress": True, "compressed_gather": True, "device_path": True},
    "nz-exchange-overflow": {"compress": True, "compressed_gather": True, "gather_headroom": -0.9, "device_path": True},
    # shards encoded by the Triton kernels (interpreted here), as on a GPU: re-encoded blocks keep their word totals on
    # the device, so their payloads carry the bound-sized word buffers
    "nz-exchange-triton": {"compress": True, "compressed_gather": True, "device_path": True, "backend": "triton"},
    # every Linear its own unit, no backward prefetch, blocks recomputed in backward (activation checkpointing)
    "nz-weights": {"compress": True, "modules": "weights", "backward_prefetch": False, "checkpoint": True},
}


class TinyLM(nn.Module):
    """Embedding, two blocks (an ``nn.ModuleList``: sharded one by one), a head."""

    def __init__(self, head: int = HEAD) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([MlpBlock(DIM) for _ in range(2)])
        self.head = nn.Linear(DIM, head)
        self.checkpoint = False

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if self.checkpoint else layer(x)
        return F.cross_entropy(self.head(x).float().flatten(0, 1), labels.flatten())


def build(seed: int = 0, head: int = HEAD) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(head).to(torch.bfloat16)


def batch(step: int, rank: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, VOCAB, (4, 8), generator=gen)
    return ids, torch.randint(0, HEAD - 1, (4, 8), generator=gen)  # valid for the 9-wide head too


def capture_unsharded(model: nn.Module) -> Callable[[], dict[str, str]]:
    """Record, at each Linear's forward, a digest of the (unsharded) weight it computes with."""
    seen: dict[str, str] = {}

    def make(name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            w = module.weight
            assert isinstance(w, Tensor) and type(w) is nn.Parameter  # dense, unsharded while the module computes
            seen[name] = digest({"w": w.detach().clone()})

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(make(name))
    return lambda: dict(seen)


def train(mode: str, rule: str, clip: float | None, accumulate: int, steps: int = 3) -> dict[str, Any]:
    rank = dist.get_rank()
    options = dict(MODES[mode])
    recompute = options.pop("checkpoint", False)
    fsdp_tensor.DEVICE_PATH_ON_CPU = options.pop("device_path", False)
    model = shard_model(build(), **options)
    model.checkpoint = recompute
    seen = capture_unsharded(model)
    lr = {"sgd": 0.05, "adamw": 1e-2}[rule]
    options: dict[str, Any] = {"max_grad_norm": clip, "accumulate_grad_batches": accumulate}
    opt = sharded_fused_optimizer(model, rule, lr, stochastic_rounding=rule == "adamw", **options)
    losses = []
    for step in range(steps * accumulate):
        loss = model(*batch(step, rank))
        losses.append(float(loss.detach()))
        opt.backward(loss)
    stats = comm_stats(model)
    shards = [s for s in map(local_shard, model.parameters()) if isinstance(s, NZShard)]
    # blocks whose word totals are still on the device (the Triton encoder's bound-sized buffers): nothing on the
    # device payload path reads them back, so every gather after a re-encode shipped such buffers
    unsettled = sum(ct.streams is not None and ct.streams.used is not None for s in shards for ct in s.store._held)
    unsharded = seen()
    sd = full_state_dict(model)
    return {
        "losses": losses,
        "checksum": digest(sd) if rank == 0 else None,
        "unsharded": unsharded,
        "nz_locals": len(shards),
        "unsettled": unsettled,
        "head_slots": sorted({s.gather_spec.head_slot for s in shards if s.gather_spec.compressed}),
        "exchanged": sum(
            isinstance(s, NZShard) and s.gather_spec.exchange is not None for s in map(local_shard, model.parameters())
        ),
        "gather_bytes": stats.all_gather_bytes,
        "gather_dense_bytes": stats.all_gather_dense_bytes,
        "reduce_scatter_bytes": stats.reduce_scatter_bytes,
        "overflows": stats.overflows,
        "held": shard_bytes(model),
        "sd": sd,
    }


def job_train(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    # SGD (every mode, the overflow fallback too), AdamW with stochastic rounding and two-pass clipping, AdamW with
    # clipping over 2 accumulated micro-batches (each reduce-scattered)
    for rule, clip, accumulate, modes in (
        ("sgd", None, 1, list(MODES)),
        ("adamw", 0.5, 1, ["dense", "nz-dense", "nz-comp", "nz-inplace", "nz-exchange"]),
        ("adamw", 0.5, 2, ["dense", "nz-comp", "nz-exchange"]),
    ):
        for mode in modes:
            run = train(mode, rule, clip, accumulate)
            sd = run.pop("sd")
            if dist.get_rank() == 0 and (rule, accumulate, mode) == ("adamw", 1, "dense"):
                torch.save(sd, out / "reference.pt")
            result[f"{rule}-{accumulate}-{mode}"] = run
    return result


def job_state(out: Path) -> dict[str, Any]:
    rank = dist.get_rank()
    trained = shard_model(build(), compressed_gather=True)
    opt = sharded_fused_optimizer(trained, "adamw", 1e-2)
    for step in range(2):
        opt.backward(trained(*batch(step, rank)))
    sd = full_state_dict(trained)
    if rank == 0:
        torch.save(sd, out / "gathered.pt")
    fresh = shard_model(build(seed=1), compressed_gather=True)  # other values: all must be overwritten
    load_full_state_dict(fresh, sd, from_rank0=True)
    again = full_state_dict(fresh)
    ids, labels = batch(7, rank)
    with torch.no_grad():
        loss_trained, loss_fresh = float(trained(ids, labels)), float(fresh(ids, labels))
    resume = exact_resume(out)
    return {
        **resume,
        "checksum_gathered": digest(sd) if rank == 0 else None,
        "checksum_reloaded": digest(again) if rank == 0 else None,
        "keys": sorted(sd) if rank == 0 else None,
        "losses": [loss_trained, loss_fresh],
        "fresh_nz_locals": sum(isinstance(local_shard(p), NZShard) for p in fresh.parameters()),
    }


def exact_resume(out: Path) -> dict[str, Any]:
    """Save this rank's shards (compressed blobs) and optimizer state mid-run; resume into a fresh sharded model."""
    rank = dist.get_rank()
    options: dict[str, Any] = {"stochastic_rounding": True, "max_grad_norm": 0.5}
    model = build()
    shard_model(model)
    opt = sharded_fused_optimizer(model, "adamw", 1e-2, **options)
    for step in range(2):
        opt.backward(model(*batch(step, rank)))
    path = out / f"shards{rank}.pt"
    torch.save({"model": shard_state_dict(model), "optim": opt.state_dict()}, path)
    opt.backward(model(*batch(2, rank)))
    continued = full_state_dict(model)
    resumed = build(seed=2)
    shard_model(resumed)
    ropt = sharded_fused_optimizer(resumed, "adamw", 1e-2, **options)
    saved = torch.load(path, weights_only=True)
    load_shard_state_dict(resumed, saved["model"])
    ropt.load_state_dict(copy.deepcopy(saved["optim"]))
    ropt.backward(resumed(*batch(2, rank)))
    again = full_state_dict(resumed)
    return {
        "resume_continued": digest(continued) if rank == 0 else None,
        "resume_resumed": digest(again) if rank == 0 else None,
        "resume_overflows": comm_stats(resumed).overflows,
        "resume_compressed_blobs": len(saved["model"]["compressed"]),
    }


def expect(kind: type[BaseException], fn: Callable[[], Any]) -> str:
    try:
        fn()
    except kind as err:
        return str(err)
    raise AssertionError(f"expected {kind.__name__}")


def job_errors(out: Path) -> dict[str, Any]:
    rank = dist.get_rank()
    errors = {"odd_dim": expect(ValueError, lambda: shard_model(build(head=9)))}
    ok = build(head=9)
    shard_model(ok, exclude=["head.weight"])  # the fix the message names: keep it dense-sharded
    opt = sharded_fused_optimizer(ok, "sgd", 0.05)
    opt.backward(ok(*batch(0, rank)))
    errors["odd_dim_excluded_trains"] = str(type(local_shard(ok.head.weight)).__name__)
    lossy = compress_model(build(), mantissa_bits=3)
    errors["lossy"] = expect(ValueError, lambda: shard_model(lossy))
    errors["adalomo"] = expect(ValueError, lambda: sharded_fused_optimizer(shard_model(build()), "adalomo", 1e-2))
    errors["unsharded"] = expect(ValueError, lambda: sharded_fused_optimizer(build(), "sgd", 0.1))
    model = shard_model(build(), compressed_gather=True)
    refreshed = [refresh_gather_capacities(model)]  # before any all-gather: capacities may still be agreed again
    model(*batch(0, rank))  # first all-gather: FSDP sizes its output buffers from the payloads
    refreshed.append(refresh_gather_capacities(model))  # ... not after
    errors["refreshed"] = str(refreshed)
    shard = local_shard(model.get_parameter("layers.0.up.weight"))
    assert isinstance(shard, NZShard) and shard.gather_spec.compressed
    shard.gather_spec.capacity += 64  # every rank now packs a payload the allocated buffers do not match
    errors["capacity"] = expect(RuntimeError, lambda: model(*batch(1, rank)))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--job", choices=["train", "state", "errors"], required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        result = {"train": job_train, "state": job_state, "errors": job_errors}[args.job](args.out)
        (args.out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    finally:
        leave_process_group()


if __name__ == "__main__":
    main()
