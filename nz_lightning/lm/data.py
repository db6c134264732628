"""Text data for the Lightning/Hydra layer: local files or HF ``datasets``, causal-LM blocks or seq2seq pairs.

Two sources, one :class:`TextDataModule`:

* **Local text** (the default, no download): files or globs, by default a few of the Python standard
  library's own ``.py`` files, read as bytes and cut into fixed-length blocks of byte-level tokens
  (:class:`ByteTokenizer`: 256 byte values plus PAD/BOS/EOS).
* **HF datasets**: ``datasets.load_dataset(dataset, dataset_config, data_files=...)``, e.g.
  ``("wikitext", "wikitext-2-raw-v1")``, ``("b-mc2/sql-create-context")`` or a local builder
  (``"json"``, ``"text"``, ``"parquet"`` with ``data_files``), tokenized with the byte tokenizer or a
  tokenizer loaded from a local path (a ``tokenizer.json`` file or a directory) or a hub name.

``task="causal"`` concatenates the token streams and cuts blocks (labels = inputs; the model shifts).
``task="seq2seq"`` formats each row with ``source_template``/``target_template`` and pads per batch
(labels padded with -100).
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from nz_lightning.lm.resumable import TrainLoaderState

IGNORE_INDEX = -100
"""Label value the HF losses ignore (padding of seq2seq targets)."""

DEFAULT_STDLIB_FILES = ("os.py", "argparse.py", "typing.py", "dataclasses.py", "inspect.py", "functools.py")
"""Standard-library modules the local default reads (in this order) when no files are given."""


class ByteTokenizer:
    """Byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then PAD, BOS and EOS.

    It has the small part of the HF tokenizer interface this module uses (``__call__``, ``decode``,
    ``batch_decode``, ``len``, ``pad_token_id``, ``eos_token_id``).
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str | bytes, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (its UTF-8 bytes), optionally followed by EOS."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        return list(data) + ([self.eos_token_id] if add_eos else [])

    def __call__(self, texts: Sequence[str], **_: Any) -> dict[str, list[list[int]]]:
        """Encode a batch of texts (HF-style: returns ``{"input_ids": [...]}``; no special tokens added)."""
        return {"input_ids": [self.encode(t) for t in texts]}

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special ids are dropped (ids past EOS too when ``skip_special_tokens``)."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out = bytearray()
        for i in values:
            if i == self.eos_token_id and skip_special_tokens:
                break
            if 0 <= i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def batch_decode(
        self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        """:meth:`decode` of each row."""
        return [self.decode(row, skip_special_tokens) for row in batch]


def load_tokenizer(name: str | None) -> Any:
    """A tokenizer by name: ``None``/``"bytes"`` gives :class:`ByteTokenizer`; a ``.json`` file is read as a
    ``tokenizers`` file; anything else goes to ``transformers.AutoTokenizer.from_pretrained`` (local directory
    or hub name). A tokenizer without a pad token gets its EOS (or a new ``<pad>``) as pad token.
    """
    if name is None or name == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok: Any
    if os.path.isfile(name):
        tok = PreTrainedTokenizerFast(tokenizer_file=name)
    else:
        tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def stdlib_files(names: Sequence[str] = DEFAULT_STDLIB_FILES) -> list[str]:
    """Paths of standard-library modules (found next to ``os.py``; ``sysconfig`` as a fallback)."""
    roots = [os.path.dirname(os.__file__), sysconfig.get_paths()["stdlib"]]
    found = []
    for name in names:
        path = next((os.path.join(r, name) for r in roots if os.path.isfile(os.path.join(r, name))), None)
        if path is not None:
            found.append(path)
    if not found:
        raise FileNotFoundError(f"none of {list(names)} found in the standard library ({roots})")
    return found


def expand_files(patterns: str | Sequence[str]) -> list[str]:
    """Files matching the glob(s), each pattern's matches sorted, in pattern order, without duplicates.

    Raises:
        FileNotFoundError: A pattern matches no file.
    """
    out: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        out.extend(m for m in matches if m not in out)
    return out


class BlockDataset(Dataset):
    """Consecutive fixed-length blocks of a 1-D token stream; each item is ``{"input_ids", "labels"}``."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        n = tokens.numel() // seq_len
        if n == 0:
            raise ValueError(f"{tokens.numel()} tokens make no block of {seq_len}")
        self.blocks = tokens[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.blocks[i].long()
        return {"input_ids": block, "labels": block}


class PairDataset(Dataset):
    """Tokenized (source, target) pairs for seq2seq models."""

    def __init__(self, sources: list[list[int]], targets: list[list[int]]) -> None:
        self.sources, self.targets = sources, targets

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.sources[i], "labels": self.targets[i]}


def pad_pairs(pad_id: int) -> Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    """A collate function padding sources with ``pad_id`` (and a mask) and targets with -100."""

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        src_len = max(len(r["input_ids"]) for r in rows)
        tgt_len = max(len(r["labels"]) for r in rows)
        ids = torch.full((len(rows), src_len), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), src_len), dtype=torch.long)
        labels = torch.full((len(rows), tgt_len), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


class TextDataModule(TrainLoaderState, pl.LightningDataModule):
    """Causal-LM blocks or seq2seq pairs from local text files or an HF ``datasets`` dataset.

    Args:
        files: Local files or globs (local-text source). ``None`` with no ``dataset``: a few stdlib modules.
        max_bytes: Read at most this many bytes of local text (``None``: all).
        dataset: ``datasets.load_dataset`` path or builder name (``"wikitext"``, ``"json"``, ``"text"``, ...).
        dataset_config: Its configuration name (``"wikitext-2-raw-v1"``).
        data_files: ``data_files`` for ``load_dataset`` (a path, list or split -> path mapping).
        tokenizer: ``None``/``"bytes"``, a ``tokenizer.json`` path, a tokenizer directory or hub name.
        task: ``"causal"`` (blocks) or ``"seq2seq"`` (pairs).
        text_field: Column holding the text (causal task).
        row_suffix: Appended to every row before tokenization (causal task): ``""`` for wikitext, whose
            lines keep their newline; ``"\n"`` for the ``text`` builder, which strips it.
        source_template: ``str.format`` template of the source over a row's columns (seq2seq task).
        target_template: Template of the target (seq2seq task).
        seq_len: Block length (causal) or maximal source length (seq2seq), in tokens.
        target_len: Maximal target length in tokens (seq2seq).
        batch_size: Batch size of every loader.
        val_fraction: Share held out for validation when the source has no validation split.
        train_split: Name of the training split.
        val_split: Name of the validation split (carved from train when absent).
        test_split: Name of the test split (``None`` or absent: the validation data).
        max_samples: Keep at most this many rows per split (``None``: all).
        num_workers: DataLoader workers.
        seed: Seed of the shuffling and of the validation carve-out.
        cache_dir: ``datasets`` cache directory (``None``: its default, ``~/.cache/huggingface/datasets``).
    """

    def __init__(
        self,
        files: str | Sequence[str] | None = None,
        max_bytes: int | None = 2_000_000,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
        tokenizer: str | None = None,
        task: str = "causal",
        text_field: str = "text",
        row_suffix: str = "",
        source_template: str = "{question}",
        target_template: str = "{answer}",
        seq_len: int = 256,
        target_len: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str | None = "test",
        max_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if task not in ("causal", "seq2seq"):
            raise ValueError(f"task must be 'causal' or 'seq2seq', got {task!r}")
        if task == "seq2seq" and dataset is None:
            raise ValueError("task='seq2seq' needs a `dataset` (rows with the template's columns)")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.files, self.max_bytes = files, max_bytes
        self.dataset, self.dataset_config, self.data_files = dataset, dataset_config, data_files
        self.tokenizer_name, self.task, self.text_field, self.row_suffix = tokenizer, task, text_field, row_suffix
        self.source_template, self.target_template = source_template, target_template
        self.seq_len, self.target_len, self.batch_size = seq_len, target_len, batch_size
        self.val_fraction, self.max_samples = val_fraction, max_samples
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.num_workers, self.seed, self.cache_dir = num_workers, seed, cache_dir
        self._tokenizer: Any = None
        self.data: dict[str, Any] = {}

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model's embedding must cover."""
        return len(self.tokenizer)

    def prepare_data(self) -> None:
        """Download (or build the cache of) the HF dataset once, on the main process."""
        if self.dataset is not None:
            self._load()

    def setup(self, stage: str | None = None) -> None:
        """Build the train/val/test datasets (idempotent)."""
        if self.data:
            return
        if self.dataset is None:
            tokens = self._local_tokens()
            n_val = max(self.seq_len, int(tokens.numel() * self.val_fraction))
            self.data["train"] = BlockDataset(tokens[:-n_val], self.seq_len)
            self.data["val"] = BlockDataset(tokens[-n_val:], self.seq_len)
            self.data["test"] = self.data["val"]
            return
        splits = self._hf_splits()
        for key, rows in splits.items():
            self.data[key] = self._pairs(rows) if self.task == "seq2seq" else self._blocks(rows)
        self.data.setdefault("test", self.data["val"])

    def raw_texts(self, split: str = "test") -> list[str]:
        """Untokenized texts of a split, for evaluation (perplexity per word).

        Local source: every file whole (``max_bytes`` and the validation carve-out do not apply). HF datasets: the
        split's rows (``"train"``, ``"val"`` or ``"test"``, which falls back to ``"val"``): the text column plus
        ``row_suffix`` (causal task) or the formatted targets (seq2seq task).
        """
        if self.dataset is None:
            paths = stdlib_files() if self.files is None else expand_files(self.files)
            return [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]
        splits = self._hf_splits()
        rows = splits[split] if split in splits else splits["val"]
        if self.task == "seq2seq":
            return [self.target_template.format(**r) for r in rows.to_list()]
        return [(t or "") + self.row_suffix for t in rows[self.text_field]]

    def _local_tokens(self) -> torch.Tensor:
        paths = stdlib_files() if self.files is None else expand_files(self.files)
        chunks, total = [], 0
        for path in paths:
            with open(path, "rb") as fh:
                data = fh.read() if self.max_bytes is None else fh.read(self.max_bytes - total)
            chunks.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32))
            chunks.append(torch.tensor([ByteTokenizer.eos_token_id], dtype=torch.int32))
            total += len(data)
            if self.max_bytes is not None and total >= self.max_bytes:
                break
        return torch.cat(chunks)

    def _load(self) -> Any:
        import datasets

        data_files = self.data_files
        if isinstance(data_files, Mapping):
            data_files = dict(data_files)
        elif data_files is not None and not isinstance(data_files, str):
            data_files = list(data_files)
        return datasets.load_dataset(self.dataset, self.dataset_config, data_files=data_files, cache_dir=self.cache_dir)

    def _hf_splits(self) -> dict[str, Any]:
        ds = self._load()
        train_name, val_name, test_name = self.splits["train"], self.splits["val"], self.splits["test"]
        if train_name not in ds:
            raise KeyError(f"dataset {self.dataset!r} has no split {train_name!r} (splits: {list(ds)})")
        out = {"train": ds[train_name]}
        if val_name in ds:
            out["val"] = ds[val_name]
        else:
            parts = ds[train_name].train_test_split(test_size=self.val_fraction, seed=self.seed)
            out["train"], out["val"] = parts["train"], parts["test"]
        if test_name is not None and test_name in ds:
            out["test"] = ds[test_name]
        if self.max_samples is not None:
            out = {k: v.select(range(min(len(v), self.max_samples))) for k, v in out.items()}
        return out

    def _encode_batches(self, texts: list[str], batch: int = 1000) -> Iterator[list[list[int]]]:
        for start in range(0, len(texts), batch):
            yield self.tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [ids for chunk in self._encode_batches(texts) for ids in chunk]

    def _blocks(self, rows: Any) -> BlockDataset:
        texts = [(t or "") + self.row_suffix for t in rows[self.text_field]]
        parts = [torch.tensor(list(chain.from_iterable(c)), dtype=torch.int32) for c in self._encode_batches(texts)]
        return BlockDataset(torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32), self.seq_len)

    def _pairs(self, rows: Any) -> PairDataset:
        records = rows.to_list()
        sources = self._encode([self.source_template.format(**r) for r in records])
        targets = self._encode([self.target_template.format(**r) for r in records])
        eos = self.tokenizer.eos_token_id
        tail = [] if eos is None else [eos]
        sources = [s[: self.seq_len - len(tail)] + tail for s in sources]
        targets = [t[: self.target_len - len(tail)] + tail for t in targets]
        return PairDataset(sources, targets)

    def _loader(self, key: str, shuffle: bool) -> DataLoader:
        if not self.data:
            self.setup()
        collate = pad_pairs(self.tokenizer.pad_token_id) if self.task == "seq2seq" else None
        data = self.data[key]
        if shuffle:
            return self.make_train_loader(
                data,
                self.batch_size,
                self.seed,
                drop_last=len(data) > self.batch_size,
                num_workers=self.num_workers,
                collate_fn=collate,
            )
        return DataLoader(data, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, resumable mid-epoch (:class:`~nz_lightning.lm.resumable.ResumableLoader`)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (the validation data where the source has no test split)."""
        return self._loader("test", shuffle=False)
