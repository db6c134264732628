"""One rank of ``benchmarks/distributed.py``: build one configuration, run a warm-up and measured steps, write JSON.

Run by the driver as ``python -m benchmarks.distributed_worker '<json config>'`` in ``world_size`` processes with a
torchrun-style environment (``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``RANK``). Each rank writes
``<out_dir>/<tag>.rank<r>.json``.

Methods (all fused SGD inside backward, plain LM head, activation checkpointing on; FSDP units (``units`` in the
config, the same for every FSDP method): ``layer`` = each decoder layer, the embedding and the LM head, the final norm
in the root; ``weight`` = those and, nested in each decoder layer (which keeps its norms), each of its seven linear
projections, so only one projection's dense weight is gathered at a time):

* ``dp-lomo`` / ``dp-neuzip``: a full dense / compressed replica per rank; at world size > 1 every gradient is
  all-reduced (SUM, then divided by the world size) by the fused optimizer's ``grad_reducer``, the
  ``GradientAverager`` ``NeuZipStrategy`` uses, with ``grad_overlap`` (config, default 1) all-reduces kept in flight
  while the previous weights are updated (0: each waited for in its hook).
* ``fsdp-dense``: FSDP2 on dense weights (``shard_model(compress=False)``) + ``sharded_fused_optimizer``.
* ``fsdp-nz-dgather`` / ``fsdp-nz-cgather``: NeuZip-FSDP (compressed shards) with dense / compressed all-gather.
* ``fsdp-nz-xgather`` (not in the default set): the compressed all-gather as GPUs run it, here on the CPU: payloads
  packed by ``pack_payload_on_device``, their heads exchanged over the gloo group with each all-gather
  (``gather_heads="exchange"``), decoded in place (``fsdp_tensor.DEVICE_PATH_ON_CPU``).

Weights: the trained byte-level Llama of ``benchmarks/codec_trained.py`` (``benchmarks/out/trained_bf16.safetensors``)
tiled into the benchmark's shapes: each tensor takes the values of the trained tensor of the same kind (q/k/v/o,
gate/up/down, norms, embedding, head) of layer ``i mod L``, flattened and repeated to the target size (the codec's
"tiled" convention in docs/BENCHMARKS.md). Without the file, ``N(0, 0.02)`` (``benchmarks.llama_model``), recorded
in the result.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import reset_peak_rss, rss_kib  # noqa: E402
from benchmarks.cpu_matmul import Bf16MatmulInFp32  # noqa: E402
from nz_lightning.distributed.collectives import ALL_GATHER_NAME, REDUCE_SCATTER_NAME  # noqa: E402

METHODS = ("dp-lomo", "dp-neuzip", "fsdp-dense", "fsdp-nz-dgather", "fsdp-nz-cgather", "fsdp-nz-xgather")
DEFAULT_METHODS = METHODS[:5]
"""What a run measures unless told otherwise (the device-path emulation is opt-in)."""
TRAINED = Path(__file__).resolve().parent / "out" / "trained_bf16.safetensors"
TINY = {"hidden": 64, "layers": 1, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 256}
_LAYER = re.compile(r"layers\.(\d+)\.")

WeightFn = Callable[[str, torch.Size, torch.dtype], torch.Tensor]


def trained_weights(path: Path = TRAINED) -> tuple[WeightFn, str]:
    """A ``compress_model`` weight source tiling the trained model's tensors into any Llama shape.

    Returns:
        The source and a description of it. Falls back to ``N(0, 0.02)`` when ``path`` does not exist.
    """
    from benchmarks.llama_model import random_weight

    if not path.exists():
        return random_weight(0), f"N(0, 0.02) random init ({path.name} not found)"
    from safetensors.torch import load_file

    trained = load_file(str(path))
    n_layers = 1 + max(int(m.group(1)) for k in trained if (m := _LAYER.search(k)))

    def make(name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        m = _LAYER.search(name)
        key = _LAYER.sub(f"layers.{int(m.group(1)) % n_layers}.", name) if m else name
        if key not in trained:
            raise KeyError(f"no trained tensor for {name!r} (looked for {key!r} in {path})")
        flat = trained[key].reshape(-1).to(dtype)
        numel = int(torch.Size(shape).numel())
        reps = -(-numel // flat.numel())
        return flat.repeat(reps)[:numel].reshape(shape).clone()

    desc = f"trained bf16 weights ({path.name}, {n_layers} layers) tiled to each tensor's shape"
    return make, desc


def build(method: str, dims: dict[str, int], weights: WeightFn) -> torch.nn.Module:
    """The Llama of ``dims`` with ``weights``: compressed for the NeuZip methods, dense otherwise, checkpointed."""
    from transformers import LlamaForCausalLM

    from benchmarks.llama_model import _materialize_meta_buffers, llama_config
    from nz_lightning import compress_model

    config = llama_config(**dims)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    compressed = method in ("dp-neuzip", "fsdp-nz-dgather", "fsdp-nz-cgather", "fsdp-nz-xgather")
    compress_model(model, weights=weights, exclude=None if compressed else ["*"])
    _materialize_meta_buffers(model, config)
    from nz_lightning.lm.checkpointing import enable_activation_checkpointing

    enable_activation_checkpointing(model)
    return model.train()


class WireCounter:
    """Counts the bytes of every FSDP2 all-gather (output) and reduce-scatter (input) by wrapping the
    ``torch.distributed`` functions FSDP2 calls (``all_gather_single`` / ``reduce_scatter_single``, or in torch
    before 2.13 ``all_gather_into_tensor`` / ``reduce_scatter_tensor``): all parameters, norm vectors included,
    whatever their format."""

    def __init__(self) -> None:
        self.all_gather_bytes = 0
        self.reduce_scatter_bytes = 0
        self._orig = (getattr(dist, ALL_GATHER_NAME), getattr(dist, REDUCE_SCATTER_NAME))

    def install(self) -> None:
        """Start counting."""
        gather, scatter = self._orig

        def counted_gather(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.all_gather_bytes += output.numel() * output.element_size()
            return gather(output, input, *args, **kwargs)

        def counted_scatter(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.reduce_scatter_bytes += input.numel() * input.element_size()
            return scatter(output, input, *args, **kwargs)

        setattr(dist, ALL_GATHER_NAME, counted_gather)
        setattr(dist, REDUCE_SCATTER_NAME, counted_scatter)

    def reset(self) -> None:
        """Zero the counters."""
        self.all_gather_bytes = self.reduce_scatter_bytes = 0


WIRE = WireCounter()


UNITS = ("layer", "weight")
_UNIT = {
    "layer": re.compile(r"model\.layers\.\d+|model\.embed_tokens|lm_head"),
    "weight": re.compile(
        r"model\.layers\.\d+(\.self_attn\.[qkvo]_proj|\.mlp\.(gate|up|down)_proj)?|model\.embed_tokens|lm_head"
    ),
}


def fsdp_units(units: str) -> Callable[[str, torch.nn.Module], bool]:
    """The ``shard_model(modules=...)`` predicate of a unit granularity (:data:`UNITS`).

    ``layer``: every decoder layer, the embedding and the LM head (each gathered only while it computes).
    ``weight``: those and every linear projection of a decoder layer on its own (nested units; the layer keeps its
    norms).

    Raises:
        ValueError: ``units`` is not one of :data:`UNITS`.
    """
    if units not in _UNIT:
        raise ValueError(f"unknown FSDP units {units!r}; choose one of {', '.join(UNITS)}")
    pattern = _UNIT[units]

    def select(name: str, module: torch.nn.Module) -> bool:
        return pattern.fullmatch(name) is not None

    return select


def make_step(
    model: torch.nn.Module,
    method: str,
    lr: float,
    units: str = "layer",
    backward_prefetch: bool = True,
    split_bytes: int | str | None = "auto",
    overlap: int = 1,
) -> tuple[Callable[[torch.Tensor], float], Any]:
    """Prepare ``model`` for ``method`` and return ``(step, counter)``; ``counter`` is the reducer or the model.

    ``units`` picks the FSDP units (:func:`fsdp_units`), ``backward_prefetch`` FSDP2's implicit backward prefetch and
    ``split_bytes`` the row-part cap of ``shard_model`` (all ignored by the data-parallel methods); ``overlap`` is the
    data-parallel methods' number of gradient all-reduces kept in flight (``GradientAverager(depth=...)``).
    """
    from nz_lightning import fused_optimizer
    from nz_lightning.distributed import shard_model, sharded_fused_optimizer
    from nz_lightning.distributed.grad_average import GradientAverager

    world = dist.get_world_size()
    counter: Any
    if method.startswith("dp-"):
        counter = GradientAverager(depth=overlap)  # what NeuZipStrategy uses, counting bytes reduced
        opt: Any = fused_optimizer(model, "sgd", lr, blocked_head=False, grad_reducer=counter if world > 1 else None)
    else:
        from nz_lightning.distributed import fsdp_tensor

        compress = method != "fsdp-dense"
        cgather = method in ("fsdp-nz-cgather", "fsdp-nz-xgather")
        fsdp_tensor.DEVICE_PATH_ON_CPU = method == "fsdp-nz-xgather"
        shard_model(
            model,
            compress=compress,
            compressed_gather=cgather,
            modules=fsdp_units(units),
            backward_prefetch=backward_prefetch,
            split_bytes=split_bytes,  # type: ignore[arg-type]
        )
        opt = sharded_fused_optimizer(model, "sgd", lr)
        counter = model

    def step(batch: torch.Tensor) -> float:
        loss = model(input_ids=batch, labels=batch).loss
        opt.backward(loss)
        opt.step()
        return float(loss.detach())

    return step, counter


def _comm(method: str, counter: Any) -> dict[str, int]:
    from nz_lightning.distributed import comm_stats

    if method.startswith("dp-"):
        return {"all_reduce_bytes": counter.bytes, "all_reduces": counter.calls}
    s = comm_stats(counter)
    return {
        "wire_all_gather_bytes": WIRE.all_gather_bytes,
        "wire_reduce_scatter_bytes": WIRE.reduce_scatter_bytes,
        "all_gather_bytes": s.all_gather_bytes,
        "all_gather_dense_bytes": s.all_gather_dense_bytes,
        "reduce_scatter_bytes": s.reduce_scatter_bytes,
        "all_gathers": s.all_gathers,
        "overflows": s.overflows,
    }


def _reset_comm(method: str, counter: Any) -> None:
    from nz_lightning.distributed import comm_stats

    if method.startswith("dp-"):
        counter.bytes = counter.calls = 0
    else:
        comm_stats(counter).reset()
    WIRE.reset()


def _fsdp_modules(model: torch.nn.Module) -> list[str]:
    """The names of the modules ``fully_shard`` made FSDP units (the root is ``""``); empty for data parallel."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def _held_bytes(method: str, model: torch.nn.Module) -> dict[str, int]:
    from nz_lightning.distributed import shard_bytes
    from nz_lightning.tensor.sizes import weight_sizes

    if method.startswith("dp-"):
        s = weight_sizes(model)
        return {"held": s.held_bytes, "dense_equivalent": s.dense_bytes}
    b = shard_bytes(model)
    return {"held": b["total"], "dense_equivalent": b["dense_equivalent"]}


def prime_codec(path: Path = TRAINED) -> None:
    """Encode and decode one full-size trained weight (up_proj of the wide model) at several table sizes.

    Large trained weights take codec paths the tiny warm-up model never does (e.g. the scalar decoder, for tables
    of more than 2^12 slots or more than 256 present symbols). numba compiles each on first use and caches
    it on disk; compiled inside a measured process, LLVM's memory inflated that process's peak by 20-45 MiB. Run
    once, in its own process, before the measured jobs (``python -m benchmarks.distributed_worker --prime``), it
    leaves every later job loading machine code from the cache.
    """
    from nz_lightning.kernels import compress

    weights, _ = trained_weights(path)
    value = weights("model.layers.0.mlp.up_proj.weight", torch.Size([2816, 1024]), torch.bfloat16)
    for prob_bits in (8, 11, 13, 15):  # scalar and vectorized encoders and decoders (chosen by table size and span)
        for rows in (2816, 704):  # a whole weight, a row part
            compress(value[:rows].contiguous(), prob_bits=prob_bits).decompress()


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration on this rank (process group already initialized) and return its measurements."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(cfg["threads"])
    gemm = contextlib.nullcontext() if cfg["native_bf16_gemm"] else Bf16MatmulInFp32()
    weights, source = trained_weights() if cfg["trained"] else trained_weights(Path("/nonexistent"))
    method, lr, units = cfg["method"], cfg["lr"], cfg.get("units", "layer")
    prefetch = bool(cfg.get("backward_prefetch", True))
    split = cfg.get("split_bytes", "auto")
    overlap = int(cfg.get("grad_overlap", 1))
    if cfg.get("reuse_capacity") is not None:
        from nz_lightning.tensor.reuse import REUSE

        REUSE.capacity = int(cfg["reuse_capacity"])
    with gemm:  # fixed costs: imports, numba JIT, process group, FSDP/codec initialisation, on a tiny model
        warm = build(method, TINY, weights)
        warm_step, _ = make_step(warm, method, lr, units, prefetch, split, overlap)
        warm_step(torch.randint(0, TINY["vocab"], (1, 16)))
    del warm, warm_step
    gc.collect()
    dist.barrier()
    base_kib = rss_kib()
    dims = {k: cfg[k] for k in TINY}
    t0 = time.perf_counter()
    model = build(method, dims, weights)
    params = sum(p.numel() for p in model.parameters())
    step, counter = make_step(model, method, lr, units, prefetch, split, overlap)
    setup_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own micro-batch; same on every method
    n = cfg["steps"] + 1
    batches = [torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen) for _ in range(n)]
    losses, times = [], []
    with gemm:
        losses.append(step(batches[0]))  # warm-up: pooled buffers, FSDP buffers, capacities frozen
        gc.collect()
        dist.barrier()
        settled_kib = rss_kib()
        _reset_comm(method, counter)
        reset_peak_rss()
        for batch in batches[1:]:
            dist.barrier()
            t0 = time.perf_counter()
            losses.append(step(batch))
            times.append(time.perf_counter() - t0)
        peak_kib = rss_kib("VmHWM")
    comm = {k: v // cfg["steps"] for k, v in _comm(method, counter).items()}  # per step
    return {
        **cfg,
        "rank": rank,
        "world_size": world,
        "weights_source": source,
        "params": params,
        "losses": losses,
        "step_times_s": times,
        "step_s": sum(times) / len(times),
        "setup_s": setup_s,
        "baseline_mib": base_kib / 1024,
        "settled_mib": settled_kib / 1024,
        "peak_mib": peak_kib / 1024,
        "peak_over_baseline_mib": (peak_kib - base_kib) / 1024,
        "weights_bytes": _held_bytes(method, model),
        "fsdp_modules": _fsdp_modules(model),
        "comm_per_step": comm,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of one rank: ``python -m benchmarks.distributed_worker '<json config>'``."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--prime"]:
        prime_codec()
        return
    if len(args) != 1:
        raise SystemExit("usage: python -m benchmarks.distributed_worker '<json config>' | --prime")
    cfg = json.loads(args[0])
    if cfg.get("method") not in METHODS:
        raise SystemExit(f"unknown method {cfg.get('method')!r}; choose one of {', '.join(METHODS)}")
    if cfg.get("units", "layer") not in UNITS:
        raise SystemExit(f"unknown FSDP units {cfg.get('units')!r}; choose one of {', '.join(UNITS)}")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise SystemExit(f"{var} is not set: run this through benchmarks/distributed.py")
    dist.init_process_group("gloo")
    WIRE.install()
    try:
        result = run(cfg)
        out = Path(cfg["out_dir"]) / f"{cfg['tag']}.rank{dist.get_rank()}.json"
        out.write_text(json.dumps(result, indent=1))
        dist.barrier()
    finally:
        from nz_lightning.distributed.process_group import leave_process_group

        leave_process_group()


if __name__ == "__main__":
    main()
