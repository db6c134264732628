"""nz_lightning: NeuZip compressed training and inference for PyTorch Lightning."""

from kernels import CompressedTensor, compress

__all__ = ["CompressedTensor", "compress"]
__version__ = "0.1.0"
