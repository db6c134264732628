"""Data of the fine-tuning benchmark (:mod:`benchmarks.finetune`): a local pre-training corpus and a text-to-SQL task.

* Pre-training: byte-level blocks of Python standard-library modules (the repository's local default corpus,
  :data:`nz_lightning.lm.data.DEFAULT_STDLIB_FILES`).
* Fine-tuning (a different domain): a text-to-SQL task in the spirit of the paper's Table 2
  (b-mc2/sql-create-context: question + ``CREATE TABLE`` context -> SQL), generated here, deterministically from a
  seed, from templates over a few tables. Training and held-out pairs use disjoint literal values (numbers and
  names), so an exact match on the held-out set needs the mapping, not memorized answers.

Each pair is ``prompt = "<context>\\n-- <question>\\nSQL: "`` and ``answer = "<sql>"`` (then EOS); the loss is taken
on the answer (and EOS) only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from nz_lightning.lm.data import ByteTokenizer, stdlib_files

IGNORE = -100
TOKENIZER = ByteTokenizer()

TABLES = {
    "head": ("name TEXT", "age INTEGER", "born_state TEXT"),
    "employee": ("name TEXT", "salary INTEGER", "department TEXT"),
    "city": ("name TEXT", "population INTEGER", "country TEXT"),
    "ship": ("name TEXT", "tonnage INTEGER", "flag TEXT"),
    "singer": ("name TEXT", "sales INTEGER", "genre TEXT"),
}
ENTITY = {"head": "heads", "employee": "employees", "city": "cities", "ship": "ships", "singer": "singers"}
WORDS = [
    "Alabama", "Texas", "Ohio", "Maine", "Oregon", "Nevada", "Utah", "Iowa", "Idaho", "Kansas", "Sales", "Legal",
    "Finance", "Support", "Research", "France", "Chile", "Kenya", "Peru", "Japan", "Norway", "Egypt", "Panama",
    "Liberia", "Malta", "Greece", "Cyprus", "Jazz", "Blues", "Rock", "Folk", "Soul", "Opera", "Disco", "Metal",
]  # fmt: skip


@dataclass(frozen=True)
class Pair:
    """One text-to-SQL example."""

    prompt: str
    answer: str


def _pair(rng: random.Random, numbers: list[int], words: list[str]) -> Pair:
    table = rng.choice(sorted(TABLES))
    cols = TABLES[table]
    num_col, text_col = cols[1].split()[0], cols[2].split()[0]
    n, w, who = rng.choice(numbers), rng.choice(words), ENTITY[table]
    kind = rng.randrange(6)
    if kind == 0:
        q, sql = (
            f"How many {who} have {num_col} greater than {n}?",
            f"SELECT COUNT(*) FROM {table} WHERE {num_col} > {n}",
        )
    elif kind == 1:
        q, sql = (
            f"List the names of {who} whose {text_col} is {w}.",
            f"SELECT name FROM {table} WHERE {text_col} = '{w}'",
        )
    elif kind == 2:
        agg = rng.choice(["AVG", "MAX", "MIN"])
        word = {"AVG": "average", "MAX": "maximum", "MIN": "minimum"}[agg]
        q, sql = f"What is the {word} {num_col} of all {who}?", f"SELECT {agg}({num_col}) FROM {table}"
    elif kind == 3:
        q = f"Show the {num_col} of {who} with {text_col} {w}."
        sql = f"SELECT {num_col} FROM {table} WHERE {text_col} = '{w}'"
    elif kind == 4:
        q = f"How many {who} have {num_col} less than {n} and {text_col} {w}?"
        sql = f"SELECT COUNT(*) FROM {table} WHERE {num_col} < {n} AND {text_col} = '{w}'"
    else:
        q = f"List the {text_col} of {who} ordered by {num_col} descending."
        sql = f"SELECT {text_col} FROM {table} ORDER BY {num_col} DESC"
    context = f"CREATE TABLE {table} ({', '.join(c.split()[0] for c in cols)})"  # column names only: shorter
    return Pair(f"{context}\n-- {q}\nSQL: ", sql)


def sql_pairs(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Deterministic training and held-out pairs with disjoint literals (even numbers / first word half for training,
    odd numbers / second half held out); held-out pairs never repeat a training pair."""
    rng = random.Random(seed)
    words = WORDS[:]
    rng.shuffle(words)
    half = len(words) // 2
    train = [_pair(rng, list(range(10, 100, 2)), words[:half]) for _ in range(n_train)]
    seen = {p.answer for p in train}
    heldout: list[Pair] = []
    while len(heldout) < n_heldout:
        p = _pair(rng, list(range(11, 100, 2)), words[half:])
        if p.answer not in seen:
            heldout.append(p)
            seen.add(p.answer)
    return train, heldout


def encode_pairs(pairs: list[Pair], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` ``[n, seq_len]``: prompt + answer + EOS, right-padded; labels only on answer + EOS.

    Raises:
        ValueError: A pair is longer than ``seq_len`` tokens.
    """
    ids = torch.full((len(pairs), seq_len), TOKENIZER.pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), seq_len), IGNORE, dtype=torch.long)
    for i, p in enumerate(pairs):
        prompt, answer = TOKENIZER.encode(p.prompt), TOKENIZER.encode(p.answer, add_eos=True)
        row = prompt + answer
        if len(row) > seq_len:
            raise ValueError(f"pair {i} has {len(row)} tokens > seq_len {seq_len}")
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(prompt) : len(row)] = torch.tensor(answer)
    return ids, labels


def pretrain_tokens(max_bytes: int) -> torch.Tensor:
    """Byte tokens of the local pre-training corpus (stdlib modules, concatenated), at most ``max_bytes``."""
    data = b"".join(open(f, "rb").read() for f in stdlib_files())[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
