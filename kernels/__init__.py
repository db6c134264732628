"""The NeuZip codec: float tensor <-> (rANS-coded exponents, raw sign+mantissa) <-> portable bytes.

No Lightning import here. Backends: ``torch`` (reference), ``cpu`` (numba), ``triton`` (CUDA or interpreter).
This folder installs as ``nz_lightning.kernels`` (never as a top-level ``kernels`` module); the rest of
``nz_lightning`` uses only the names exported here (``nz_lightning/kernels.pyi`` mirrors them for mypy).

Run from the repository root, this folder is also importable by its own name, ``kernels``, which belongs to Hugging
Face's hub-kernels package (transformers >= 5.25 depends on it and imports it). Imported under that name, this file
loads the installed ``kernels`` package in its place, so the folder never shadows it. Where none is installed it
becomes an inert module: no ``__file__``, no version, no submodules, and every attribute access raises an
``AttributeError`` that names ``nz_lightning.kernels``. It cannot simply fail to import: transformers (5.17 to at
least 5.25) finds the folder with ``importlib.util.find_spec("kernels")``, finds no ``kernels`` distribution, imports
it to read a version, and would crash on an ``ImportError``; a module without ``__file__`` or ``__version__`` is what
it takes for "not installed".
"""

import sys

_NOT_THE_PACKAGE = (
    "the repository's kernels/ folder is the NeuZip codec (import it as nz_lightning.kernels), and no other 'kernels' "
    "package is installed"
)


def _not_installed(name: str) -> None:
    """Module ``__getattr__`` of the inert ``kernels`` module: no attribute exists."""
    raise AttributeError(f"module 'kernels' has no attribute {name!r}: {_NOT_THE_PACKAGE}", name=name)


def _load_installed_kernels() -> bool:
    """Put the installed top-level ``kernels`` package (not this folder) in ``sys.modules["kernels"]``.

    Returns:
        Whether another ``kernels`` package is installed (if not, nothing is done).
    """
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # what the import statement returns once this file has run
    spec.loader.exec_module(module)
    return True


if __name__ == "kernels":  # this folder imported by its own name: the name is another package's
    if not _load_installed_kernels():  # none installed: stay an inert module that reads as "not installed"
        __file__ = None  # type: ignore[assignment]
        __path__ = []  # no submodules: ``import kernels.cpu`` fails instead of loading the codec twice
        __getattr__ = _not_installed
else:
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
