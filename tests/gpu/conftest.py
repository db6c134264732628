"""The GPU suite checks the compiled Triton kernels: running it under the Triton interpreter is an error."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _compiled_triton() -> None:
    """Fail (not skip) a GPU test that would run interpreted Triton kernels (set only where CUDA is missing)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("the GPU suite must run compiled Triton kernels: unset TRITON_INTERPRET (make test-gpu does)")
