"""save_compressed / load_compressed: whole models in one pickle-free file, lossless and lossy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import nz_lightning as nz
from nz_lightning.formats.model_file import load_compressed, save_compressed
from nz_lightning.formats.nzsf import decompress_file


def _llama(tied: bool, device: str = "cpu", hidden: int = 64) -> LlamaForCausalLM:
    """A tiny Llama; on ``meta`` only its parameters and persistent buffers (the rotary table is not saved)."""
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if device == "meta":
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(torch.bfloat16)
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) % 300
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mantissa_bits", [None, 3])
def test_roundtrip_into_meta_model(tmp_path: Path, tied: bool, mantissa_bits: int | None) -> None:
    model = nz.compress_model(_llama(tied), mantissa_bits=mantissa_bits, block_size=64)
    before = _logits(model)
    path = tmp_path / "model.nzsf"
    report = save_compressed(model, path)
    assert report.file_bytes == path.stat().st_size
    assert report.compressed == len(nz.compressed_parameters(model))
    assert report.lossy == (report.compressed if mantissa_bits is not None else 0)
    assert report.ratio_vs_bf16 < (0.5 if mantissa_bits is not None else 0.9)

    fresh = load_compressed(_llama(tied, device="meta"), path)
    assert torch.equal(_logits(fresh), before)
    loaded = dict(nz.compressed_parameters(fresh))
    assert set(loaded) == {n for n, _ in nz.compressed_parameters(model)}
    for p in loaded.values():
        assert p.store.mantissa_bits == mantissa_bits
        assert p.requires_grad == (mantissa_bits is None)
    if tied:
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    dense_before, dense_after = model.state_dict(), fresh.state_dict()
    assert dense_before.keys() == dense_after.keys()
    assert all(torch.equal(dense_before[k], dense_after[k]) for k in dense_before)


def test_file_restores_a_plain_safetensors_file(tmp_path: Path) -> None:
    model = nz.compress_model(_llama(False), mantissa_bits=1)
    save_compressed(model, tmp_path / "m.nzsf")
    decompress_file(tmp_path / "m.nzsf", tmp_path / "m.safetensors")
    plain = load_file(tmp_path / "m.safetensors")
    state = model.state_dict()
    assert plain.keys() == state.keys()
    assert all(torch.equal(plain[k], state[k]) for k in state)


def test_corrupt_or_mismatched_files_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "m.nzsf"
    save_compressed(nz.compress_model(_llama(False)), path)
    data = path.read_bytes()
    bad = bytearray(data)
    bad[len(data) // 2] ^= 0x01
    (tmp_path / "bad.nzsf").write_bytes(bytes(bad))
    (tmp_path / "short.nzsf").write_bytes(data[: len(data) - 50])
    for name in ("bad.nzsf", "short.nzsf"):
        target = _llama(False)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError):
            load_compressed(target, tmp_path / name)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "nothing assigned on failure"
    other = _llama(False, hidden=32)
    with pytest.raises(ValueError, match="model"):
        load_compressed(other, path)


def test_failed_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.nzsf"
    save_compressed(_llama(False), path)
    previous = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("nz_lightning.formats.model_file.compress", boom)
    with pytest.raises(RuntimeError):
        save_compressed(_llama(False), path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["m.nzsf"], "no temp file left behind"


def test_inspect_reports_lossy_tensors(tmp_path: Path) -> None:
    from nz_lightning.formats.nzsf import inspect_file

    model = nz.compress_model(_llama(False), mantissa_bits=3)
    save_compressed(model, tmp_path / "m.nzsf")
    report = inspect_file(tmp_path / "m.nzsf")
    modes = {t.name: t.mode for t in report.tensors}
    assert modes["model.embed_tokens.weight"] == "lossy-k3"
    assert modes["model.norm.weight"] == "const"  # ones: stored as one value
    assert report.float_bits_per_weight < 8
