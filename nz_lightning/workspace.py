"""Reusable decode buffers: weights are decoded into a few long-lived buffers, never fresh allocations."""

from __future__ import annotations

import math
import threading

import torch


class WorkspacePool:
    """Flat buffers per (dtype, device), handed out for the duration of one op and then returned.

    A buffer is only reused after it is released, so two compressed arguments of one op never share one.
    At most ``keep`` free buffers per key are retained, each of at most ``max_bytes`` (larger requests get a
    buffer that is freed on release: a large embedding should not stay resident as a workspace).
    """

    def __init__(self, keep: int = 1, max_bytes: int = 64 * 2**20) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self._free: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def acquire(
        self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A contiguous tensor of ``shape`` backed by a pooled buffer (contents undefined), and that buffer.

        Pass the buffer (second item) to :meth:`release` when done.
        """
        numel = math.prod(shape)
        key = (dtype, torch.device(device))
        with self._lock:
            free = self._free.setdefault(key, [])
            fits = [b for b in free if b.numel() >= numel]
            if fits:
                buf = min(fits, key=lambda b: b.numel())
                free.remove(buf)
            else:
                if free:
                    free.remove(max(free, key=lambda b: b.numel()))  # replace the largest too-small buffer
                buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
        return buf[:numel].view(shape), buf

    def release(self, base: torch.Tensor) -> None:
        """Return a buffer obtained from :meth:`acquire`."""
        key = (base.dtype, base.device)
        if base.numel() * base.element_size() > self.max_bytes:
            return
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < self.keep:
                free.append(base)

    def clear(self) -> None:
        """Drop every pooled buffer."""
        with self._lock:
            self._free.clear()

    def nbytes(self) -> int:
        """Bytes held by free pooled buffers."""
        with self._lock:
            return sum(b.numel() * b.element_size() for bufs in self._free.values() for b in bufs)
