"""NeuZipStrategy: Lightning training on compressed weights == LOMO == the fused optimizer by hand; resume, errors."""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor, nn

from nz_lightning.lightning.callbacks import NeuZipStats
from nz_lightning.lightning.checkpoint_io import AtomicCheckpointIO
from nz_lightning.lightning.fsdp_strategy import NeuZipFSDPStrategy
from nz_lightning.lightning.strategy import NeuZipStrategy, register_strategies
from nz_lightning.optim import FusedOptimizer, fused_optimizer
from nz_lightning.tensor.convert import compress_model, compressed_parameters
from nz_lightning.tensor.parameter import is_compressed
from nz_lightning.tensor.sizes import weight_sizes
from tests.helpers.lit import BATCH, SEQ, VOCAB, WIDTH, Manual, Tiny, batches, build, fit, loader, trainer

pytestmark = pytest.mark.usefixtures("quiet_lightning")


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def manual(
    name: str,
    lr: float,
    steps: list[list[Tensor]],
    scale: float = 1.0,
    sched: Callable[[Any], Any] | None = None,
    **o: Any,
) -> dict[str, Tensor]:
    """The same training with nz.compress_model + nz.fused_optimizer driven by hand."""
    model = compress_model(build())
    opt = fused_optimizer(model, name, lr=lr, **o)
    scheduler = sched(opt) if sched is not None else None
    for batch in steps:
        loss = model.loss(batch)
        opt.backward(loss / scale if scale != 1.0 else loss)
        if opt.micro_step == 0 and scheduler is not None:
            opt.step()
            scheduler.step()
    return weights(model)


def step_lr(opt: Any) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


MANUAL: dict[str, Callable[[list[list[Tensor]]], dict[str, Tensor]]] = {
    "sgd": lambda b: manual("sgd", 0.5, b, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda b: manual("adamw", 1e-2, b, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05, sched=step_lr),
    "adalomo": lambda b: manual("adalomo", 1e-2, b),
}


def test_registered() -> None:
    register_strategies()  # idempotent
    assert {"neuzip", "lomo"} <= set(StrategyRegistry.available_strategies())
    assert StrategyRegistry["lomo"]["init_params"] == {"compress": False}


@pytest.mark.parametrize("opt", ["sgd", "adamw", "adalomo"])
def test_neuzip_equals_lomo_and_manual(opt: str) -> None:
    nz = fit("neuzip", opt)
    assert is_compressed(nz.fc.weight) and not is_compressed(nz.fc.bias)
    assert isinstance(nz.trainer.optimizers[0], FusedOptimizer) and nz.trainer.global_step == 4
    lomo = fit("lomo", opt)
    assert not is_compressed(lomo.fc.weight)
    assert_same(weights(nz), weights(lomo))
    assert_same(weights(nz), MANUAL[opt](batches(4)))
    if opt == "adamw":  # the StepLR scheduler drove the fused optimizer's lr: 1e-2 -> 5e-3 -> 2.5e-3
        assert nz.trainer.optimizers[0].lr == pytest.approx(2.5e-3)
        assert nz.trainer.lr_scheduler_configs[0].scheduler.optimizer is nz.trainer.optimizers[0]
    assert any(not torch.equal(a, b) for a, b in zip(weights(nz).values(), weights(build(opt)).values(), strict=True))


@pytest.mark.parametrize(
    ("clip", "accum", "name", "options"),
    [(0.05, 1, "clip", {"max_grad_norm": 0.05}), (None, 2, "accum", {}), (0.05, 2, "both", {"max_grad_norm": 0.05})],
)
def test_clip_and_accumulation_match_fused(clip: float | None, accum: int, name: str, options: dict[str, Any]) -> None:
    nz = fit("neuzip", n_batches=4, max_steps=4 // accum, gradient_clip_val=clip, accumulate_grad_batches=accum)
    expected = manual(
        "sgd", 0.5, batches(4), scale=accum, momentum=0.9, weight_decay=1e-3, accumulate_grad_batches=accum, **options
    )
    assert_same(weights(nz), expected)
    assert nz.trainer.global_step == 4 // accum


def test_epoch_end_flushes_partial_accumulation() -> None:
    nz = build()
    trainer("neuzip", max_steps=-1, max_epochs=1, accumulate_grad_batches=2).fit(nz, loader(3))
    assert nz.trainer.global_step == 2 and nz.trainer.optimizers[0].micro_step == 0
    model = compress_model(build())
    opt = fused_optimizer(model, "sgd", lr=0.5, momentum=0.9, weight_decay=1e-3, accumulate_grad_batches=2)
    data = batches(3)
    for batch in data[:2]:
        opt.backward(model.loss(batch) / 2)
    opt.accumulate_grad_batches = 1  # Lightning steps on the epoch's last batch
    opt.backward(model.loss(data[2]) / 2)
    assert_same(weights(nz), weights(model))


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_resume_is_bit_identical(tmp_path: Any, fmt: str) -> None:
    def strategy() -> NeuZipStrategy:
        return NeuZipStrategy(stochastic_rounding=True, seed=3, checkpoint_format=fmt)

    every3 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    full = build("adamw")
    trainer(strategy(), max_steps=6, enable_checkpointing=True, callbacks=[every3]).fit(full, loader(3))
    (ckpt,) = glob.glob(os.path.join(tmp_path, "*step=3.ckpt"))
    raw = torch.load(ckpt, weights_only=True)
    assert raw["nz_lightning"]["checkpoint_format"] == fmt
    assert (raw["state_dict"]["fc.weight"].dtype == torch.uint8) == (fmt == "compressed")
    assert "fused" in raw["optimizer_states"][0]

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = Tiny("adamw")
    trainer(strategy(), max_steps=6).fit(resumed, loader(3), ckpt_path=ckpt)
    assert resumed.trainer.global_step == 6 and is_compressed(resumed.fc.weight)
    assert_same(weights(resumed), weights(full))
    assert resumed.trainer.optimizers[0].lr == full.trainer.optimizers[0].lr
    for i, state in full.trainer.optimizers[0].state_dict()["state"].items():
        again = resumed.trainer.optimizers[0].state_dict()["state"][i]
        assert state["step"] == again["step"] == 6
        assert all(torch.equal(state[k], again[k]) for k in ("exp_avg", "exp_avg_sq"))
    if fmt == "compressed":  # the LOMO baseline reads the compressed checkpoint too, and continues identically
        lomo = Tiny("adamw")
        trainer(NeuZipStrategy(compress=False, stochastic_rounding=True, seed=3), max_steps=6).fit(
            lomo, loader(3), ckpt_path=ckpt
        )
        assert not is_compressed(lomo.fc.weight)
        assert_same(weights(lomo), weights(full))


class _RunsCode:
    """Unpickling this touches a marker file: stands for any code a hostile checkpoint could run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (open, (self.marker, "w"))


def test_resume_refuses_pickled_objects(tmp_path: Any) -> None:
    """``fit(ckpt_path=...)`` under the strategy reads with weights_only=True: a hostile checkpoint runs nothing."""
    marker = os.path.join(tmp_path, "code-ran")
    hostile = os.path.join(tmp_path, "hostile.ckpt")
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, hostile)
    with pytest.raises(ValueError, match=r"refusing to load .*hostile\.ckpt.*weights_only=True"):
        trainer(NeuZipStrategy(), max_steps=1).fit(build(), loader(1), ckpt_path=hostile)
    assert not os.path.exists(marker)
    empty = os.path.join(tmp_path, "empty.ckpt")
    open(empty, "wb").close()
    with pytest.raises(ValueError, match=r"empty\.ckpt is not a readable checkpoint file"):
        trainer(NeuZipStrategy(), max_steps=1).fit(build(), loader(1), ckpt_path=empty)


def test_dense_checkpoint_loads_without_nz_lightning(tmp_path: Any) -> None:
    model = fit("neuzip", max_steps=2)
    path = os.path.join(tmp_path, "model.ckpt")
    model.trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert all(type(v) is Tensor for v in state.values())
    plain = nn.ModuleDict({"emb": nn.Embedding(VOCAB, WIDTH), "fc": nn.Linear(WIDTH, WIDTH)})
    plain.update({"ln": nn.LayerNorm(WIDTH), "head": nn.Linear(WIDTH, VOCAB)})
    plain.to(torch.bfloat16).load_state_dict(state)
    assert_same(weights(plain), weights(model))
    compact = os.path.join(tmp_path, "compact.ckpt")
    strategy = model.trainer.strategy
    assert isinstance(strategy, NeuZipStrategy)
    strategy.checkpoint_format = "compressed"
    model.trainer.save_checkpoint(compact)
    assert torch.load(compact, weights_only=True)["state_dict"]["head.weight"].dtype == torch.uint8


def test_atomic_checkpoint_write(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fit("neuzip", max_steps=1)
    path = os.path.join(tmp_path, "last.ckpt")
    assert isinstance(model.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    model.trainer.save_checkpoint(path)
    before = open(path, "rb").read()

    def broken_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.trainer.save_checkpoint(path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_validate_test_predict_on_compressed_weights() -> None:
    model = build()
    t = trainer("neuzip", max_steps=2, limit_val_batches=1, val_check_interval=2)
    t.fit(model, loader(2), loader(1))
    assert is_compressed(model.head.weight)
    before = weights(model)
    (val,) = t.validate(model, loader(1))
    (test,) = t.test(model, loader(1))
    predictions = t.predict(model, loader(2))
    assert val["val_loss"] > 0 and test["test_loss"] == pytest.approx(val["val_loss"])
    assert predictions is not None and len(predictions) == 2 and predictions[0].shape == (BATCH, SEQ, VOCAB)
    assert is_compressed(model.head.weight)
    assert_same(weights(model), before)
    dense = build()
    dense.load_state_dict(before)
    with torch.no_grad():
        assert torch.equal(dense(batches(2)[0][0]), predictions[0])
    evaluator = build()  # validate alone also compresses, then evaluates without gradients
    trainer("neuzip").validate(evaluator, loader(1))
    assert is_compressed(evaluator.emb.weight)


def test_model_built_in_configure_model_is_compressed() -> None:
    torch.manual_seed(0)
    lazy = Tiny(lazy=True)
    trainer(NeuZipStrategy(exclude=["head.weight"]), max_steps=4).fit(lazy, loader(4))
    assert is_compressed(lazy.emb.weight) and not is_compressed(lazy.head.weight)
    assert_same(weights(lazy), MANUAL["sgd"](batches(4)))


def test_model_on_meta_is_filled_from_weights() -> None:
    with torch.device("meta"):
        model = Tiny()
    trainer(NeuZipStrategy(weights=build().state_dict()), max_steps=4).fit(model, loader(4))
    assert is_compressed(model.fc.weight) and model.ln.weight.device.type == "cpu"
    assert_same(weights(model), MANUAL["sgd"](batches(4)))
    with torch.device("meta"):
        empty = Tiny()
    with pytest.raises(ValueError, match="meta device"):
        trainer("neuzip").fit(empty, loader(1))


def test_neuzip_stats_logged(tmp_path: Any) -> None:
    model = build()
    logger = CSVLogger(tmp_path, name="stats")
    trainer("neuzip", max_steps=3, logger=logger, log_every_n_steps=1, callbacks=[NeuZipStats()]).fit(model, loader(3))
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r.get("neuzip/bits_per_weight")]
    assert len(rows) == 3 and "neuzip/compressed_bytes" not in (reader.fieldnames or [])
    sizes = ("dense_bytes", "serialized_bytes", "held_bytes", "bits_per_weight", "compression_ratio")
    for key in (*sizes, "codec_time_share", "decode_time_share"):
        assert all(r[f"neuzip/{key}"] != "" for r in rows), key
    for r in rows:
        dense, serialized, held, bpw, ratio = (float(r[f"neuzip/{key}"]) for key in sizes)
        assert held >= serialized and ratio == pytest.approx(dense / serialized) and ratio > 1
        assert bpw == pytest.approx(8 * serialized / (dense / 2)) and 8 < bpw < 16  # bf16: 2 dense bytes per weight
    assert all(0 < float(r["neuzip/codec_time_share"]) <= 1 for r in rows)
    # the last step's sizes are those of the trained model's compressed weights
    final = weight_sizes(model, include=[name for name, _ in compressed_parameters(model)])
    assert float(rows[-1]["neuzip/serialized_bytes"]) == final.serialized_bytes
    assert float(rows[-1]["neuzip/dense_bytes"]) == final.dense_bytes


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: fit("neuzip", "rmsprop"), "RMSprop"),
        (lambda: fit("neuzip", "two-groups"), "param group 1 differs .* weight_decay"),
        (lambda: trainer("neuzip").fit(Manual(), loader(1)), "manual optimization"),
        (lambda: fit("neuzip", gradient_clip_val=1.0, gradient_clip_algorithm="value"), "'value'"),
        (lambda: NeuZipStrategy(mantissa_bits=-1), "mantissa_bits=-1"),
        (lambda: NeuZipStrategy(mantissa_bits=3, compress=False), "compress=True"),
        (lambda: NeuZipStrategy(mantissa_bits=3, block_size=100), "block_size=100"),
        (lambda: NeuZipStrategy(start_method="thread"), "start_method"),  # type: ignore[arg-type]
        (lambda: NeuZipFSDPStrategy(mantissa_bits=3), "lossless shards"),
        (lambda: NeuZipFSDPStrategy(modules="blocks"), "'layers', 'weights'"),
        (lambda: NeuZipFSDPStrategy(split_bytes=0), "split_bytes"),
        (lambda: NeuZipFSDPStrategy(backward_prefetch="no"), "backward_prefetch must be a bool"),  # type: ignore[arg-type]
        (lambda: NeuZipFSDPStrategy(gather_heads="peek"), "gather_heads must be 'exchange' or 'read'"),
    ],
    ids=[
        "optimizer",
        "param-groups",
        "manual",
        "clip-value",
        "mantissa-bits",
        "lossy-dense",
        "block-size",
        "start-method",
        "fsdp-lossy",
        "fsdp-modules",
        "fsdp-split-bytes",
        "fsdp-prefetch",
        "fsdp-gather-heads",
    ],  # fmt: skip
)
def test_errors(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(("devices", "num_nodes"), [(1, 1), (2, 1), (1, 2), (2, 3)])
def test_data_parallel_configuration(devices: int, num_nodes: int) -> None:
    """devices/num_nodes make a data-parallel job (launcher, sampler) only when there are several processes."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    strategy = trainer("neuzip", devices=devices, num_nodes=num_nodes).strategy
    assert isinstance(strategy, NeuZipStrategy)
    world = devices * num_nodes
    assert strategy.is_distributed == (world > 1)
    assert strategy.root_device == torch.device("cpu")
    assert strategy.distributed_sampler_kwargs == {"num_replicas": world, "rank": 0}
    if world > 1:
        assert isinstance(strategy.launcher, _SubprocessScriptLauncher)
    else:
        assert strategy.launcher is None
    forced = trainer(NeuZipStrategy(device="cpu"), devices=2).strategy
    assert forced.parallel_devices == [torch.device("cpu")] and not forced.is_distributed  # type: ignore[attr-defined]


class _DictLoader(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 96, (n, 16), generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _causal_lm_fit(strategy: NeuZipStrategy) -> tuple[Any, list[str]]:
    from nz_lightning.lm.modules import CausalLMModule

    cfg = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    cfg |= {"num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
    torch.manual_seed(0)
    module = CausalLMModule(config=cfg, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, dtype="bfloat16")
    seen: list[str] = []

    class Spy(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            seen[:] = strategy._fused.blocked_modules if strategy._fused is not None else []

    data = torch.utils.data.DataLoader(_DictLoader(6), batch_size=2)
    trainer(strategy, max_steps=3, callbacks=[Spy()], gradient_clip_val=1.0).fit(module, data)
    return module, seen


def test_causal_lm_blocked_head_neuzip_equals_lomo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocked head (tied, several row blocks) runs under both strategies; NeuZip == LOMO bit for bit."""
    import nz_lightning.tensor.workspace as workspace

    monkeypatch.setattr(workspace, "ROW_BLOCK_BYTES", 2000)
    nz, nz_blocked = _causal_lm_fit(NeuZipStrategy())
    lomo, lomo_blocked = _causal_lm_fit(NeuZipStrategy(compress=False))
    plain, plain_blocked = _causal_lm_fit(NeuZipStrategy(compress=False, blocked_head=False))
    assert nz_blocked == lomo_blocked == ["model.lm_head", "model.model.embed_tokens"] and plain_blocked == []
    assert is_compressed(nz.model.lm_head.weight) and len(nz.model.lm_head.weight.store.bounds) > 1
    assert_same(weights(nz), weights(lomo))
    for key, value in weights(plain).items():  # the plain head: same algorithm up to summation order
        torch.testing.assert_close(weights(lomo)[key].float(), value.float(), atol=2e-2, rtol=0, msg=key)
    assert type(nz.model.lm_head) is nn.Linear  # teardown removed the blocked head
