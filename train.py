"""Train or evaluate a language model with Lightning from the Hydra configs in ``conf/``.

The run logic lives in :mod:`nz_lightning.lm.run`; this file is only the Hydra entry point. Examples::

    python train.py +strategy=neuzip                       # embedded default: tiny Llama, stdlib text, CPU
    python train.py                                        # the same with plain Lightning (no compression)
    python train.py +experiment=llama3_8b_under_16gb       # a paper recipe (conf/experiment/, recipes/README.md)
    python train.py +strategy=neuzip logger=wandb model.optimizer.lr=1e-3
    python train.py task=eval +strategy=neuzip_lossy_3bit model=hf_causal model.pretrained=DIR data=wikitext2
    python train.py +experiment=table3a/llama3_8b_neuzip_3bit   # lossy-inference recipes (Table 3, GPU)
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nz_lightning.lm.run import evaluate, train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run ``cfg.task`` (``train`` or ``eval``); return ``cfg.optimized_metric`` (for Hydra sweepers) when set."""
    task = str(cfg.get("task", "train"))
    if task == "train":
        summary = train(cfg)
    elif task == "eval":
        summary = evaluate(cfg)
    else:
        raise ValueError(f"task must be 'train' or 'eval', got {task!r}")
    key = cfg.get("optimized_metric")
    return summary["metrics"].get(key) if key else None


if __name__ == "__main__":
    main()
