"""``NeuZipFSDPStrategy(meta_init=True)``: models built on meta, filled one FSDP unit at a time (2 gloo ranks on CPU).

The multi-rank tests share one 2-rank job (tests/distributed/worker_meta_init.py, ``main``) and one 1-rank job; the
rest runs in this process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nz_lightning.distributed.materialize import (
    building_on_meta,
    from_weights,
    hf_weight_files,
    parameters_on_meta,
    seeded_init,
    unit_seed,
)
from nz_lightning.lm.modules import CausalLMModule
from tests.distributed.worker_meta_init import CONFIG
from tests.helpers.distributed import check_ranks, run_ranks

WORKER = "tests.distributed.worker_meta_init"
TIED = {**CONFIG, "tie_word_embeddings": True}
MISSING = "model.model.layers.1.mlp.up_proj.weight"
BAD_SHAPE = "model.model.layers.0.self_attn.q_proj.weight"


def write_pretrained(root: Path) -> tuple[Path, Path]:
    """A tiny tied Llama saved with ``save_pretrained`` (norms perturbed: not the init's ones), and ``weights=`` files
    keyed by the LightningModule's names: complete, one key missing, one shape wrong."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = CausalLMModule(config=TIED).build_hf_config()
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    pretrained, files = root / "pretrained", root / "files"
    hf.save_pretrained(pretrained)
    files.mkdir()
    weights = {f"model.{k}": v for k, v in load_file(pretrained / "model.safetensors").items()}
    save_file(weights, files / "weights.safetensors")
    save_file({k: v for k, v in weights.items() if k != MISSING}, files / "missing.safetensors")
    save_file({**weights, BAD_SHAPE: torch.zeros(16, 32)}, files / "shape.safetensors")
    return pretrained, files


def run_job(out: Path, world: int, *args: str) -> list[dict[str, Any]]:
    check_ranks(run_ranks(WORKER, ["--out", str(out), *args], world_size=world, timeout=240))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("meta_init")
    pretrained, files = write_pretrained(root)
    main = run_job(root / "main", 2, "--job", "main", "--pretrained", str(pretrained), "--files", str(files))
    single = run_job(root / "single", 1, "--job", "seeded")
    return {"main": main, "single": single, "root": root, "files": files}


def states(jobs: dict[str, Any], job: str, tag: str) -> dict[str, dict[str, torch.Tensor]]:
    loaded: dict[str, dict[str, torch.Tensor]] = torch.load(jobs["root"] / job / f"{tag}.pt", weights_only=True)
    return loaded


def test_meta_init_from_safetensors_equals_file_and_trains_like_eager(jobs: dict[str, Any]) -> None:
    """(i) Built on meta and filled from the pretrained directory or from ``weights=``: after setup the gathered
    dense state is the file's bit for bit (the tied head too, absent from the file), and training gives the same
    losses and weights, bit for bit, as the eager ``from_pretrained`` path."""
    expected = load_file(jobs["files"] / "weights.safetensors")
    assert "model.lm_head.weight" not in expected  # tied: save_pretrained leaves it out
    for tag in ("eager", "meta_pretrained", "meta_weights"):
        initial = states(jobs, "main", tag)["initial"]
        for key, value in expected.items():
            assert torch.equal(initial[key], value), (tag, key)
        assert torch.equal(initial["model.lm_head.weight"], expected["model.model.embed_tokens.weight"]), tag
    for rank in (0, 1):
        eager = jobs["main"][rank]["eager"]
        for tag in ("meta_pretrained", "meta_weights"):
            run = jobs["main"][rank][tag]
            assert run["losses"] == eager["losses"] and len(eager["losses"]) == 2, (tag, rank)
            assert run["checksum"] == eager["checksum"], (tag, rank)
            assert run["buffers"] == run["eager_buffers"], tag  # rotary inv_freq built for real, not garbage
    assert jobs["main"][0]["eager"]["checksum"] != jobs["main"][0]["eager"]["initial_checksum"]  # it trained


def test_seeded_init_agrees_on_ranks_runs_and_world_sizes(jobs: dict[str, Any]) -> None:
    """(ii) Without weights: every unit is initialized identically on both ranks, in two runs (different global RNG
    states), and at 1 rank; buffers equal the eager model's; the distributions are ``from_config``'s."""
    rank0, rank1 = (r["seeded"] for r in jobs["main"])
    again, single = jobs["main"][0]["seeded_again"], jobs["single"][0]["seeded"]
    digests = [c["digest"] for c in rank0["calls"]]
    assert [c["digest"] for c in rank1["calls"]] == digests  # what each rank made before keeping its rows
    assert [c["digest"] for c in again["calls"]] == digests
    assert [c["digest"] for c in single["calls"]] == digests  # units are materialized whole: same at any world size
    assert rank0["initial_checksum"] == rank1["initial_checksum"] == again["initial_checksum"]
    assert single["initial_checksum"] == rank0["initial_checksum"]
    two, one = states(jobs, "main", "seeded")["initial"], states(jobs, "single", "seeded")["initial"]
    assert two.keys() == one.keys() and all(torch.equal(two[k], one[k]) for k in two)
    assert rank0["buffers"] == rank0["eager_buffers"] and single["buffers"] == single["eager_buffers"]
    for name, value in two.items():
        if "norm" in name:
            assert torch.equal(value, torch.ones_like(value)), name
        else:  # nn.Linear / nn.Embedding: normal(0, initializer_range = 0.02)
            assert 0.015 < float(value.std()) < 0.025 and abs(float(value.mean())) < 0.004, name
    assert not torch.equal(two["model.lm_head.weight"], two["model.model.embed_tokens.weight"])  # untied here
    up = [two[f"model.model.layers.{i}.mlp.up_proj.weight"] for i in (0, 1)]
    assert not torch.equal(*up)  # each module seeded by its own name


def test_units_are_dense_one_at_a_time(jobs: dict[str, Any]) -> None:
    """(iii) When each unit is materialized, no parameter of the model is dense (all are meta or sharded); after,
    only that unit's. The eager run, whose model is dense whole before sharding, fails the same check."""
    for tag in ("meta_pretrained", "meta_weights", "seeded", "seeded_again"):
        for rank in (0, 1):
            calls = jobs["main"][rank][tag]["calls"]
            units = [c["unit"] for c in calls]
            assert {"model.model.layers.0", "model.model.layers.1", "model"} <= set(units), units
            for call in calls:
                assert call["before"] == 0, (tag, call)
                assert call["after"] == call["unit_dense"] > 0, (tag, call)
    eager = jobs["main"][0]["eager"]["calls"]
    assert eager[0]["before"] > eager[0]["unit_dense"]  # the whole model was dense before its first unit


def test_weights_errors_name_the_key(jobs: dict[str, Any]) -> None:
    """(iv) A ``weights=`` file without a key, or with a wrong shape, fails setup naming the key (both ranks)."""
    for rank in (0, 1):
        missing, shape = jobs["main"][rank]["error_missing"], jobs["main"][rank]["error_shape"]
        assert f"meta parameter {MISSING!r}" in missing and "has no value in the weight source" in missing
        assert BAD_SHAPE in shape and "source has shape (16, 32), model expects (32, 32)" in shape


# -- in this process ---------------------------------------------------------------------------------------------


class Custom(nn.Module):
    """A module with a raw parameter and no initializer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.lin = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_parameters_on_meta_keeps_buffers_and_restores_the_patch() -> None:
    original = nn.Module.register_parameter
    assert not building_on_meta()
    with parameters_on_meta():
        with parameters_on_meta():
            assert building_on_meta()
        model = Custom()
        assert building_on_meta()
    assert nn.Module.register_parameter is original and not building_on_meta()
    assert all(p.is_meta for p in model.parameters())
    assert torch.equal(model.get_buffer("table"), torch.arange(4.0))  # a real buffer
    with pytest.raises(RuntimeError), parameters_on_meta():
        raise RuntimeError("boom")
    assert nn.Module.register_parameter is original

    class Special(nn.Parameter):
        pass

    with pytest.raises(TypeError, match="Special parameter 'w'"), parameters_on_meta():
        nn.Module().register_parameter("w", Special(torch.ones(2)))


def test_materializer_errors_in_process() -> None:
    with parameters_on_meta():
        model = Custom()
    with pytest.raises(ValueError, match=re.escape("meta parameter 'x.lin.weight' (FSDP unit 'lin') has no value")):
        from_weights({}, prefix="x.")("lin", model.lin)
    bad = {"lin.weight": torch.zeros(4, 5), "lin.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=re.escape("'lin.weight': source has shape (4, 5), model expects (4, 4)")):
        from_weights(bad)("lin", model.lin)
    init = seeded_init(model, seed=1)
    init("lin", model.lin)  # nn.Linear: reset_parameters
    assert not model.lin.weight.is_meta and bool(torch.isfinite(model.lin.weight).all())
    with pytest.raises(ValueError, match=r"'scale' \(FSDP unit '<root>'\): Custom has no initializer"):
        init("", model)
    with parameters_on_meta(), torch.device("meta"):
        meta_buffer = Custom()
    with pytest.raises(ValueError, match="meta buffer"):
        seeded_init(meta_buffer)("", meta_buffer)
    with pytest.raises(ValueError, match="meta buffer 'table'"):
        from_weights({"scale": torch.ones(4), "lin.weight": torch.ones(4, 4), "lin.bias": torch.ones(4)})(
            "", meta_buffer
        )
    assert unit_seed(0, "a") == unit_seed(0, "a") != unit_seed(0, "b") != unit_seed(1, "b")


def test_seeded_init_is_by_module_name_not_unit() -> None:
    """The same module gets the same values whether it is materialized in its own unit or with its parent."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        a = AutoModelForCausalLM.from_config(CausalLMModule(config=TIED).build_hf_config())
        b = AutoModelForCausalLM.from_config(CausalLMModule(config=TIED).build_hf_config())
    seeded_init(a, seed=2)("", a)  # everything in one call
    for name in ("model.layers.1", "model.layers.0", ""):  # unit by unit, another order
        seeded_init(b, seed=2)(name, b.get_submodule(name))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a.lm_head.weight is a.model.embed_tokens.weight  # still tied


def test_lm_module_builds_pretrained_on_meta(tmp_path: Path) -> None:
    pretrained, _ = write_pretrained(tmp_path)
    module = CausalLMModule(pretrained=str(pretrained), dtype="float32")
    with parameters_on_meta():
        module.configure_model()
    assert module.model is not None and all(p.is_meta for p in module.model.parameters())
    assert module.meta_weight_sources() == {"model": [pretrained / "model.safetensors"]}
    eager = CausalLMModule(pretrained=str(pretrained), dtype="float32")
    eager.configure_model()  # not on meta: from_pretrained
    assert eager.meta_weight_sources() == {} and not any(p.is_meta for p in eager.parameters())
    with pytest.raises(FileNotFoundError, match="not a local directory"), parameters_on_meta():
        CausalLMModule(pretrained="org/name", config=TIED).configure_model()
    with pytest.raises(ValueError, match="lora adapters cannot be built on meta"), parameters_on_meta():
        CausalLMModule(config=TIED, lora={"r": 2}).configure_model()
    (pretrained / "model.safetensors").rename(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        hf_weight_files(pretrained)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (pretrained / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "x.safetensors").rename(pretrained / "model-00001-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        hf_weight_files(pretrained)
    (pretrained / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert [f.name for f in hf_weight_files(pretrained)] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
