"""Trained weights for the codec benchmark: train the small Llama of ``benchmarks/lossy.py`` and save it.

``.venv/bin/python benchmarks/codec_trained.py [--steps N] [--out DIR]`` trains the byte-level Llama-architecture
model of ``benchmarks/lossy.py`` (hidden 256, 6 layers, MLP 704, byte vocabulary, untied embeddings) in fp32 with
AdamW on stdlib modules, then writes its weights cast to bf16 and to fp16 as ``trained_bf16.safetensors`` and
``trained_fp16.safetensors`` (default ``benchmarks/out/``), plus ``trained.json`` (the recipe and the losses).
Trained weights move the exponent and top-mantissa statistics away from initialization, which is what the codec's
size comparisons need (``benchmarks/codec.py --file ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.lossy import FULL, load_tokens, train  # noqa: E402
from nz_lightning.lm.data import DEFAULT_STDLIB_FILES  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    """Train, save both dtypes, return the output directory."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=FULL.steps, help=f"training steps (default {FULL.steps})")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    cfg = replace(FULL, steps=args.steps)
    model, log = train(cfg, load_tokens(DEFAULT_STDLIB_FILES))
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        save_file({k: v.to(dtype) for k, v in state.items()}, str(args.out / f"trained_{name}.safetensors"))
    (args.out / "trained.json").write_text(json.dumps({"config": asdict(cfg), "train": log}, indent=1))
    return args.out


if __name__ == "__main__":
    main()
