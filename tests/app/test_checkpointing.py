"""``enable_activation_checkpointing`` under both transformers API generations."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from nz_lightning.lm.checkpointing import enable_activation_checkpointing
from tests.helpers.models import build


class _Config:
    use_cache = True


class _Old:  # transformers <= 5.17: only the old name
    def __init__(self) -> None:
        self.config, self.calls = _Config(), []

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.calls.append(("gradient", kwargs))


class _New(_Old):  # transformers >= 5.25: both names, the old one deprecated
    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        self.calls.append(("activation", kwargs))


@pytest.mark.parametrize(("cls", "want"), [(_Old, "gradient"), (_New, "activation")])
def test_uses_the_newest_name_there_is(cls: type[_Old], want: str) -> None:
    model = cls()
    enable_activation_checkpointing(model, use_reentrant=True)
    assert model.calls == [(want, {f"{want}_checkpointing_kwargs": {"use_reentrant": True}})]
    assert model.config.use_cache is False


def test_on_a_real_model_without_deprecation_warnings() -> None:
    model = build("llama-tied-bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated name, no use_cache notice
        enable_activation_checkpointing(model)
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    assert getattr(model, flag) and model.config.use_cache is False
