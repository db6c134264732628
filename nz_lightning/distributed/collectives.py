"""The flat all-gather and reduce-scatter FSDP2 calls, under the name the installed torch gives them.

torch 2.13 added ``torch.distributed.all_gather_single`` / ``reduce_scatter_single`` and FSDP2 calls those; older
releases (2.11 on the GPU machines this project is lent, for instance) have only ``all_gather_into_tensor`` /
``reduce_scatter_tensor``, with the same positional arguments (output, input) and the same result, and FSDP2 calls
those instead. Code that issues these collectives itself, or wraps them to count bytes, goes through this module.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = ["ALL_GATHER_NAME", "REDUCE_SCATTER_NAME", "all_gather_flat"]

ALL_GATHER_NAME = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
"""The ``torch.distributed`` function FSDP2 all-gathers with in this torch."""
REDUCE_SCATTER_NAME = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
"""The ``torch.distributed`` function FSDP2 reduce-scatters with in this torch."""


def all_gather_flat(output: Tensor, local: Tensor, group: Any = None) -> None:
    """Gather every rank's ``local`` (same size on each) into the flat ``output`` (world size x that), rank order.

    Looked up at call time, so a wrapper installed on ``torch.distributed`` (a byte counter) sees the call.
    """
    getattr(dist, ALL_GATHER_NAME)(output, local, group=group)
