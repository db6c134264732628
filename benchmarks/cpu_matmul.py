"""CPU workaround for slow bf16 GEMMs: run bf16 matmuls as fp32 GEMMs with a bf16 result.

On CPUs without AVX-512 BF16 (this project's machines: AVX2 only), PyTorch's bf16 GEMM falls back to
scalar kernels for some layouts (measured 0.3 GFLOP/s for ``mm`` with both operands row-major, vs
~100-150 GFLOP/s for fp32 on two cores). Training a bf16 model on CPU then spends nearly all its time in
those kernels. Inside :class:`Bf16MatmulInFp32`, every bf16 ``mm``/``addmm``/``bmm``/``baddbmm`` upcasts its
operands to fp32, multiplies, and rounds the result to bf16 once: the same numerics as a GPU bf16 GEMM
(fp32 accumulation). The benchmarks apply it to every method alike, so comparisons stay fair.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

_aten = torch.ops.aten
_GEMMS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}


class Bf16MatmulInFp32(TorchDispatchMode):
    """Dispatch mode computing bf16 GEMMs in fp32 (see module docstring)."""

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _GEMMS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            if func is _aten.mm.default and max(args[0].numel(), args[1].numel(), _out_numel(args)) > CHUNK_ELEMENTS:
                return _chunked_mm(args[0], args[1])

            def up(a: Any) -> Any:
                return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a

            return func(*tree_map(up, args), **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


CHUNK_ELEMENTS = 1 << 24
"""GEMMs with an operand or result larger than this (an 8B model's lm_head and its gradient) run in chunks,
so fp32 copies stay at 64 MiB instead of twice the size of the weight."""


def _out_numel(args: tuple[Any, ...]) -> int:
    return int(args[0].shape[0]) * int(args[1].shape[1])


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor with ``t``'s values, decoding a compressed weight once (without a second copy)."""
    from nz_lightning.tensor.parameter import NZParameter

    if isinstance(t, NZParameter):
        return t.store.read().as_strided(*t._view)
    return t


def _chunked_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _dense(a), _dense(b)
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.bfloat16, device=a.device)
    if b.numel() >= a.numel():  # split the columns of b (and of the result)
        af = a.float()
        step = max(1, CHUNK_ELEMENTS // max(1, b.shape[0], a.shape[0]))
        for j in range(0, b.shape[1], step):
            out[:, j : j + step] = torch.mm(af, b[:, j : j + step].float())
    else:  # split the rows of a (and of the result)
        bf = b.float()
        step = max(1, CHUNK_ELEMENTS // max(1, a.shape[1], b.shape[1]))
        for i in range(0, a.shape[0], step):
            out[i : i + step] = torch.mm(a[i : i + step].float(), bf)
    return out
