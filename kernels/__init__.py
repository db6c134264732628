"""The NeuZip codec: float tensor <-> (rANS-coded exponents, raw sign+mantissa) <-> portable bytes.

No Lightning import here. Backends: ``torch`` (reference), ``cpu`` (numba), ``triton`` (CUDA or interpreter).
This folder installs as ``nz_lightning.kernels`` (never as a top-level ``kernels`` module); the rest of
``nz_lightning`` uses only the names exported here (``nz_lightning/kernels.pyi`` mirrors them for mypy).
"""

from .async_encode import PendingCompress, compress_async
from .backends import BACKENDS
from .blob import PEEK_BYTES, serialized_size
from .blob import peek as peek_blob
from .compressed import MODE_CONST, MODE_LOSSY, MODE_RANS, MODE_RAW, CompressedTensor, compress
from .freqtable import FreqTable, entropy_bits, quantize_counts
from .lossy import DEFAULT_BLOCK_SIZE
from .spec import SPECS, FloatSpec, spec_for
from .streams import settle_streams

__all__ = [
    "BACKENDS",
    "DEFAULT_BLOCK_SIZE",
    "MODE_CONST",
    "MODE_LOSSY",
    "MODE_RANS",
    "MODE_RAW",
    "PEEK_BYTES",
    "SPECS",
    "CompressedTensor",
    "FloatSpec",
    "FreqTable",
    "PendingCompress",
    "compress",
    "compress_async",
    "entropy_bits",
    "peek_blob",
    "quantize_counts",
    "serialized_size",
    "settle_streams",
    "spec_for",
]
