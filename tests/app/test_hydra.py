"""Hydra configs, recipes and train.py: compose everything, build on meta, train a few steps."""

from __future__ import annotations

import csv
import json
import math
import os
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from nz_lightning.lm import run
from nz_lightning.lm.data import ByteTokenizer
from nz_lightning.tensor.sizes import WeightSizes
from tests.helpers.text_data import SQL_ROWS, trained_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
EXPERIMENTS = CONF / "experiment"  # the recipes: +experiment=<path below it, without .yaml>
RECIPES = sorted(p.relative_to(EXPERIMENTS).with_suffix("").as_posix() for p in EXPERIMENTS.rglob("*.yaml"))
# Published parameter counts (HF configs) of the paper's models; "T5 1B" is t5-large.
MODEL_PARAMS = {
    "tiny_llama": 0.49e6,
    "gpt_neo_2.7b": 2.651e9,
    "llama3_8b": 8.030e9,
    "llama3_70b": 70.554e9,
    "llama2_13b": 13.016e9,
    "yi_1.5_34b": 34.389e9,
    "t5_1b": 0.738e9,
    "t5_3b": 2.852e9,
    "t5_11b": 11.308e9,
}


pytestmark = pytest.mark.usefixtures("restore_cpu_threads")


@pytest.fixture
def hydra_conf() -> Iterator[None]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose_train(*overrides: str, output_dir: str | Path = "/tmp/unused") -> DictConfig:
    return compose(config_name="train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def tiny_run(*overrides: str) -> list[str]:
    """Overrides for a few-step CPU run of the embedded default into tmp_path."""
    base = "trainer.max_steps=3 trainer.val_check_interval=3 trainer.limit_val_batches=2 trainer.log_every_n_steps=1"
    base += " data.max_bytes=60000 data.seq_len=64 data.batch_size=4 callbacks.rich_progress_bar.leave=false"
    return [*base.split(), *overrides]


def read_metrics(root: Path) -> list[dict[str, str]]:
    (path,) = root.glob("**/metrics.csv")
    with open(path) as fh:
        return list(csv.DictReader(fh))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


# -- composition -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["data", "model", "trainer", "logger", "callbacks", "strategy", "quant"])
def test_every_group_option_composes(hydra_conf: None, group: str) -> None:
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options
    appended = group in ("strategy", "quant")
    for option in options:
        cfg = compose_train(f"{'+' if appended else ''}{group}={option}")
        OmegaConf.resolve(cfg)
        node = cfg.trainer if group == "quant" else cfg[group]
        if group in ("data", "model", "trainer"):
            get_class(node._target_)
        if group == "strategy":
            kind = "NeuZipFSDPStrategy" if option.endswith("_fsdp") else "NeuZipStrategy"
            assert node._target_ == f"nz_lightning.{kind}"
            assert node.compress is not option.startswith("lomo")
            assert node.checkpoint_format == ("compressed" if option == "neuzip_compressed_ckpt" else "dense")
            assert node.get("mantissa_bits") == (int(option[13]) if option.startswith("neuzip_lossy_") else None)
            assert type(instantiate(node, _convert_="all")).__name__ == kind
        if group == "quant":
            assert node.plugins[0].mode == option.replace("_", "-")
            assert node.plugins[0].dtype._target_ == "hydra.utils.get_object"
    assert "strategy" not in compose_train()  # appended only with +strategy=...


def test_default_trains_on_cpu_in_fp32_without_download(hydra_conf: None) -> None:
    cfg = compose_train()
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true" and cfg.model.dtype == "float32"
    assert "dataset" not in cfg.data and cfg.data.tokenizer == "bytes"
    assert cfg.model.config.vocab_size >= ByteTokenizer.vocab_size


@pytest.mark.parametrize("name", sorted(MODEL_PARAMS), ids=lambda n: n)
def test_models_build_on_meta_with_published_sizes(hydra_conf: None, name: str) -> None:
    cfg = compose_train(f"model={name}")
    module = instantiate(cfg.model, _convert_="all")
    with torch.device("meta"):
        module.configure_model()
    assert module.model is not None
    count = sum(p.numel() for p in module.model.parameters())
    assert count == pytest.approx(MODEL_PARAMS[name], rel=0.01)
    assert all(p.device.type == "meta" for p in module.model.parameters())
    expected = torch.float32 if name == "tiny_llama" else torch.bfloat16
    assert next(module.model.parameters()).dtype == expected


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r)
def test_recipe_composes_and_instantiates(hydra_conf: None, recipe: str) -> None:
    cfg = compose_train(f"+experiment={recipe}")
    OmegaConf.resolve(cfg)
    header = (EXPERIMENTS / f"{recipe}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_"
    figures = ("GiB", "GB", "BLEU", "not in our notes")  # table3b: the paper's figures are not in our notes
    assert any(unit in line for line in header[:8] for unit in figures), "paper figures"
    method = recipe.rsplit("_", 1)[-1]
    if recipe.startswith("table3"):
        assert cfg.task == "eval"  # Table 3 details: tests/test_eval_recipes.py
    elif method in ("lomo", "neuzip") or recipe == "llama3_8b_under_16gb":
        assert cfg.strategy.compress is (method != "lomo")
    elif recipe.startswith("multi_gpu/"):
        assert cfg.strategy.compress and cfg.trainer.devices == 8 and cfg.model.optimizer.name == "sgd"
    else:
        assert "strategy" not in cfg
    module = instantiate(cfg.model, _convert_="all")
    assert module.model is None  # built later, in configure_model
    data = instantiate(cfg.data, _convert_="all")
    assert data.seq_len == cfg.data.seq_len
    assert cfg.trainer.accelerator == "gpu"
    if recipe.startswith(("table1/", "multi_gpu/")) or recipe == "llama3_8b_under_16gb":
        assert cfg.data.dataset == "wikitext" and cfg.data.seq_len == 1024 and cfg.model.gradient_checkpointing
    if recipe.startswith("table2/"):
        assert cfg.data.task == "seq2seq" and cfg.model.bleu and cfg.model.pretrained.startswith("google-t5/")
    if recipe.startswith("qlora/"):
        assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == "all-linear"
        assert cfg.trainer.precision is None and cfg.model.optimizer.name == "adamw"
        for mode in ("int8", "fp4", "nf4_dq"):
            plugin = compose_train(f"+experiment={recipe}", f"quant={mode}").trainer.plugins[0]
            assert plugin.mode == mode.replace("_", "-")
        plugin_conf = cfg.trainer.plugins[0]
        pytest.importorskip("bitsandbytes")
        assert type(instantiate(plugin_conf)).__name__ == "BitsandbytesQuantPrecision"  # CPU or CUDA
    if "strategy" in cfg:
        expected = "NeuZipFSDPStrategy" if recipe.endswith("_fsdp") else "NeuZipStrategy"
        assert type(run.build_strategy(cfg)).__name__ == expected


def test_sweep_definition(hydra_conf: None) -> None:
    sweep = yaml.safe_load((ROOT / "recipes" / "sweeps" / "lr_sweep.yaml").read_text())
    assert sweep["program"] == "train.py"
    command = sweep["command"]
    assert command[:3] == ["${env}", "python", "${program}"]
    assert command.index("+strategy=neuzip") < command.index("${args_no_hyphens}")
    lr = sweep["parameters"]["model.optimizer.lr"]
    assert lr["distribution"] == "log_uniform_values" and 0 < lr["min"] < lr["max"]
    args = [f"{k}={v.get('value', lr['min'])}" for k, v in sweep["parameters"].items()]  # as ${args_no_hyphens}
    cfg = compose_train("+strategy=neuzip", *args)  # what the agent runs must compose (False parses as false)
    assert cfg.model.optimizer.lr == lr["min"] and cfg.logger.wandb.offline is False


# -- config layout ------------------------------------------------------------------------------------------------

NOT_RECIPES = [
    "table1/_pretrain",  # the old names of the recipe bases
    "table2/_sql_finetune",
    "table3a/_lossy_eval",
    "table3b/_lossy_eval_t5",
    "qlora/_qlora",
    "table1_pretrain",  # the bases under their new names and group
    "recipe_base/table1_pretrain",
    "sweeps/lr_sweep",  # a W&B sweep, not a Hydra config
]


def test_config_tree_is_plain_files() -> None:
    """No links (checkouts without symlink support), no partials or sweeps among the recipes."""
    assert not [p for p in CONF.rglob("*") if p.is_symlink()]
    assert EXPERIMENTS.is_dir() and len(RECIPES) == 1 + 9 + 9 + 4 + 48 + 3  # ... + multi_gpu
    assert not [p for p in EXPERIMENTS.rglob("*") if p.is_file() and (p.name.startswith("_") or p.suffix != ".yaml")]
    bases = sorted(p.stem for p in (CONF / "recipe_base").glob("*.yaml"))
    assert bases == ["qlora", "table1_pretrain", "table2_sql_finetune", "table3a_lossy_eval", "table3b_lossy_eval_t5"]
    used = {line.strip() for p in EXPERIMENTS.rglob("*.yaml") for line in p.read_text().splitlines()}
    assert {f"- /recipe_base/{b}" for b in bases} <= used
    assert not list(CONF.rglob("lr_sweep.yaml")) and (ROOT / "recipes" / "sweeps" / "lr_sweep.yaml").is_file()


@pytest.mark.parametrize("name", NOT_RECIPES)
def test_partials_and_sweeps_are_not_selectable_as_recipes(hydra_conf: None, name: str) -> None:
    with pytest.raises(MissingConfigException, match="experiment"):
        compose_train(f"+experiment={name}")


@pytest.mark.parametrize("recipe", ["table1/llama3_8b_neuzip", "llama3_8b_under_16gb"])
def test_train_py_composes_recipes_from_any_cwd(tmp_path: Path, recipe: str) -> None:
    """``python <repo>/train.py +experiment=...`` from another directory (conf/ resolves next to train.py)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"+experiment={recipe}", "--cfg", "job", "--resolve"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["strategy"]["_target_"] == "nz_lightning.NeuZipStrategy" and cfg["strategy"]["compress"] is True
    assert cfg["model"]["config"]["model_type"] == "llama" and cfg["data"]["dataset"] == "wikitext"
    assert cfg["task_name"] == recipe.replace("/", "_") and cfg["model"]["gradient_checkpointing"] is True


# -- broken imports fail loudly ------------------------------------------------------------------------------------


@pytest.fixture
def broken_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable package whose own import fails (a missing dependency)."""
    (tmp_path / "nz_broken_pkg").mkdir()
    (tmp_path / "nz_broken_pkg" / "__init__.py").write_text("import nz_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nz_broken_pkg.Thing"


def test_broken_callback_import_raises(hydra_conf: None, broken_package: str) -> None:
    cfg = compose_train(f"callbacks.neuzip_stats._target_={broken_package}")
    with pytest.raises(ImportError, match=r"nz_broken_pkg\.Thing.*callbacks\.neuzip_stats.*nz_missing_dependency_xyz"):
        run.instantiate_group(cfg.callbacks, "callbacks")
    cfg = compose_train("callbacks.neuzip_stats._target_=nz_lightning.lightning.callbacks.NoSuchCallback")
    with pytest.raises(ImportError, match="NoSuchCallback"):
        run.instantiate_group(cfg.callbacks, "callbacks")


def test_broken_strategy_import_raises(hydra_conf: None, broken_package: str) -> None:
    cfg = compose_train("+strategy=neuzip", f"strategy._target_={broken_package}")
    with pytest.raises(ImportError, match=r"nz_broken_pkg\.Thing.*strategy.*nz_missing_dependency_xyz") as info:
        run.build_strategy(cfg)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)  # the real error, chained
    assert run.build_strategy(compose_train()) == "auto"


# -- train.py ----------------------------------------------------------------------------------------------------


def test_main_trains_tiny_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """``python train.py +strategy=neuzip`` (the main job, ``make run``) in-process, a few steps, from another cwd:
    the @hydra.main entry resolves conf/ next to train.py and prints the summary table."""
    monkeypatch.chdir(tmp_path)
    argv = [str(ROOT / "train.py"), "+strategy=neuzip", *tiny_run(), f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    assert (tmp_path / "checkpoints" / "final.ckpt").is_file()
    out = capsys.readouterr().out
    assert "nz_lightning run" in out and "NeuZipStrategy" in out
    for row in ("weights: dense", "weights: serialized (compressed)", "weights: held in memory", "compressed tensors"):
        assert row in out
    rows = read_metrics(tmp_path)
    losses = column(rows, "train/loss")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert column(rows, "val/ppl")[0] == pytest.approx(math.exp(column(rows, "val/loss")[0]), rel=1e-4)
    hparams = yaml.safe_load(next(tmp_path.glob("**/hparams.yaml")).read_text())
    assert hparams["model"]["config"]["model_type"] == "llama" and hparams["data"]["seq_len"] == 64
    assert hparams["strategy"]["compress"] is True
    assert column(rows, "neuzip/compression_ratio")


def test_neuzip_summary_reports_compressed_weights(tmp_path: Path, hydra_conf: None) -> None:
    cfg = compose_train(*tiny_run("+strategy=neuzip", "logger=none"), output_dir=tmp_path)
    summary = run.train(cfg)
    sizes: WeightSizes = summary["weights"]
    assert summary["strategy"] == "NeuZipStrategy" and summary["steps"] == 3
    assert sizes.compressed_tensors > 0 and 0 < sizes.compressed_dense_bytes <= sizes.dense_bytes
    assert sizes.serialized_bytes < sizes.dense_bytes and sizes.serialized_bytes <= sizes.held_bytes
    assert sizes.dense_bytes == 4 * sizes.numel and 0 < sizes.bits_per_weight < 32  # fp32 weights
    assert sizes.ratio_to_dense == pytest.approx(sizes.serialized_bytes / sizes.dense_bytes)
    assert summary["peak_rss"] > 0 and os.path.isfile(summary["checkpoint"])
    assert set(summary) == {
        "strategy", "steps", "train_loss", "val_loss", "val_ppl", "wall_s", "peak_rss", "weights", "checkpoint",
        "output_dir", "metrics", "quantized",
    }  # fmt: skip
    assert summary["quantized"] is None  # no bitsandbytes layers in a NeuZip run


def test_plain_run_summary_has_dense_weights(tmp_path: Path, hydra_conf: None) -> None:
    cfg = compose_train(*tiny_run("logger=none", "save_checkpoint=false"), output_dir=tmp_path)
    summary = run.train(cfg, print_table=False)
    sizes: WeightSizes = summary["weights"]
    assert summary["strategy"] != "NeuZipStrategy" and summary["checkpoint"] is None
    assert sizes.compressed_tensors == 0 and sizes.dense_bytes == sizes.serialized_bytes == sizes.held_bytes > 0


def test_wandb_offline_beside_csv(tmp_path: Path, hydra_conf: None, monkeypatch: Any) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_train(*tiny_run("logger=[csv,wandb]"), output_dir=tmp_path)
    try:
        summary = run.train(cfg)
    finally:
        import wandb

        wandb.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb"))
    losses = column(read_metrics(tmp_path), "train/loss")
    assert losses[-1] == pytest.approx(summary["train_loss"], rel=1e-5)
    config_file = run_dir / "files" / "config.yaml"
    if config_file.exists():  # written when the run finishes
        assert "model" in yaml.safe_load(config_file.read_text())


def test_lora_trains_only_adapters(tmp_path: Path, hydra_conf: None) -> None:
    cfg = compose_train(*tiny_run("logger=none", "model.lora={r:4}", "model.scheduler=null"), output_dir=tmp_path)
    summary = run.train(cfg)
    assert summary["steps"] == 3
    module = instantiate(cfg.model, _convert_="all")
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_adapters_stay_plain_under_quantized_linear_init(hydra_conf: None) -> None:
    """Under BitsandbytesPrecision's init context (torch.nn.Linear patched), only the base layers are replaced."""
    from lightning.fabric.plugins.precision.utils import _ClassReplacementContextManager

    class FakeQuantLinear(torch.nn.Linear):
        pass

    cfg = compose_train("model.lora={r:8}")
    module = instantiate(cfg.model, _convert_="all")
    with _ClassReplacementContextManager({"torch.nn.Linear": FakeQuantLinear}):
        module.configure_model()
    layers = dict(module.model.named_modules())
    q_proj = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    assert type(q_proj.base_layer) is FakeQuantLinear and not q_proj.base_layer.weight.requires_grad
    assert type(q_proj.lora_A["default"]) is torch.nn.Linear and q_proj.lora_A["default"].weight.requires_grad
    assert torch.nn.Linear is torch.nn.modules.linear.Linear


# -- data --------------------------------------------------------------------------------------------------------


def test_seq2seq_module_trains_from_local_pretrained(tmp_path: Path, hydra_conf: None) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    (tmp_path / "sql.jsonl").write_text("\n".join(json.dumps(r) for r in SQL_ROWS))
    tok_dir = trained_tokenizer(tmp_path, [v for r in SQL_ROWS for v in r.values()])
    small = dict(vocab_size=304, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
    T5ForConditionalGeneration(T5Config(**small, decoder_start_token_id=0)).save_pretrained(str(tmp_path / "t5"))
    data = dict(tokenizer=tok_dir, dataset="json", data_files=tmp_path / "sql.jsonl", cache_dir=tmp_path / "cache")
    data |= dict(seq_len=48, target_len=24, batch_size=4, num_workers=0)
    overrides = [f"model.config.{k}={v}" for k, v in small.items()] + [f"data.{k}={v}" for k, v in data.items()]
    overrides += ["model.dtype=float32", f"model.pretrained={tmp_path / 't5'}", "model.max_new_tokens=8"]
    base = [o for o in tiny_run("model=t5_1b", "data=sql", "test=true") if "max_bytes" not in o]
    cfg = compose_train(*base, *overrides, "+trainer.limit_test_batches=1", "model.bleu=true", output_dir=tmp_path)
    summary = run.train(cfg)
    assert summary["steps"] == 3 and math.isfinite(summary["train_loss"])
    assert 0.0 <= summary["metrics"]["test/bleu"] <= 100.0 and "test/ppl" in summary["metrics"]
    assert summary["val_loss"] is not None and "val/bleu" in summary["metrics"]
