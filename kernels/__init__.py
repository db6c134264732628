"""The NeuZip codec: float tensor <-> (rANS-coded exponents, raw sign+mantissa) <-> portable bytes.

No Lightning import here. Backends: ``torch`` (reference), ``cpu`` (numba), ``triton`` (CUDA or interpreter).
"""

from .compressed import MODE_CONST, MODE_LOSSY, MODE_RANS, MODE_RAW, CompressedTensor, compress
from .freqtable import FreqTable, entropy_bits, quantize_counts
from .spec import SPECS, FloatSpec, spec_for

__all__ = [
    "MODE_CONST",
    "MODE_LOSSY",
    "MODE_RANS",
    "MODE_RAW",
    "SPECS",
    "CompressedTensor",
    "FloatSpec",
    "FreqTable",
    "compress",
    "entropy_bits",
    "quantize_counts",
    "spec_for",
]
