"""The text data module on local files: byte-level blocks, JSON seq2seq pairs, text and parquet with tokenizers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from nz_lightning.lm.data import ByteTokenizer, TextDataModule, stdlib_files
from tests.helpers.text_data import SQL_ROWS, trained_tokenizer


def test_local_text_blocks(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"doc{i}.txt").write_text("héllo wörld\n" * 50)
    dm = TextDataModule(files=str(tmp_path / "*.txt"), seq_len=16, batch_size=4, val_fraction=0.1)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and torch.equal(batch["input_ids"], batch["labels"])
    assert len(dm.data["val"]) >= 1 and dm.vocab_size == 259
    first = dm.data["train"][0]["input_ids"]
    assert ByteTokenizer().decode(first).startswith("héllo")
    assert all(os.path.isfile(p) for p in stdlib_files())
    default = TextDataModule(max_bytes=20_000, seq_len=64)
    default.setup()
    assert len(default.data["train"]) == (20_001 - 1000) // 64  # os.py's first 20 kB + EOS, 5% held out
    with pytest.raises(FileNotFoundError):
        TextDataModule(files=str(tmp_path / "*.nothing")).setup()


def test_json_seq2seq_with_local_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "sql.jsonl").write_text("\n".join(json.dumps(r) for r in SQL_ROWS))
    tok_dir = trained_tokenizer(tmp_path, [v for r in SQL_ROWS for v in r.values()])
    templates = dict(source_template="question: {question} context: {context}", target_template="{answer}")
    dm = TextDataModule(
        dataset="json", data_files=str(tmp_path / "sql.jsonl"), tokenizer=tok_dir, task="seq2seq", **templates,
        seq_len=48, target_len=24, batch_size=4, val_fraction=0.1, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    dm.prepare_data()
    dm.setup()
    assert len(dm.data["train"]) == 36 and len(dm.data["val"]) == 4
    batch = next(iter(dm.val_dataloader()))
    eos, pad = dm.tokenizer.eos_token_id, dm.tokenizer.pad_token_id
    assert batch["input_ids"].shape[1] <= 48 and batch["labels"].shape[1] <= 24
    assert (batch["labels"] == eos).sum(dim=1).tolist() == [1] * 4
    assert torch.equal(batch["attention_mask"].bool(), batch["input_ids"] != pad)
    text = dm.tokenizer.decode(batch["labels"][0][batch["labels"][0] >= 0], skip_special_tokens=True)
    assert text.startswith("SELECT COUNT(*) FROM head WHERE age >")


def test_text_and_parquet_causal_with_tokenizer_file(tmp_path: Path) -> None:
    import datasets

    lines = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    (tmp_path / "valid.txt").write_text("\n".join(lines[:40]))
    tok_file = str(Path(trained_tokenizer(tmp_path, lines)).parent / "tokenizer.json")
    common: dict[str, Any] = dict(tokenizer=tok_file, seq_len=32, batch_size=2, cache_dir=str(tmp_path / "cache"))
    files = {"train": str(tmp_path / "train.txt"), "validation": str(tmp_path / "valid.txt")}
    text_dm = TextDataModule(dataset="text", data_files=files, row_suffix="\n", **common)
    text_dm.setup()
    assert text_dm.data["train"][0]["input_ids"].shape == (32,)
    assert 0 < len(text_dm.data["val"]) < len(text_dm.data["train"])
    assert "line 0: the quick" in text_dm.tokenizer.decode(text_dm.data["train"][0]["input_ids"])
    datasets.Dataset.from_dict({"text": [ln + "\n" for ln in lines]}).to_parquet(str(tmp_path / "train.parquet"))
    pq_dm = TextDataModule(dataset="parquet", data_files={"train": str(tmp_path / "train.parquet")}, **common)
    pq_dm.setup()  # no validation split: 5% of the rows are held out
    assert "quick brown fox" in pq_dm.tokenizer.decode(pq_dm.data["train"][0]["input_ids"])
    n_tokens = sum(d.blocks.numel() for d in (pq_dm.data["train"], pq_dm.data["val"]))
    assert abs(n_tokens - text_dm.data["train"].blocks.numel()) <= 64  # same rows, cut into blocks per split
    assert pq_dm.data["test"] is pq_dm.data["val"]
