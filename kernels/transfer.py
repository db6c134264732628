"""Host-sync-free plumbing of the device path: asynchronous uploads and deferred consistency checks.

* :func:`upload`: a small host tensor (frequency or decoder tables) to the device, pinned and ``non_blocking`` on
  CUDA, so that the host does not wait for the copy (a pageable copy would block it).
* :func:`decoder_tables`: the default decoder tables, built on the host with sizes known from the frequency table
  (no data-dependent shape) and uploaded with :func:`upload`; the same values as ``FreqTable.decode_tables``.
* :data:`DECODE_CHECKS`: per-device, per-stream error flags that unchecked decodes OR their consistency flag into
  on the device; :meth:`DeferredChecks.check` reads them (one sync per flag) and raises if any is set.
"""

from __future__ import annotations

import threading

import torch

from .freqtable import FreqTable


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a host tensor to ``device`` without blocking the host.

    On CUDA the tensor is staged in pinned memory and copied ``non_blocking`` (the caching host allocator keeps the
    pinned block until the copy has run); elsewhere this is ``host.to(device)``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def decoder_tables(table: FreqTable, alphabet: int, device: torch.device | str) -> torch.Tensor:
    """Decoder tables ``[lut (2^prob_bits) | freq (alphabet) | cum (alphabet)]`` (int32) uploaded to ``device``.

    Equal to ``table.decode_tables(alphabet, device)``: built on the host from the table alone (numpy), so building
    it reads nothing back, then uploaded without blocking.
    """
    return upload(torch.from_numpy(table.decode_tables_array(alphabet)), device)


def _stream_key(device: torch.device) -> tuple[torch.device, int]:
    if device.type == "cuda":
        return device, torch.cuda.current_stream(device).stream_id
    return device, 0


class DeferredChecks:
    """Decode consistency flags accumulated on the device, checked on the host later (at a save, or on demand).

    One int32 flag per (device, stream): decodes on a side stream never race with those on the main stream.
    """

    def __init__(self) -> None:
        self._flags: dict[tuple[torch.device, int], torch.Tensor] = {}
        self._lock = threading.Lock()
        self.failed = False
        """Set when a check found corrupt data; every later check raises too until :meth:`reset`."""

    def flag(self, device: torch.device) -> torch.Tensor:
        """The int32 flag (0-d) of ``device`` and its current stream, created at 0; a decode may OR 1 into it."""
        key = _stream_key(device)
        with self._lock:
            flag = self._flags.get(key)
            if flag is None:
                with torch.inference_mode(False):
                    flag = self._flags[key] = torch.zeros((), dtype=torch.int32, device=device)
        return flag

    def record(self, bad: torch.Tensor) -> None:
        """OR the boolean device scalar ``bad`` (true: corrupt) into this device's and stream's flag (no sync)."""
        self.flag(bad.device).bitwise_or_(bad.to(torch.int32))

    def pending(self) -> int:
        """Number of flags held (each costs one sync to check)."""
        return len(self._flags)

    def check(self) -> None:
        """Read every flag (one device synchronization each device), clear them, and raise if a deferred decode found
        corrupt data.

        A failure is sticky: values computed from the corrupt decode may already be stored (a fused update, an
        encode), so every later check raises too, and a save that checks first refuses, until :meth:`reset`.

        Raises:
            ValueError: Some decode run without its synchronous check was inconsistent (since the last
                :meth:`reset`).
        """
        with self._lock:
            flags, self._flags = self._flags, {}
        for device in {d for d, _ in flags if d.type == "cuda"}:
            torch.cuda.synchronize(device)  # flags of side-stream decodes too: every stream's writes have landed
        bad = any(bool(flag) for flag in flags.values())
        with self._lock:
            self.failed = self.failed or bad
            failed = self.failed
        if failed:
            raise ValueError(
                "corrupt blob: rANS lanes did not decode consistently (deferred check); values computed since may be "
                "wrong: reload them (e.g. from a checkpoint), then call CompressedTensor.reset_deferred()"
            )

    def reset(self) -> None:
        """Forget a reported failure and every pending flag (after the affected values were replaced)."""
        with self._lock:
            self._flags = {}
            self.failed = False


DECODE_CHECKS = DeferredChecks()
"""The process-wide flags of decodes run with ``CompressedTensor.decompress(check=False)``."""
