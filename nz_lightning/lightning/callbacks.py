"""Lightning callbacks for NeuZip training."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from nz_lightning.tensor.convert import compressed_parameters
from nz_lightning.tensor.parameter import CODEC_STATS

__all__ = ["NeuZipStats", "weight_stats"]


def weight_stats(module: nn.Module) -> dict[str, float]:
    """Size of a module's compressed weights (each tied weight counted once).

    Args:
        module: A (partly) compressed module.

    Returns:
        ``compressed_bytes`` (every byte held: headers, tables, payload), ``dense_bytes`` (the same weights in their
        dtype), ``bits_per_weight`` and ``compression_ratio`` (dense / compressed); empty when nothing is compressed.
    """
    stores = {id(p.store): p.store for _, p in compressed_parameters(module)}
    if not stores:
        return {}
    compressed = sum(s.nbytes for s in stores.values())
    numel = sum(s.shape.numel() for s in stores.values())
    dense = sum(s.shape.numel() * s.dtype.itemsize for s in stores.values())
    return {
        "compressed_bytes": float(compressed),
        "dense_bytes": float(dense),
        "bits_per_weight": 8.0 * compressed / numel,
        "compression_ratio": dense / compressed,
    }


class NeuZipStats(Callback):
    """Log the compressed size of the weights and the codec's share of step time, every training step.

    Values go through ``pl_module.log`` (``on_step=True``), so every logger attached to the Trainer receives them
    (at its ``log_every_n_steps``). Keys, with the default ``prefix="neuzip/"``:

    * ``compressed_bytes``, ``dense_bytes``, ``bits_per_weight``, ``compression_ratio``: see :func:`weight_stats`
      (only when the module holds compressed weights).
    * ``decode_time_share``, ``encode_time_share``, ``codec_time_share``: seconds spent decoding / encoding /
      both during the batch (from :data:`~nz_lightning.CODEC_STATS`) over the batch's wall time, from
      ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward and the fused updates).
    * ``decodes``, ``encodes``: codec calls during the batch.

    Args:
        prefix: Prefix of the logged keys.
        prog_bar: Also show ``bits_per_weight`` and ``codec_time_share`` in the progress bar.
    """

    def __init__(self, prefix: str = "neuzip/", prog_bar: bool = False) -> None:
        self.prefix = prefix
        self.prog_bar = prog_bar
        self._start: float | None = None
        self._codec: tuple[int, int, float, float] = (0, 0, 0.0, 0.0)

    @staticmethod
    def _snapshot() -> tuple[int, int, float, float]:
        s = CODEC_STATS
        return (s.decodes, s.encodes, s.decode_seconds, s.encode_seconds)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Record the codec counters and the time at the start of the batch."""
        self._codec = self._snapshot()
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the weight sizes and the codec time share of this batch."""
        if self._start is None:
            return
        wall = max(time.perf_counter() - self._start, 1e-12)
        now = self._snapshot()
        decodes, encodes, dec_s, enc_s = (b - a for a, b in zip(self._codec, now, strict=True))
        self._start = None
        metrics = {
            "decode_time_share": dec_s / wall,
            "encode_time_share": enc_s / wall,
            "codec_time_share": (dec_s + enc_s) / wall,
            "decodes": float(decodes),
            "encodes": float(encodes),
            **weight_stats(pl_module),
        }
        shown = {"bits_per_weight", "codec_time_share"} if self.prog_bar else set()
        for key, value in metrics.items():
            pl_module.log(self.prefix + key, value, on_step=True, on_epoch=False, prog_bar=key in shown, batch_size=1)
