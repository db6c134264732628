"""The coded parts of one tensor, as every backend produces and consumes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Streams:
    """Coded exponent lanes plus the packed sign+mantissa field of one tensor.

    Attributes:
        states: Final encoder state of each lane (uint32 bit patterns in an int32 tensor), ``[num_lanes]``.
        counts: Words in each lane's stream (uint16 values in an int32 tensor), ``[num_lanes]``.
        words: All lanes' 16-bit words, lane after lane, each lane in decoding order (int16 bit patterns).
        sm: Sign+mantissa fields bit-packed LSB-first, ``ceil(n * sm_bits / 8)`` bytes (uint8).
    """

    states: torch.Tensor
    counts: torch.Tensor
    words: torch.Tensor
    sm: torch.Tensor

    def nbytes(self) -> int:
        """Serialized size of the four arrays (states 4 B, counts 2 B, words 2 B per entry, sm 1 B)."""
        return 4 * self.states.numel() + 2 * self.counts.numel() + 2 * self.words.numel() + self.sm.numel()

    def to(self, device: torch.device | str) -> Streams:
        """Copy of these streams on ``device``."""
        return Streams(self.states.to(device), self.counts.to(device), self.words.to(device), self.sm.to(device))


def word_offsets(counts: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum of lane word counts (int64): where each lane's words start."""
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts.to(torch.int64), 0, out=offsets[1:])
    return offsets
