"""The paper's Table 3 recipes (conf/experiment/table3a, table3b): complete, each evaluating what its name says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]
EVAL_METHODS = ("bf16", "int8", "nf4", "nf4_dq", "neuzip_0bit", "neuzip_1bit", "neuzip_3bit", "neuzip_lossless")
TABLE3 = {
    "table3a": ("llama3_8b", "llama2_13b", "yi_1.5_34b"),
    "table3b": ("t5_1b", "t5_3b", "t5_11b"),
}


def check_eval_recipe(cfg: DictConfig, recipe: str) -> None:
    """A Table 3 recipe evaluates a pre-trained model with the method its name says, at batch size 1."""
    table, name = recipe.split("/")
    method = next(m for m in EVAL_METHODS if name.endswith("_" + m))
    assert name.removesuffix("_" + method) in TABLE3[table]
    assert cfg.task == "eval" and cfg.optimized_metric == "eval/word_ppl" and cfg.data.batch_size == 1
    assert cfg.model.pretrained and cfg.data.tokenizer == cfg.model.pretrained
    if table == "table3a":
        assert cfg.data.dataset == "wikitext" and cfg.eval.window == 1024 and cfg.eval.split == "test"
    else:
        assert cfg.data.task == "seq2seq" and cfg.model.pretrained.startswith("google-t5/")
    plugins = cfg.trainer.get("plugins")
    if method in ("int8", "nf4", "nf4_dq"):
        assert plugins[0].mode == method.replace("_", "-") and cfg.trainer.precision is None
    else:
        assert not plugins and cfg.trainer.precision == "bf16-true"
    if method.startswith("neuzip"):
        bits = None if method == "neuzip_lossless" else int(method[len("neuzip_")])
        assert cfg.strategy.compress is True and cfg.strategy.mantissa_bits == bits
        assert bits is None or cfg.strategy.block_size == 512
    else:
        assert "strategy" not in cfg


def test_table3_recipes_are_complete() -> None:
    for table, models in TABLE3.items():
        expected = {f"{table}/{model}_{method}" for model in models for method in EVAL_METHODS}
        assert expected == {r for r in RECIPES if r.startswith(table + "/")}
    assert len(RECIPES) == 48


EXPERIMENTS = ROOT / "conf" / "experiment"
RECIPES = sorted(p.relative_to(EXPERIMENTS).with_suffix("").as_posix() for p in EXPERIMENTS.glob("table3*/*.yaml"))


@pytest.fixture
def hydra_conf() -> Iterator[None]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield


@pytest.mark.parametrize("recipe", RECIPES)
def test_eval_recipe(hydra_conf: None, recipe: str) -> None:
    cfg = compose(config_name="train", overrides=[f"+experiment={recipe}", "paths.output_dir=/tmp/unused"])
    OmegaConf.resolve(cfg)
    check_eval_recipe(cfg, recipe)
