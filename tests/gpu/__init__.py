"""GPU test suite (``pytest -m gpu``, ``make test-gpu``): compiled Triton on CUDA; skipped where there is no CUDA."""
