"""Local text data for the data-module and seq2seq tests: text-to-SQL rows and a small trained tokenizer."""

from __future__ import annotations

from pathlib import Path

SQL_ROWS = [  # a tiny text-to-SQL task, generated locally
    {"question": f"How many heads of department are older than {n}?", "context": "CREATE TABLE head (age INTEGER)"}
    | {"answer": f"SELECT COUNT(*) FROM head WHERE age > {n}"}
    for n in range(40)
]


def trained_tokenizer(tmp_path: Path, texts: list[str]) -> str:
    """A small byte-level BPE tokenizer trained on ``texts``, saved as an HF tokenizer directory (its path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator(texts, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(tmp_path / "tok"))
    return str(tmp_path / "tok")
