"""The default FSDP2 units of ``shard_model`` (single process: only the selection is checked)."""

from __future__ import annotations

import pytest

from nz_lightning.distributed.fsdp_units import _default_blocks, select_units
from tests.helpers.models import llama


@pytest.mark.parametrize("tied", [False, True])
def test_blocks_embedding_and_head_are_units_unless_tied(tied: bool) -> None:
    units = _default_blocks(llama(tied=tied))
    assert units[:2] == ["model.layers.0", "model.layers.1"]
    assert units[2:] == ([] if tied else ["model.embed_tokens", "lm_head"])  # tied: both stay with the root


def test_per_weight_units_add_every_projection_inside_the_blocks() -> None:
    model = llama()
    layers = _default_blocks(model)
    weights = _default_blocks(model, per_weight=True)
    projections = [n for n in weights if n not in layers]
    assert set(layers) <= set(weights)
    assert len(projections) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(n.startswith("model.layers.") and n.endswith("_proj") for n in projections)
    chosen = select_units(model, "weights")
    names = {id(m): n for n, m in model.named_modules()}
    order = [names[id(m)] for m in chosen]
    assert set(order) == set(weights)
    assert order.index("model.layers.0.mlp.up_proj") < order.index("model.layers.0")  # children before parents
    assert [names[id(m)] for m in select_units(model, "layers")] == [names[id(m)] for m in select_units(model, None)]
    with pytest.raises(ValueError, match="'weights'"):
        select_units(model, "projections")
