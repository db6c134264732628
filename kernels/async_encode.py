"""Lossless compression whose one host read is deferred: ``compress_async`` and ``PendingCompress``.

:func:`~nz_lightning.kernels.compress` reads the tensor's exponent histogram back to the host (``tolist``) before it
can choose the fold, the frequency table and raw or coded; on a GPU that read blocks the host until the device has
run everything queued before it. :func:`compress_async` queues the histogram, copies it into pinned host memory
without blocking (``non_blocking``, after an event) and returns at once. :meth:`PendingCompress.result` makes the
choices and launches the encoder later, when the copy has landed (``ready``) or when the caller needs the result,
waiting for that event only. The bytes are those of ``compress`` with the same options (same histogram, same
choices). For small tensors the constant-mode check (all elements one bit pattern) travels with the histogram, so
the only host read is that one copy; a larger tensor whose histogram has a single symbol (rare) checks it at
``result`` (one more read).

The caller must not modify the tensor before ``result``: it is copied unless ``copy=False``. On CUDA the encoder runs
on the stream that was current at ``compress_async`` (see :meth:`PendingCompress.result`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .compressed import CompressedTensor, _raw, check_options, encode_lossless
from .encode_plan import exponent_counts
from .layout import DEFAULT_PROB_BITS, DEFAULT_STEPS_PER_LANE

__all__ = ["UNIFORM_FLAG_MAX_NUMEL", "PendingCompress", "compress_async", "read_counts"]

UNIFORM_FLAG_MAX_NUMEL = 1 << 16
"""Tensors up to this many elements get their constant-mode flag computed on the device with the histogram."""


def read_counts(host: torch.Tensor) -> list[int]:
    """The values of a host buffer that an asynchronous copy has filled (the caller has waited for its event)."""
    return host.tolist()


class PendingCompress:
    """A lossless compression under way: the histogram is on its way to the host (see the module docstring).

    Attributes:
        device: Device of the tensor being compressed.
        numel: Its number of elements.
    """

    def __init__(
        self,
        x: torch.Tensor,
        impl: Any,
        prob_bits: int,
        steps_per_lane: int,
        host: torch.Tensor | None,
        event: Any = None,
        done: CompressedTensor | None = None,
        stream: Any = None,
    ) -> None:
        self._x: torch.Tensor | None = x
        self._impl = impl
        self._prob_bits = prob_bits
        self._steps = steps_per_lane
        self._host = host
        self._event = event
        self._stream = stream  # the CUDA stream it was started on (the encoder runs there too)
        self._done = done
        self.device = x.device
        self.numel = x.numel()

    @property
    def ready(self) -> bool:
        """True when :meth:`result` would not wait for the device: the histogram has reached the host (always true
        off CUDA, where it was computed synchronously), or the result is taken already."""
        return self._done is not None or self._event is None or bool(self._event.query())

    @property
    def taken(self) -> bool:
        """True once :meth:`result` has run (the tensor and host buffer are released then)."""
        return self._done is not None

    def result(self) -> CompressedTensor:
        """The compressed tensor: the same as ``compress`` with these options. Waits for the histogram copy (only)
        if it has not landed, then chooses the table and launches the encoder; later calls return the same object.

        On CUDA the encoder runs on the stream the compression was started on (where its input was written and
        copied), and the caller's current stream then waits for it, so the result is safe to use on either.
        """
        if self._done is None:
            assert self._x is not None and self._host is not None
            if self._event is not None:
                self._event.synchronize()
            counts = read_counts(self._host)
            x = self._x
            uniform = bool(counts.pop()) if x.numel() <= UNIFORM_FLAG_MAX_NUMEL else None
            with contextlib.nullcontext() if self._stream is None else torch.cuda.stream(self._stream):
                done = encode_lossless(x, self._impl, counts, self._prob_bits, self._steps, uniform)
            if self._stream is not None:
                current = torch.cuda.current_stream(self.device)
                if current != self._stream:
                    current.wait_stream(self._stream)
            self._done = done
            self._x = self._host = self._event = self._stream = None
        return self._done


def compress_async(
    t: torch.Tensor,
    *,
    backend: str | None = None,
    prob_bits: int = DEFAULT_PROB_BITS,
    steps_per_lane: int = DEFAULT_STEPS_PER_LANE,
    copy: bool = True,
) -> PendingCompress:
    """Start compressing ``t`` losslessly, without a host read now; :meth:`PendingCompress.result` finishes.

    Args:
        t: A bfloat16, float16 or float32 tensor of any shape and strides, on CPU or CUDA.
        backend: As for ``compress``.
        prob_bits: As for ``compress``.
        steps_per_lane: As for ``compress``.
        copy: Take a private copy of ``t`` (default). ``False``: use ``t`` itself (contiguous), which the caller
            then must not modify until the result is taken.

    Returns:
        The pending compression.

    Raises:
        TypeError: ``t`` is not a tensor or has an unsupported dtype.
        ValueError: An option is out of range or the backend cannot run on the tensor's device.
    """
    _, impl = check_options(t, backend, prob_bits, steps_per_lane)
    x = t.detach()
    x = x.clone(memory_format=torch.contiguous_format) if copy or not x.is_contiguous() else x
    if x.numel() == 0:
        return PendingCompress(x, impl, prob_bits, steps_per_lane, None, done=_raw(x, steps_per_lane))
    counts = exponent_counts(x, impl, uniform_flag=x.numel() <= UNIFORM_FLAG_MAX_NUMEL)
    if x.device.type != "cuda":
        return PendingCompress(x, impl, prob_bits, steps_per_lane, counts)
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    stream = torch.cuda.current_stream(x.device)
    event = torch.cuda.Event()
    event.record(stream)
    return PendingCompress(x, impl, prob_bits, steps_per_lane, host, event, stream=stream)
