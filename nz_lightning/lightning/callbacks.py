"""Lightning callbacks for NeuZip training."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from nz_lightning.tensor.convert import compressed_parameters
from nz_lightning.tensor.sizes import weight_sizes
from nz_lightning.tensor.workspace import CODEC_STATS

__all__ = ["NeuZipStats"]


def _size_metrics(module: nn.Module) -> dict[str, float]:
    """The size keys :class:`NeuZipStats` logs for a module's NeuZip-compressed weights (each tied weight once).

    Args:
        module: A (partly) compressed module.

    Returns:
        ``dense_bytes``, ``serialized_bytes``, ``held_bytes``, ``bits_per_weight`` (serialized) and
        ``compression_ratio`` (dense / serialized) of :func:`weight_sizes` over the compressed parameters; empty
        when nothing is compressed.
    """
    sizes = weight_sizes(module, include=[name for name, _ in compressed_parameters(module)])
    if not sizes.compressed_tensors:
        return {}
    return {
        "dense_bytes": float(sizes.dense_bytes),
        "serialized_bytes": float(sizes.serialized_bytes),
        "held_bytes": float(sizes.held_bytes),
        "bits_per_weight": sizes.bits_per_weight,
        "compression_ratio": sizes.compression_ratio,
    }


class NeuZipStats(Callback):
    """Log the sizes of the compressed weights and the codec's share of step time, every training step.

    Values go through ``pl_module.log`` (``on_step=True``), so every logger attached to the Trainer receives them
    (at its ``log_every_n_steps``). Keys, with the default ``prefix="neuzip/"``:

    * ``dense_bytes``, ``serialized_bytes``, ``held_bytes``, ``bits_per_weight``, ``compression_ratio``: the
      :class:`~nz_lightning.tensor.sizes.WeightSizes` of the compressed weights (each tied weight once; only when
      the module holds compressed weights): bytes dense in their dtype, bytes written out (header, tables,
      payload, checksum), bytes held in memory now (serialized plus cached decoder tables), serialized bits per
      element (as :attr:`CompressedTensor.bits_per_weight` and the CLI report it) and dense / serialized.
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
            **_size_metrics(pl_module),
        }
        shown = {"bits_per_weight", "codec_time_share"} if self.prog_bar else set()
        for key, value in metrics.items():
            pl_module.log(self.prefix + key, value, on_step=True, on_epoch=False, prog_bar=key in shown, batch_size=1)
