"""The default FSDP2 units of ``shard_model`` (single process: only the selection is checked)."""

from __future__ import annotations

import pytest

from nz_lightning.distributed.fsdp import _default_blocks
from tests.helpers.models import llama


@pytest.mark.parametrize("tied", [False, True])
def test_blocks_embedding_and_head_are_units_unless_tied(tied: bool) -> None:
    units = _default_blocks(llama(tied=tied))
    assert units[:2] == ["model.layers.0", "model.layers.1"]
    assert units[2:] == ([] if tied else ["model.embed_tokens", "lm_head"])  # tied: both stay with the root
