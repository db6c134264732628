"""nz_lightning: NeuZip compressed training and inference for PyTorch Lightning."""

from kernels import CompressedTensor, compress

from .compressed_param import CODEC_STATS, NZParameter, is_compressed
from .convert import compress_model, compressed_parameters, decompress_model

__all__ = [
    "CODEC_STATS",
    "CompressedTensor",
    "NZParameter",
    "compress",
    "compress_model",
    "compressed_parameters",
    "decompress_model",
    "is_compressed",
]
__version__ = "0.1.0"
