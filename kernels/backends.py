"""Backend contract and registry: one set of codec ops, implemented by a pure-torch reference, numba and Triton.

Every backend is an object satisfying :class:`CodecBackend` (the ops' signatures and what each must produce) and
registered by name in ``_REGISTRY`` (the only list of backend names, :data:`BACKENDS`), together with the module
that defines it as ``BACKEND`` and the devices it runs on. Modules are imported on first use, so numba and Triton
load only when their backend is chosen. Backends usually subclass :class:`CodecBackend`, inheriting its defaults:
the torch reference's decoder tables and no lossy fast path (the shared torch code in ``kernels.lossy`` runs).
Adding a backend: a module with ``BACKEND = MyBackend()`` and one ``_REGISTRY`` line.
"""

from __future__ import annotations

import importlib
import os
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .freqtable import FreqTable
from .spec import FloatSpec
from .streams import Streams
from .transfer import decoder_tables


@runtime_checkable
class LossyOps(Protocol):
    """A backend's own loops for the lossy mode, byte-identical to the torch code in ``kernels.lossy``."""

    @abstractmethod
    def quantize(
        self, x: torch.Tensor, spec: FloatSpec, mantissa_bits: int, block_size: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Quantize a flat contiguous tensor, as :func:`kernels.lossy.quantize`.

        Returns:
            ``(q, scales, nan_index)``: grid bit patterns (any integer dtype :meth:`fields` reads), block scale
            fields (int64 ``[num_blocks]`` or ``None``) and the NaN positions (int64).
        """
        ...

    @abstractmethod
    def fields(self, q: torch.Tensor, spec: FloatSpec, mantissa_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The exponent carrier tensor and the packed ``1 + mantissa_bits``-bit sign+mantissa fields of ``q``."""
        ...

    @abstractmethod
    def decode_exponents(
        self, streams: Streams, spec: FloatSpec, tables: torch.Tensor, prob_bits: int, steps: int, out: torch.Tensor
    ) -> None:
        """Decode only the exponents of the carrier layout ``spec`` into ``out`` (``streams.sm`` is not read).

        Raises:
            ValueError: The rANS lanes are inconsistent (corrupt).
        """
        ...

    @abstractmethod
    def merge(
        self,
        carrier: torch.Tensor,
        sm: torch.Tensor,
        spec: FloatSpec,
        mantissa_bits: int,
        block_size: int | None,
        scales: torch.Tensor | None,
        out: torch.Tensor,
    ) -> None:
        """Write the decoded values (NaNs still as inf) of carrier exponents, packed fields and scales to ``out``.

        ``carrier`` may be a view of ``out`` (each element is read before it is overwritten).
        """
        ...


@runtime_checkable
class CodecBackend(Protocol):
    """The ops every backend implements; all backends write the same bytes as the torch reference.

    Subclass it to inherit the defaults of :meth:`decode_tables` and :meth:`lossy_ops`; the abstract ops must be
    implemented (a subclass missing one cannot be instantiated).

    Attributes:
        name: The registry name (``"torch"``, ``"cpu"``, ``"triton"``); keys the decoder-table cache.
    """

    name: str

    @abstractmethod
    def exponent_histogram(self, x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
        """Counts of each exponent symbol of ``spec`` in ``x`` (int64 ``[spec.alphabet]``)."""
        ...

    @abstractmethod
    def encode(self, x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int) -> Streams:
        """rANS-encode the exponents of contiguous ``x`` (at least one element) and pack its sign+mantissa fields.

        Args:
            x: A tensor of dtype ``spec.dtype`` on a device this backend runs on.
            spec: The layout to code (native, folded or lossy carrier).
            table: Frequency table covering every symbol present in ``x``.
            steps: Symbols per rANS lane (``steps_per_lane``).
        """
        ...

    def encode_bounded(self, x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int, max_words: int) -> Streams:
        """:meth:`encode` when the caller knows the stream holds at most ``max_words`` words.

        A device backend may then size the word buffer from the bound instead of reading the total back (no host
        sync), returning streams whose ``used`` holds the length (see :class:`~kernels.streams.Streams`). Default:
        :meth:`encode` (exact words).
        """
        return self.encode(x, spec, table, steps)

    def decode_tables(self, table: FreqTable, spec: FloatSpec, device: torch.device) -> torch.Tensor:
        """Lookup tables :meth:`decode` uses for ``table`` (cached by ``CompressedTensor`` for large tensors).

        Default, the torch reference's layout: int32 ``[lut (2^prob_bits) | freq (alphabet) | cum (alphabet)]``,
        built on the host and uploaded without blocking it (:func:`kernels.transfer.decoder_tables`).
        """
        return decoder_tables(table, spec.alphabet, device)

    @abstractmethod
    def decode(
        self, streams: Streams, spec: FloatSpec, tables: torch.Tensor, prob_bits: int, steps: int, out: torch.Tensor
    ) -> None:
        """Decode into the flat contiguous float tensor ``out`` (``tables`` from :meth:`decode_tables`).

        Raises:
            ValueError: A lane reads past its words, or does not end in the initial state with all words used.
        """
        ...

    def decode_flagged(
        self,
        streams: Streams,
        spec: FloatSpec,
        tables: torch.Tensor,
        prob_bits: int,
        steps: int,
        out: torch.Tensor,
        flag: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """:meth:`decode` without waiting for its consistency check (no host sync on a device backend).

        ``flag``, if given, is an int32 device tensor of one element (a per-stream error flag) that the backend ORs
        1 into when the lanes are inconsistent, instead of returning its own flag.

        Returns:
            A boolean device scalar, true when the lanes did not decode consistently (``out`` then holds garbage),
            or ``None`` when ``flag`` was given or the backend checked on the host already. Default: :meth:`decode`
            (which raises).

        Raises:
            ValueError: The array sizes do not match the layout (checked on the host), or (default) corrupt data.
        """
        self.decode(streams, spec, tables, prob_bits, steps, out)
        return None

    def lossy_ops(self, spec: FloatSpec) -> LossyOps | None:
        """This backend's own lossy loops for ``spec``, or ``None`` (default) to run the shared torch code."""
        return None


class FunctionBackend(CodecBackend):
    """A backend whose three required ops are module-level functions (the torch reference and Triton).

    Args:
        name: The registry name.
        exponent_histogram: Implements :meth:`CodecBackend.exponent_histogram`.
        encode: Implements :meth:`CodecBackend.encode`.
        decode: Implements :meth:`CodecBackend.decode`.
        decode_flagged: Implements :meth:`CodecBackend.decode_flagged` (``None``: the default, via ``decode``).
        encode_bounded: Implements :meth:`CodecBackend.encode_bounded` (``None``: the default, via ``encode``).
    """

    def __init__(
        self,
        name: str,
        exponent_histogram: Callable[[torch.Tensor, FloatSpec], torch.Tensor],
        encode: Callable[[torch.Tensor, FloatSpec, FreqTable, int], Streams],
        decode: Callable[[Streams, FloatSpec, torch.Tensor, int, int, torch.Tensor], None],
        decode_flagged: Callable[
            [Streams, FloatSpec, torch.Tensor, int, int, torch.Tensor, torch.Tensor | None], torch.Tensor | None
        ]
        | None = None,
        encode_bounded: Callable[[torch.Tensor, FloatSpec, FreqTable, int, int], Streams] | None = None,
    ) -> None:
        self.name = name
        self._histogram, self._encode, self._decode = exponent_histogram, encode, decode
        self._decode_flagged, self._encode_bounded = decode_flagged, encode_bounded

    def exponent_histogram(self, x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
        return self._histogram(x, spec)

    def encode(self, x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int) -> Streams:
        return self._encode(x, spec, table, steps)

    def encode_bounded(self, x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int, max_words: int) -> Streams:
        if self._encode_bounded is None:
            return super().encode_bounded(x, spec, table, steps, max_words)
        return self._encode_bounded(x, spec, table, steps, max_words)

    def decode(
        self, streams: Streams, spec: FloatSpec, tables: torch.Tensor, prob_bits: int, steps: int, out: torch.Tensor
    ) -> None:
        self._decode(streams, spec, tables, prob_bits, steps, out)

    def decode_flagged(
        self,
        streams: Streams,
        spec: FloatSpec,
        tables: torch.Tensor,
        prob_bits: int,
        steps: int,
        out: torch.Tensor,
        flag: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        if self._decode_flagged is None:
            return super().decode_flagged(streams, spec, tables, prob_bits, steps, out, flag)
        return self._decode_flagged(streams, spec, tables, prob_bits, steps, out, flag)


def _anywhere(device: torch.device) -> str | None:
    return None


def _cpu_only(device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"backend 'cpu' runs on CPU tensors only, got a tensor on {device}"


def _cuda_or_interpreter(device: torch.device) -> str | None:
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"backend 'triton' needs a CUDA tensor (got {device}); on CPU it runs only under TRITON_INTERPRET=1"


@dataclass(frozen=True)
class _Registration:
    module: str
    """Module (relative to this package) defining the backend object as ``BACKEND``, imported on first use."""
    device_error: Callable[[torch.device], str | None]
    """Why the backend cannot run on a device, or ``None`` when it can (checked before the import)."""


_REGISTRY: dict[str, _Registration] = {
    "torch": _Registration(".reference", _anywhere),
    "cpu": _Registration(".cpu_backend", _cpu_only),
    "triton": _Registration(".triton_backend", _cuda_or_interpreter),
}
BACKENDS: tuple[str, ...] = tuple(_REGISTRY)
"""Names of the registered backends (``compress(backend=...)`` choices)."""
_LOADED: dict[str, CodecBackend] = {}


def default_backend(device: torch.device) -> str:
    """The backend used when none is forced: Triton for CUDA tensors, numba for CPU, torch otherwise."""
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "cpu"
    return "torch"


def check_device(name: str, device: torch.device) -> None:
    """Check that the registered backend ``name`` can run on ``device``.

    Raises:
        ValueError: Unknown backend name, or a backend that cannot run on this device.
    """
    registration = _REGISTRY.get(name)
    if registration is None:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    error = registration.device_error(device)
    if error is not None:
        raise ValueError(error)


def get_backend(name: str | None, device: torch.device) -> CodecBackend:
    """Resolve a backend name (or None for the default) to its backend object, checking it can run on ``device``.

    Raises:
        ValueError: Unknown backend name, or a backend that cannot run on this device.
    """
    chosen = default_backend(device) if name is None else name
    check_device(chosen, device)
    backend = _LOADED.get(chosen)
    if backend is None:
        module = importlib.import_module(_REGISTRY[chosen].module, __package__)
        backend = module.BACKEND
        if not isinstance(backend, CodecBackend) or backend.name != chosen:
            raise TypeError(f"{module.__name__}.BACKEND is not a CodecBackend named {chosen!r}")
        _LOADED[chosen] = backend
    return backend
