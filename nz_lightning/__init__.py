"""nz_lightning: NeuZip compressed training and inference for PyTorch Lightning."""

from kernels import CompressedTensor, compress

from .callbacks import NeuZipStats
from .compressed_param import CODEC_STATS, NZParameter, is_compressed
from .convert import compress_model, compressed_parameters, decompress_model
from .model_file import ModelFileReport, load_compressed, save_compressed
from .optim import FusedOptimizer, fused_optimizer
from .strategy import NeuZipStrategy

__all__ = [
    "CODEC_STATS",
    "CompressedTensor",
    "FusedOptimizer",
    "ModelFileReport",
    "NZParameter",
    "NeuZipStats",
    "NeuZipStrategy",
    "compress",
    "compress_model",
    "compressed_parameters",
    "decompress_model",
    "fused_optimizer",
    "is_compressed",
    "load_compressed",
    "save_compressed",
]
__version__ = "0.1.0"
