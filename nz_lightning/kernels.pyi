# Type-checking view of ``nz_lightning.kernels`` for mypy (never imported at run time).
# The codec's source is the top-level ``kernels/`` folder, installed as ``nz_lightning.kernels`` by setuptools'
# package-dir mapping, which mypy cannot follow; mypy checks that folder as ``kernels`` (pyproject ``files``),
# and this stub re-exports its public API under the installed name. Keep it equal to ``kernels.__all__``
# (tests/app/test_packaging.py checks).
from kernels import BACKENDS as BACKENDS
from kernels import DEFAULT_BLOCK_SIZE as DEFAULT_BLOCK_SIZE
from kernels import MODE_CONST as MODE_CONST
from kernels import MODE_LOSSY as MODE_LOSSY
from kernels import MODE_RANS as MODE_RANS
from kernels import MODE_RAW as MODE_RAW
from kernels import PEEK_BYTES as PEEK_BYTES
from kernels import SPECS as SPECS
from kernels import CompressedTensor as CompressedTensor
from kernels import FloatSpec as FloatSpec
from kernels import FreqTable as FreqTable
from kernels import PendingCompress as PendingCompress
from kernels import compress as compress
from kernels import compress_async as compress_async
from kernels import entropy_bits as entropy_bits
from kernels import peek_blob as peek_blob
from kernels import quantize_counts as quantize_counts
from kernels import serialized_size as serialized_size
from kernels import settle_streams as settle_streams
from kernels import spec_for as spec_for
