"""Lane layout of the rANS exponent stream and the coder's constants (shared by every backend).

A tensor's ``n`` exponent symbols are cut into segments of ``LANES_PER_SEGMENT * steps`` symbols. Inside
a segment, symbol ``s * LANES_PER_SEGMENT + j`` (local index) belongs to lane ``j`` at step ``s``: the 32
lanes of a segment are interleaved so that one decoding step of all lanes writes 32 consecutive values.
Every lane is an independent rANS stream with its own final state and its own word stream.
"""

from __future__ import annotations

import torch

LANES_PER_SEGMENT = 32
"""Interleaved lanes per segment (one GPU warp, one CPU unrolled group)."""
STATE_LOWER = 1 << 16
"""Lower bound L of the normalized rANS state interval [L, 2^32); also every lane's initial state."""
WORD_BITS = 16
"""Renormalization moves 16-bit words; with prob_bits <= 16 at most one word per symbol."""
DEFAULT_PROB_BITS = 12
"""Frequencies are quantized to sum to 2^prob_bits."""
MIN_PROB_BITS = 8
MAX_PROB_BITS = 15
DEFAULT_STEPS_PER_LANE = 2048
"""Symbols per lane: 48 bits of lane overhead (state + word count) per 2048 symbols = 0.023 bit/weight."""
MAX_STEPS_PER_LANE = 65535
"""Word counts are stored as uint16, and a lane emits at most one word per symbol."""


def num_segments(n: int, steps: int) -> int:
    """Number of segments for ``n`` symbols with ``steps`` symbols per lane."""
    seg = LANES_PER_SEGMENT * steps
    return -(-n // seg)


def num_lanes(n: int, steps: int) -> int:
    """Number of lanes (32 per segment) for ``n`` symbols."""
    return LANES_PER_SEGMENT * num_segments(n, steps)


def lane_lengths(n: int, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Symbols held by each lane, as int64 of shape ``[num_lanes]``.

    All segments but the last hold ``steps`` symbols per lane; in the last one, lane ``j`` holds
    ``ceil((r - j) / 32)`` symbols where ``r`` is the number of symbols left (0 when ``j >= r``).
    """
    nseg = num_segments(n, steps)
    lengths = torch.full((nseg, LANES_PER_SEGMENT), steps, dtype=torch.int64, device=device)
    if nseg:
        rest = n - (nseg - 1) * LANES_PER_SEGMENT * steps
        j = torch.arange(LANES_PER_SEGMENT, dtype=torch.int64, device=device)
        lengths[-1] = torch.clamp(rest - j + LANES_PER_SEGMENT - 1, min=0) // LANES_PER_SEGMENT
    return lengths.reshape(-1)


def effective_steps(n: int, steps: int) -> int:
    """Steps a decoder must run: ``steps``, or fewer when the whole tensor fits in one short segment."""
    return min(steps, -(-n // LANES_PER_SEGMENT))
