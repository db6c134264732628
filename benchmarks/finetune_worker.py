"""One run of the fine-tuning benchmark (:mod:`benchmarks.finetune`), meant to run in a fresh process per method.

:func:`pretrain` trains the small causal LM on the local corpus once and caches it under ``runs/``;
:func:`run_method` loads it, sets up one method, fine-tunes on the text-to-SQL pairs for a fixed token budget, and
reports memory (peak RSS during training, over the process's RSS before the model was loaded), step time, trainable
parameters, weight bytes held, held-out loss / perplexity on the answers and exact match of greedy generations.

Methods (all fp32: this CPU's bf16 training would add rounding effects that differ between optimizers):

* ``adamw``, ``sgd``: vanilla full fine-tuning with ``torch.optim``;
* ``lomo``: fused SGD inside backward on dense weights (:func:`nz_lightning.fused_optimizer`);
* ``neuzip-sgd``, ``neuzip-adalomo``: lossless-compressed weights (:func:`nz_lightning.compress_model`) with the
  fused SGD / AdaLomo update;
* ``qlora-<mode>``: bitsandbytes base weights (``int8``, ``fp4``, ``nf4``, ``nf4-dq``; fp32 compute) + peft LoRA
  rank 8 on every linear layer but the output head, AdamW on the adapters (:mod:`nz_lightning.lm.qlora`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import reset_peak_rss, rss_kib
from benchmarks.finetune_data import IGNORE, TOKENIZER, encode_pairs, pretrain_tokens, sql_pairs

METHODS = (
    "adamw", "sgd", "lomo", "neuzip-sgd", "neuzip-adalomo", "qlora-int8", "qlora-fp4", "qlora-nf4", "qlora-nf4-dq",
)  # fmt: skip
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}


def model_config(cfg: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=260, hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"], max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=TOKENIZER.pad_token_id, bos_token_id=TOKENIZER.bos_token_id,
        eos_token_id=TOKENIZER.eos_token_id,
    )  # fmt: skip


PRETRAIN_KEYS = ("hidden", "intermediate", "layers", "heads", "pretrain_steps", "pretrain_batch", "pretrain_seq")


def pretrain(cfg: dict[str, Any], root: Path) -> Path:
    """The pre-trained model's directory (``save_pretrained``), trained now unless cached under ``root``.

    The cache key hashes the architecture and the pre-training recipe; ``recipe.json`` beside the weights records
    them with the loss curve and time.
    """
    from transformers import LlamaForCausalLM

    recipe = {k: cfg[k] for k in PRETRAIN_KEYS} | {"corpus": "stdlib modules (DEFAULT_STDLIB_FILES)", "lr": 3e-3}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = root / f"pretrained_{key}"
    if (path / "recipe.json").is_file():
        return path
    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    model = LlamaForCausalLM(model_config(cfg)).train()
    tokens = pretrain_tokens(2_000_000)
    seq, batch, steps = cfg["pretrain_seq"], cfg["pretrain_batch"], cfg["pretrain_steps"]
    blocks = tokens[: tokens.numel() // seq * seq].view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    gen = torch.Generator().manual_seed(0)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        ids = blocks[torch.randint(0, blocks.shape[0], (batch,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.save_pretrained(str(path))
    recipe |= {"seconds": time.perf_counter() - t0, "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / 10}
    recipe |= {"params": sum(p.numel() for p in model.parameters()), "corpus_bytes": int(tokens.numel())}
    (path / "recipe.json").write_text(json.dumps(recipe, indent=2))
    return path


def _setup(method: str, model: torch.nn.Module, lr: float) -> tuple[torch.nn.Module, Any]:
    """The (possibly wrapped) model and ``step(ids, labels) -> loss`` of ``method``."""
    import nz_lightning as nz

    if method.startswith("qlora-"):
        from nz_lightning.lm.lora import apply_lora
        from nz_lightning.lm.qlora import QuantSettings, quantize_model

        quantize_model(model, QuantSettings(method.removeprefix("qlora-"), dtype=torch.float32))
        model = apply_lora(model, LORA, "CAUSAL_LM")
    if method in ("adamw", "sgd") or method.startswith("qlora-"):
        params = [p for p in model.parameters() if p.requires_grad]
        opt: Any = (
            torch.optim.SGD(params, lr=lr) if method == "sgd" else torch.optim.AdamW(params, lr=lr, weight_decay=0)
        )

        def step(ids: torch.Tensor, labels: torch.Tensor) -> float:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        return model, step
    if method.startswith("neuzip-"):
        nz.compress_model(model)
    fused = nz.fused_optimizer(model, "adalomo" if method == "neuzip-adalomo" else "sgd", lr=lr)

    def fused_step(ids: torch.Tensor, labels: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=labels).loss
        fused.backward(loss)
        return float(loss.detach())

    return model, fused_step


def held_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Weight bytes held (bitsandbytes layers: packed values + quantization state; NeuZip: compressed bytes)."""
    from nz_lightning.lm.qlora import held_weight_bytes, quantized_layers
    from nz_lightning.tensor.sizes import weight_sizes

    if quantized_layers(model):
        return held_weight_bytes(model)
    sizes = weight_sizes(model)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"total": sizes.held_bytes, "trainable": trainable}


@torch.no_grad()
def evaluate(model: Any, pairs: list[Any], seq_len: int, max_new: int) -> dict[str, float]:
    """Held-out loss / perplexity on answer tokens (teacher forcing) and exact match of greedy generations."""
    model.eval()
    ids, labels = encode_pairs(pairs, seq_len)
    nll = count = 0.0
    for i in range(0, len(pairs), 16):
        logits = model(input_ids=ids[i : i + 16]).logits[:, :-1].float()
        tgt = labels[i : i + 16, 1:]
        nll += float(
            torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE, reduction="sum")
        )
        count += float((tgt != IGNORE).sum())
    prompts = [TOKENIZER.encode(p.prompt) for p in pairs]
    width = max(len(p) for p in prompts)
    left = torch.full((len(prompts), width), TOKENIZER.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(left)
    for i, p in enumerate(prompts):
        left[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=left, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
        pad_token_id=TOKENIZER.pad_token_id, eos_token_id=TOKENIZER.eos_token_id,
    )  # fmt: skip
    answers = [TOKENIZER.decode(row[width:].tolist()) for row in out]
    exact = sum(a.strip() == p.answer for a, p in zip(answers, pairs, strict=True))
    model.train()
    return {
        "heldout_loss": nll / count,
        "heldout_ppl": math.exp(nll / count),
        "exact_match": exact / len(pairs),
        "sample": answers[0],
    }


def run_method(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the cached pre-trained model with ``cfg["method"]`` and seed ``cfg["seed"]``; measure everything."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(cfg["threads"])
    method, seed = cfg["method"], cfg["seed"]
    train, heldout = sql_pairs(cfg["train_pairs"], cfg["heldout_pairs"], seed=0)
    ids, labels = encode_pairs(train, cfg["seq"])
    warm = LlamaForCausalLM(model_config(cfg | {"hidden": 32, "intermediate": 64, "layers": 1, "heads": 2}))
    warm, warm_step = _setup(method, warm, cfg["lr"][method])  # imports, numba JIT, pools: the baseline
    warm_step(ids[:2, :32], labels[:2, :32].clamp(min=0))
    del warm, warm_step
    gc.collect()
    base_kib = rss_kib()
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(cfg["pretrained"], dtype=torch.float32).train()
    model, step = _setup(method, model, cfg["lr"][method])
    sizes = held_bytes(model)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [torch.randperm(len(train), generator=gen) for _ in range(cfg["steps"] * cfg["batch"] // len(train) + 1)]
    )
    reset_peak_rss()
    losses, times = [], []
    for s in range(cfg["steps"]):
        rows = order[s * cfg["batch"] : (s + 1) * cfg["batch"]]
        width = int((labels[rows] != IGNORE).nonzero()[:, 1].max()) + 1  # trim the batch's common right padding
        t0 = time.perf_counter()
        losses.append(step(ids[rows, :width], labels[rows, :width]))
        times.append(time.perf_counter() - t0)
    peak_kib = rss_kib("VmHWM")
    t0 = time.perf_counter()
    scores = evaluate(model, heldout, cfg["seq"], cfg["max_new"])
    return {
        "method": method,
        "seed": seed,
        "lr": cfg["lr"][method],
        "trainable_params": params,
        "weight_bytes": sizes["total"],
        "trainable_bytes": sizes["trainable"],
        "baseline_mib": base_kib / 1024,
        "peak_mib": peak_kib / 1024,
        "peak_over_baseline_mib": (peak_kib - base_kib) / 1024,
        "step_s": statistics.median(times[2:] or times),
        "train_s": sum(times),
        "eval_s": time.perf_counter() - t0,
        "loss_first": losses[0],
        "loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "examples": cfg["steps"] * cfg["batch"],
        **scores,
    }
