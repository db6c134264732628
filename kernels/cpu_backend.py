"""The ``"cpu"`` backend: the numba loops of ``kernels.cpu`` (rANS) and ``kernels.cpu_lossy`` behind the contract.

Unlike the torch and Triton backends it has its own decoder tables (per-slot entries, see
:func:`kernels.cpu.decode_tables`) and its own lossy loops for every dtype it supports.
"""

from __future__ import annotations

import torch

from . import cpu, cpu_lossy
from .backends import CodecBackend, LossyOps
from .freqtable import FreqTable
from .spec import FloatSpec
from .streams import Streams


class CpuLossyOps(LossyOps):
    """numba lossy loops (``kernels.cpu_lossy``); the grid bit patterns are uint16 / uint32 numpy-backed tensors."""

    def quantize(
        self, x: torch.Tensor, spec: FloatSpec, mantissa_bits: int, block_size: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        return cpu_lossy.quantize(x, spec, mantissa_bits, block_size)

    def fields(self, q: torch.Tensor, spec: FloatSpec, mantissa_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cpu_lossy.fields(q, spec, mantissa_bits)

    def decode_exponents(
        self, streams: Streams, spec: FloatSpec, tables: torch.Tensor, prob_bits: int, steps: int, out: torch.Tensor
    ) -> None:
        cpu.decode(streams, spec, tables, prob_bits, steps, out, fields=False)

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
        cpu_lossy.merge(carrier, sm, spec, mantissa_bits, block_size, scales, out)


class CpuBackend(CodecBackend):
    """numba on CPU tensors: SIMD rANS lanes, its own decoder tables, lossy loops for bf16, fp16 and fp32."""

    name = "cpu"

    def __init__(self) -> None:
        self._lossy = CpuLossyOps()

    def exponent_histogram(self, x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
        return cpu.exponent_histogram(x, spec)

    def encode(self, x: torch.Tensor, spec: FloatSpec, table: FreqTable, steps: int) -> Streams:
        return cpu.encode(x, spec, table, steps)

    def decode_tables(self, table: FreqTable, spec: FloatSpec, device: torch.device) -> torch.Tensor:
        return cpu.decode_tables(table, spec, device)

    def decode(
        self, streams: Streams, spec: FloatSpec, tables: torch.Tensor, prob_bits: int, steps: int, out: torch.Tensor
    ) -> None:
        cpu.decode(streams, spec, tables, prob_bits, steps, out)

    def lossy_ops(self, spec: FloatSpec) -> LossyOps | None:
        return self._lossy if cpu_lossy.supported(spec) else None


BACKEND = CpuBackend()
"""The ``"cpu"`` entry of the backend registry."""
