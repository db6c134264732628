"""The coded parts of one tensor, as every backend produces and consumes them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Streams:
    """Coded exponent lanes plus the packed sign+mantissa field of one tensor.

    Attributes:
        states: Final encoder state of each lane (uint32 bit patterns in an int32 tensor), ``[num_lanes]``.
        counts: Words in each lane's stream (uint16 values in an int32 tensor), ``[num_lanes]``.
        words: All lanes' 16-bit words, lane after lane, each lane in decoding order (int16 bit patterns).
        sm: Sign+mantissa fields bit-packed LSB-first, ``ceil(n * sm_bits / 8)`` bytes (uint8).
        used: ``None`` when ``words`` is exactly the stream. Otherwise a device int64 scalar, the stream's length:
            ``words`` is then a buffer of at least that many words (an encoder that sized it from an upper bound,
            so as not to read the total back), trimmed by :meth:`settle` when the host needs the exact words.
    """

    states: torch.Tensor
    counts: torch.Tensor
    words: torch.Tensor
    sm: torch.Tensor
    used: torch.Tensor | None = None
    offsets: torch.Tensor | None = field(default=None, compare=False, repr=False)
    plan: Any = field(default=None, compare=False, repr=False)
    """A backend's launch arguments for decoding these streams, kept between decodes (dropped with the words)."""

    def settle(self, total: int | None = None) -> Streams:
        """Trim ``words`` to the stream's length if it is a larger buffer (one host read, once); returns ``self``.

        Args:
            total: The value of ``used`` when the caller has read it already (:func:`settle_streams`).

        Raises:
            ValueError: The stream is longer than its buffer (the encoder's bound was violated: data lost).
        """
        if self.used is not None:
            total = int(self.used) if total is None else total
            if total > self.words.numel():
                raise ValueError(f"rANS word stream of {total} words overflowed its {self.words.numel()}-word buffer")
            words = self.words if total == self.words.numel() else self.words[:total].clone()  # free the slack
            self.words, self.used, self.plan = words, None, None
        return self

    def nbytes(self) -> int:
        """Serialized size of the four arrays (states 4 B, counts 2 B, words 2 B per entry, sm 1 B)."""
        self.settle()
        return 4 * self.states.numel() + 2 * self.counts.numel() + 2 * self.words.numel() + self.sm.numel()

    def to(self, device: torch.device | str) -> Streams:
        """Copy of these streams on ``device``."""
        used = None if self.used is None else self.used.to(device)
        return Streams(self.states.to(device), self.counts.to(device), self.words.to(device), self.sm.to(device), used)


def word_offsets(counts: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum of lane word counts (int64): where each lane's words start."""
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts.to(torch.int64), 0, out=offsets[1:])
    return offsets


def settle_streams(streams: Iterable[Streams | None]) -> None:
    """:meth:`Streams.settle` every stream, reading all pending word totals back at once (one host sync, or none).

    Raises:
        ValueError: A stream overflowed its buffer (see :meth:`Streams.settle`).
    """
    pending = [st for st in streams if st is not None and st.used is not None]
    if not pending:
        return
    totals = torch.stack([st.used.reshape(()).to(torch.int64) for st in pending if st.used is not None]).tolist()
    for st, total in zip(pending, totals, strict=True):
        st.settle(total)
