"""The flat collectives under the installed torch's names (torch 2.13 renamed what FSDP2 calls)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard import _fsdp_collectives

from nz_lightning.distributed.collectives import ALL_GATHER_NAME, REDUCE_SCATTER_NAME, all_gather_flat


def test_names_are_what_fsdp2_calls_in_this_torch() -> None:
    source = inspect.getsource(_fsdp_collectives)
    assert f"dist.{ALL_GATHER_NAME}(" in source and f"dist.{REDUCE_SCATTER_NAME}(" in source
    assert callable(getattr(dist, ALL_GATHER_NAME)) and callable(getattr(dist, REDUCE_SCATTER_NAME))


def test_all_gather_flat_goes_through_the_named_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = getattr(dist, ALL_GATHER_NAME)

    def counted(output: torch.Tensor, local: torch.Tensor, **kwargs: object) -> object:
        calls.append(output.numel())
        return real(output, local, **kwargs)

    monkeypatch.setattr(dist, ALL_GATHER_NAME, counted)  # a byte counter wrapping torch.distributed sees the call
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        local = torch.arange(6, dtype=torch.bfloat16)
        out = torch.empty(6, dtype=torch.bfloat16)
        all_gather_flat(out, local)
        assert torch.equal(out, local) and calls == [6]
    finally:
        dist.destroy_process_group()
