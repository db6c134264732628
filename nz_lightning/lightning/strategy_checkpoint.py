"""Checkpoint methods of :class:`~nz_lightning.NeuZipStrategy` (a mixin, kept apart to keep modules short).

Dense (portable) or compressed model states, per-tensor checksums verified before anything is assigned, the fused
optimizer's state; written atomically by the strategy's checkpoint plugin (rank 0 alone with several processes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from typing_extensions import override

from nz_lightning.lightning.checkpoint_integrity import checkpoint_checksums, verify_checkpoint
from nz_lightning.lightning.checkpoint_io import compressed_state_dict, load_state_dict
from nz_lightning.lightning.compat import _PATH
from nz_lightning.lightning.replica import ReplicaStrategy

__all__ = ["CheckpointFormat", "StrategyCheckpointMixin"]

CheckpointFormat = Literal["dense", "compressed"]


class StrategyCheckpointMixin(ReplicaStrategy):
    """``lightning_module_state_dict``, ``load_checkpoint``, ``load_model_state_dict``, ``load_optimizer_state_dict``
    and ``save_checkpoint`` of the NeuZip strategies."""

    checkpoint_format: CheckpointFormat
    compress: bool
    _verified: tuple[int, _PATH] | None

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Dense tensors (portable), or encoded weights as ``uint8`` tensors with ``checkpoint_format="compressed"``."""
        module = self.lightning_module
        assert module is not None
        if self.checkpoint_format == "compressed":
            return compressed_state_dict(module)
        return module.state_dict()

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint; raise ``ValueError`` naming the tensor and file if one fails its checksum."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        verify_checkpoint(checkpoint, checkpoint_path)
        self._verified = (id(checkpoint), checkpoint_path)
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Restore a dense or compressed model state all or nothing (checksums verified unless already done).

        Raises:
            ValueError: A tensor fails its checksum or an encoded weight is corrupt (named); nothing is assigned.
        """
        module = self.lightning_module
        assert module is not None
        verified, self._verified = self._verified, None
        path = verified[1] if verified is not None and verified[0] == id(checkpoint) else None
        if path is None:
            verify_checkpoint(checkpoint, sections=("state_dict",))
        load_state_dict(module, checkpoint["state_dict"], strict=strict, source=path)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore the fused optimizer state (moments, step counts, pending accumulation, RNG).

        Raises:
            ValueError: The checkpoint's optimizer state is not a fused optimizer's.
        """
        for state in checkpoint["optimizer_states"]:
            if "fused" not in state:
                raise ValueError(
                    "the checkpoint's optimizer state was not written by NeuZipStrategy (no fused optimizer state); "
                    "load only its weights, e.g. LightningModule.load_from_checkpoint, then fit without ckpt_path"
                )
        super().load_optimizer_state_dict(checkpoint)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Record the format and per-tensor checksums in ``checkpoint["nz_lightning"]``, then write atomically."""
        checkpoint["nz_lightning"] = {
            "checkpoint_format": self.checkpoint_format,
            "compress": self.compress,
            "checksums": checkpoint_checksums(checkpoint),
        }
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
