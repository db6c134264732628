"""Per-phase peak memory of one training step of a Hugging Face Llama (for ``benchmarks/train_memory.py``).

The step is cut into phases by hooks that need no change to the model: the end of the forward (called by the step),
the gradient of the final norm's input (the head, the loss and the final norm are done: for the blocked head this
includes every head block's update), the gradient of the embedding's output (all decoder layers are done) and the
end of the step (embedding backward and, for vanilla, ``optimizer.step``). At each cut the VmHWM since the previous
cut is recorded and reset, so the step's peak is the largest phase peak and the table says where it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from benchmarks.common import reset_peak_rss, rss_kib

PHASES = ("forward", "head+loss bwd", "layers bwd", "embedding bwd+rest")


class PhaseTrace:
    """Records the peak RSS (MiB, minus ``base_kib``) of each phase of the steps run inside :meth:`tracing`."""

    def __init__(self, base_kib: int) -> None:
        self.base_kib = base_kib
        self.peaks: dict[str, float] = {}
        self._handles: list[Any] = []

    def mark(self, phase: str) -> None:
        """Close ``phase``: record the peak since the previous mark, then reset it."""
        peak = (rss_kib("VmHWM") - self.base_kib) / 1024
        self.peaks[phase] = max(peak, self.peaks.get(phase, float("-inf")))
        reset_peak_rss()

    @contextmanager
    def tracing(self, model: nn.Module) -> Iterator[None]:
        """Install the hooks on ``model`` (a ``LlamaForCausalLM``) while the block runs."""
        base: Any = model.model

        def on_norm_input(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if args[0].requires_grad:
                args[0].register_hook(lambda g: self.mark(PHASES[1]))

        def on_embedding_output(module: nn.Module, args: Any, out: Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: self.mark(PHASES[2]))

        self._handles = [
            base.norm.register_forward_pre_hook(on_norm_input),
            base.embed_tokens.register_forward_hook(on_embedding_output),
        ]
        try:
            yield
        finally:
            for handle in self._handles:
                handle.remove()

    def phase_of_peak(self) -> str:
        """The phase with the largest peak."""
        return max(self.peaks, key=lambda k: self.peaks[k])
