"""``OneDeviceStrategy``: the single-device base of :class:`~nz_lightning.NeuZipStrategy`.

It refuses several devices or nodes with an error naming the fix, takes its device from the Trainer's
``accelerator``/``devices`` unless one is given, and writes checkpoints atomically by default.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from nz_lightning.lightning.checkpoint_io import AtomicCheckpointIO
from nz_lightning.lightning.compat import _DEVICE, _WrappingCheckpointIO

__all__ = ["OneDeviceStrategy"]


class OneDeviceStrategy(SingleDeviceStrategy):
    """A ``SingleDeviceStrategy`` that refuses multi-device runs and checkpoints atomically.

    Args:
        device: The device (default: the one the Trainer's ``accelerator``/``devices`` select).
        accelerator: As for ``SingleDeviceStrategy``.
        checkpoint_io: Checkpoint plugin (default: :class:`~nz_lightning.lightning.checkpoint_io.AtomicCheckpointIO`).
        precision_plugin: As for ``SingleDeviceStrategy``.
    """

    def __init__(
        self,
        device: _DEVICE | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._device_given = device is not None

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        """The device list; Lightning's accelerator connector sets it from ``accelerator``/``devices``."""
        return [self._root_device] if self._device_given else None

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices and len(devices) > 1:
            raise ValueError(
                f"NeuZipStrategy runs on a single device, but {len(devices)} devices were requested: multi-device "
                "NeuZip (DDP/FSDP) is not supported yet. Pass Trainer(devices=1) (devices='auto' takes every GPU)"
            )
        if devices and not self._device_given:
            self._root_device = torch.device(devices[0])

    @property
    def num_nodes(self) -> int:
        """Always 1 (set by Lightning's accelerator connector from ``Trainer(num_nodes=...)``)."""
        return 1

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        if num_nodes > 1:
            raise ValueError(
                f"NeuZipStrategy runs on a single device, but num_nodes={num_nodes} was requested: multi-device "
                "NeuZip is not supported yet"
            )

    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        """The checkpoint plugin (an atomic-writing ``TorchCheckpointIO`` unless one was given)."""
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        elif isinstance(self._checkpoint_io, _WrappingCheckpointIO):
            self._checkpoint_io.checkpoint_io = AtomicCheckpointIO()  # only taken if it has none yet
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io
