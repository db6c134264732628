"""Test setup: Triton runs under its interpreter where there is no GPU (set before any kernel is defined)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _fresh_decode_checks() -> None:
    """Each test starts with no deferred decode flag and no reported failure (a failure is sticky by design)."""
    from nz_lightning.kernels.transfer import DECODE_CHECKS

    DECODE_CHECKS.reset()


@pytest.fixture
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's warnings about tiny test setups (few workers, no val loader, ckpt_path callbacks)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
        warnings.filterwarnings("ignore", ".*but have no `val_dataloader`.*")
        warnings.filterwarnings("ignore", ".*when using `ckpt_path`, callbacks used to create the checkpoint.*")
        yield


@pytest.fixture
def restore_cpu_threads() -> Iterator[None]:
    """train() sets the torch and numba thread counts (cpu_threads=1 on the CPU trainer); undo that afterwards."""
    import numba

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    yield
    torch.set_num_threads(threads)
    numba.set_num_threads(numba_threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU-marked tests when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
