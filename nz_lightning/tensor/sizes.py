"""One weight-size accounting for every report: callback, CLI, train summary, evaluation, baselines, benchmarks.

Four quantities, always under these names:

* ``numel``: weight elements (each tied tensor once).
* ``dense_bytes``: the same elements stored dense in their dtype (``numel * itemsize``).
* ``serialized_bytes``: what the weights take written out: a compressed tensor's blob (header, tables, payload,
  checksum; :func:`nz_lightning.kernels.serialized_size`), any other weight's own bytes.
* ``held_bytes``: what the weights hold in memory now: the serialized form plus the decoder lookup tables that
  decodes have cached (32 KiB per large tensor on CPU; matters only for tiny models).

``bits_per_weight`` is always ``8 * serialized_bytes / numel``, the figure :attr:`CompressedTensor.bits_per_weight`
and the CLI report. Weights held in other forms (the int8 baseline) count themselves by implementing
:class:`SizedWeight`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn

from nz_lightning.tensor.parameter import NZParameter, WeightStore

__all__ = ["SizedWeight", "WeightSizes", "store_sizes", "weight_sizes"]


@runtime_checkable
class SizedWeight(Protocol):
    """A module holding one weight in a form of its own (e.g. int8 + scales) that reports its size."""

    def weight_sizes(self) -> WeightSizes:
        """The sizes of the weight this module holds."""
        ...


@dataclass(frozen=True)
class WeightSizes:
    """Sizes of a set of weights (see the module docstring for what each quantity means).

    Attributes:
        numel: Weight elements.
        dense_bytes: Bytes of the same elements dense in their dtype.
        serialized_bytes: Bytes written out.
        held_bytes: Bytes held in memory now.
        compressed_tensors: How many of the weights are NeuZip-compressed.
        compressed_numel: Elements of those.
        compressed_dense_bytes: Dense bytes of those.
    """

    numel: int = 0
    dense_bytes: int = 0
    serialized_bytes: int = 0
    held_bytes: int = 0
    compressed_tensors: int = 0
    compressed_numel: int = 0
    compressed_dense_bytes: int = 0

    def __add__(self, other: WeightSizes) -> WeightSizes:
        return WeightSizes(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, ...]:
        """The fields in declaration order."""
        return (
            self.numel,
            self.dense_bytes,
            self.serialized_bytes,
            self.held_bytes,
            self.compressed_tensors,
            self.compressed_numel,
            self.compressed_dense_bytes,
        )

    @property
    def bits_per_weight(self) -> float:
        """Serialized bits per element (0 for no elements)."""
        return 8.0 * self.serialized_bytes / self.numel if self.numel else 0.0

    @property
    def ratio_to_dense(self) -> float:
        """``serialized_bytes / dense_bytes`` (1 for no weights)."""
        return self.serialized_bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        """``dense_bytes / serialized_bytes``, the inverse of :attr:`ratio_to_dense` (1 for no weights)."""
        return self.dense_bytes / self.serialized_bytes if self.serialized_bytes else 1.0

    @staticmethod
    def dense(numel: int, itemsize: int) -> WeightSizes:
        """Sizes of an uncompressed weight: every quantity is ``numel * itemsize``."""
        nbytes = numel * itemsize
        return WeightSizes(numel, nbytes, nbytes, nbytes)


def store_sizes(store: WeightStore) -> WeightSizes:
    """Sizes of one compressed weight (all its row blocks)."""
    numel = math.prod(store.shape)
    dense = numel * store.dtype.itemsize
    return WeightSizes(numel, dense, store.serialized_nbytes, store.nbytes, 1, numel, dense)


def weight_sizes(module: nn.Module, include: Iterable[str] | None = None) -> WeightSizes:
    """Sizes of a module's weights: its parameters (each tied one once) and its :class:`SizedWeight` submodules.

    Buffers that are not weights (rotary ``inv_freq``, masks) are not counted. Of a parameter sharded by FSDP2
    (a ``DTensor``), the shard this process holds is counted.

    Args:
        module: Any module, compressed or not.
        include: Only these parameter names (``named_parameters`` names), e.g. the compressed ones; default all.
    """
    wanted = None if include is None else set(include)
    total = WeightSizes()
    seen: set[int] = set()
    for name, p in module.named_parameters():  # tied parameters are yielded once
        if wanted is not None and name not in wanted:
            continue
        p = getattr(p, "_local_tensor", p)  # an FSDP2-sharded parameter (DTensor): this rank's shard
        if isinstance(p, NZParameter):
            if id(p.store) in seen:
                continue
            seen.add(id(p.store))
            total += store_sizes(p.store)
        else:
            total += WeightSizes.dense(p.numel(), p.element_size())
    if wanted is None:
        for m in module.modules():  # shared modules are yielded once
            if isinstance(m, SizedWeight) and not isinstance(m, nn.Parameter):
                total += m.weight_sizes()
    return total
