"""The weight-size accounting (``nz_lightning.tensor.sizes``): numel, dense, serialized and held bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nz_lightning.kernels import compress
from nz_lightning.lm.baselines import Int8Weight, quantize_rowwise_int8
from nz_lightning.tensor.convert import compress_model, compressed_parameters
from nz_lightning.tensor.parameter import WeightStore
from nz_lightning.tensor.sizes import SizedWeight, WeightSizes, store_sizes, weight_sizes

BACKEND = "torch"  # the reference backend: no JIT warm-up


class Net(nn.Module):
    """Embedding, a biased Linear, a norm and an optionally tied head."""

    def __init__(self, tied: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 32)
        self.fc = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 64, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        self.register_buffer("mask", torch.ones(16, 16))  # not a weight: never counted
        self.to(dtype)


def _numel(tied: bool) -> int:
    return 64 * 32 * (1 if tied else 2) + 32 * 32 + 32 + 2 * 32


def test_empty_sizes() -> None:
    empty = weight_sizes(nn.ReLU())
    assert empty == WeightSizes() and empty.bits_per_weight == 0.0
    assert empty.ratio_to_dense == empty.compression_ratio == 1.0


@pytest.mark.parametrize("tied", [False, True])
def test_dense_model(tied: bool) -> None:
    sizes = weight_sizes(Net(tied))
    assert sizes == WeightSizes.dense(_numel(tied), 2)  # bf16: every quantity is 2 bytes per element, tied once
    assert sizes.bits_per_weight == 16.0 and sizes.ratio_to_dense == sizes.compression_ratio == 1.0
    assert weight_sizes(Net(tied, torch.float32)) == WeightSizes.dense(_numel(tied), 4)


@pytest.mark.parametrize("tied", [False, True])
def test_compressed_model(tied: bool) -> None:
    model = compress_model(Net(tied), backend=BACKEND)
    compressed = compressed_parameters(model)
    assert len(compressed) == 3 - tied  # emb (= head when tied), fc, head; biases and norms stay dense
    sizes = weight_sizes(model)
    stores = [p.store for _, p in compressed]
    serialized = sum(sum(len(b) for b in s.to_blobs()) for s in stores)
    rest = 32 + 2 * 32  # bias and norm, bf16
    assert sizes.numel == _numel(tied) and sizes.dense_bytes == 2 * _numel(tied)
    assert sizes.serialized_bytes == serialized + 2 * rest
    assert sizes.held_bytes == sum(s.nbytes for s in stores) + 2 * rest
    assert sizes.held_bytes >= sizes.serialized_bytes
    assert sizes.compressed_tensors == len(compressed)
    assert sizes.compressed_numel == sizes.numel - rest and sizes.compressed_dense_bytes == 2 * sizes.compressed_numel
    assert sizes.bits_per_weight == 8 * sizes.serialized_bytes / sizes.numel
    assert sizes.compression_ratio == sizes.dense_bytes / sizes.serialized_bytes > 1
    assert sizes.ratio_to_dense == sizes.serialized_bytes / sizes.dense_bytes
    assert sizes == sum((store_sizes(s) for s in stores), WeightSizes()) + WeightSizes.dense(rest, 2)


def test_held_bytes_grow_with_cached_tables() -> None:
    store = WeightStore(torch.randn(512, 512).to(torch.bfloat16), BACKEND)
    before = store_sizes(store)
    store.read()  # a decode may cache its lookup tables: held grows, serialized does not
    after = store_sizes(store)
    assert after.serialized_bytes == before.serialized_bytes and after.held_bytes >= before.held_bytes
    assert before.held_bytes >= before.serialized_bytes


def test_tied_weights_counted_once() -> None:
    model = compress_model(Net(tied=True), backend=BACKEND)
    shared = nn.ModuleDict({"a": model, "b": model})  # the same module under two names
    assert weight_sizes(shared) == weight_sizes(model)
    untied = compress_model(Net(tied=False), backend=BACKEND)
    emb = store_sizes(untied.emb.weight.store)
    assert weight_sizes(untied).numel - weight_sizes(model).numel == emb.numel == 64 * 32


def test_include_filter() -> None:
    model = compress_model(Net(), backend=BACKEND)
    names = [name for name, _ in compressed_parameters(model)]
    only = weight_sizes(model, include=names)
    full = weight_sizes(model)
    assert only.numel == only.compressed_numel == full.compressed_numel
    assert only.compressed_tensors == full.compressed_tensors == len(names)
    assert only.serialized_bytes == full.serialized_bytes - 2 * (32 + 2 * 32)
    assert weight_sizes(model, include=["fc.bias"]) == WeightSizes.dense(32, 2)
    assert weight_sizes(model, include=[]) == WeightSizes()


def test_int8_baseline_via_sized_weight() -> None:
    model = Net(tied=True, dtype=torch.float32)
    quantize_rowwise_int8(model)
    weights = [m for m in model.modules() if isinstance(m, Int8Weight)]
    assert len(weights) == 2 and all(isinstance(w, SizedWeight) for w in weights)  # emb (= head) and fc
    int8 = (64 * 32 + 4 * 64) + (32 * 32 + 4 * 32)  # values + one fp32 scale per row
    rest = 32 + 2 * 32  # fc bias and norm stay fp32 parameters, counted once
    sizes = weight_sizes(model)
    assert sizes.serialized_bytes == sizes.held_bytes == int8 + 4 * rest
    assert sizes.numel == _numel(tied=True) and sizes.dense_bytes == 4 * sizes.numel
    assert sizes.compressed_tensors == 0
    assert weight_sizes(model, include=["fc.bias"]) == WeightSizes.dense(32, 4)  # include: parameters only


def test_bits_per_weight_is_compressed_tensor_bits_per_weight() -> None:
    x = torch.randn(64, 96).to(torch.bfloat16)
    store = WeightStore(x, BACKEND)
    assert len(store.blocks) == 1
    ct = compress(x, backend=BACKEND)
    sizes = store_sizes(store)
    assert sizes.bits_per_weight == ct.bits_per_weight == store.ct.bits_per_weight
    assert sizes.serialized_bytes == len(ct.to_bytes())
    assert (sizes.numel, sizes.dense_bytes, sizes.compressed_tensors) == (64 * 96, 2 * 64 * 96, 1)
    layer = nn.Linear(96, 64, bias=False).to(torch.bfloat16)
    layer.weight.data.copy_(x)
    compress_model(layer, backend=BACKEND)
    assert weight_sizes(layer).bits_per_weight == ct.bits_per_weight
