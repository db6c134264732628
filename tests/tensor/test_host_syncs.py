"""Host syncs of a compressed training step, counted on CPU: none per decode and none per fused update (outside
the re-encode, which reads back its histogram: one per encoded block; the word stream is sized from an upper bound
and trimmed when the host first needs it, e.g. at serialization)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nz_lightning.kernels import CompressedTensor, compress
from nz_lightning.kernels import serialized_size as blob_size
from nz_lightning.optim import fused_optimizer
from nz_lightning.tensor.convert import compress_model
from nz_lightning.tensor.parameter import NZParameter, WeightStore, make_parameter
from nz_lightning.tensor.sync_count import HostSyncs, count_host_syncs
from tests.helpers.models import MlpLM, batches, llama, loss_of

CASES = [("sgd", {}), ("adamw", {"max_grad_norm": 1.0})]


def _counted_step(model: torch.nn.Module, rule: str, options: dict[str, Any]) -> HostSyncs:
    opt = fused_optimizer(model, rule, lr=1e-2, **options)
    first, second = batches(2)
    opt.backward(loss_of(model, first))  # warm-up: optimizer state created
    with count_host_syncs() as syncs:
        opt.backward(loss_of(model, second))
    return syncs


@pytest.mark.parametrize(("rule", "options"), CASES)
def test_llama_step_has_no_sync_per_decode_or_update(rule: str, options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    dense = llama().to(torch.bfloat16)
    compressed = compress_model(llama().to(torch.bfloat16), backend="torch")
    compressed.load_state_dict(dense.state_dict())
    baseline = _counted_step(dense, rule, options)
    syncs = _counted_step(compressed, rule, options)
    assert syncs.decodes > 0 and syncs.encodes > 0
    assert syncs.count("decode") == 0, syncs.summary()
    assert syncs.count("update") == 0, syncs.summary()
    assert syncs.count("other") == baseline.total, syncs.summary()  # compression adds none elsewhere
    assert syncs.count("encode") <= 3 * syncs.encodes, syncs.summary()  # reference: bincount, tolist, mask index


def test_triton_step_syncs_once_per_encode_only() -> None:
    torch.manual_seed(0)
    model = compress_model(MlpLM().to(torch.bfloat16), backend="triton")
    syncs = _counted_step(model, "adamw", {"max_grad_norm": 1.0})
    assert syncs.decodes > 0 and syncs.encodes > 0
    assert syncs.count("decode") == syncs.count("update") == syncs.count("other") == 0, syncs.summary()
    assert syncs.by_op("encode") == {"Tensor.tolist": syncs.encodes}  # the histogram; not the word total
    stores = [p.store for p in model.parameters() if isinstance(p, NZParameter)]
    pending = [ct for st in stores for ct in st.blocks if ct.streams is not None and ct.streams.used is not None]
    assert pending  # re-encoded blocks hold word buffers sized from the bound, not yet trimmed
    with count_host_syncs() as sizing:
        held = sum(st.nbytes for st in stores)  # word totals read back once per store, not per block
    assert held > 0 and 0 < sizing.total <= len(stores), sizing.summary()
    assert all(ct.streams is None or ct.streams.used is None for st in stores for ct in st.blocks)
    blobs = [st.to_blobs() for st in stores]
    for st, data in zip(stores, blobs, strict=True):
        again = WeightStore.from_blobs(data, backend="triton")
        assert torch.equal(again.read().view(torch.int16), st.read().view(torch.int16))
        assert [len(b) for b in data] == [blob_size(ct) for ct in st.blocks]


def test_counter_sees_host_reads_and_data_dependent_shapes() -> None:
    x = torch.arange(6)
    mask = x > 2
    with count_host_syncs() as syncs:
        x.sum().item()
        bool(x.any())
        int(x[0])
        x.tolist()
        x.nonzero()
        x[mask]
        torch.repeat_interleave(x, x)
        torch.repeat_interleave(x, x, output_size=15)  # size given: no sync
        torch.tensor([1, 2])  # an upload, counted apart
        x + 1
    assert syncs.total == 7, syncs.summary()
    assert syncs.by_op()["aten.repeat_interleave"] == 1
    assert sum(syncs.uploads.values()) == 1
    assert all(e.phase == "other" and "test_host_syncs.py" in e.where for e in syncs.events)


def _corrupt_states(ct: CompressedTensor) -> None:
    assert ct.streams is not None
    ct.streams.states = ct.streams.states ^ 1


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_in_memory_corruption_is_caught_by_the_deferred_check(backend: str) -> None:
    CompressedTensor.check_deferred()
    p = make_parameter(torch.randn(64, 32).to(torch.bfloat16), backend=backend)
    store: WeightStore = p.store  # type: ignore[attr-defined]
    _corrupt_states(store.ct)
    with pytest.raises(ValueError, match="corrupt"):
        store.ct.decompress(backend=backend)  # the default decompress still checks at once
    if backend == "cpu":  # the numba backend decodes on the host: it checks at once, even on the hot path
        with pytest.raises(ValueError, match="corrupt"):
            store.decode_block(0)
        return
    with count_host_syncs() as syncs:
        store.decode_block(0)  # the hot path: no sync, the flag is recorded on the device
    assert syncs.total == 0, syncs.summary()
    with pytest.raises(ValueError, match="deferred"):
        store.to_blobs()
    with pytest.raises(ValueError, match="deferred"):  # sticky: values computed since may be wrong
        CompressedTensor.check_deferred()
    CompressedTensor.reset_deferred()  # the caller replaced them
    CompressedTensor.check_deferred()


def test_loaded_blobs_are_checked_on_first_decode() -> None:
    good = compress(torch.randn(64, 32).to(torch.bfloat16), backend="torch")
    bad = compress(torch.randn(64, 32).to(torch.bfloat16), backend="torch")
    _corrupt_states(bad)
    store = WeightStore.from_blobs([bad.to_bytes()], backend="torch")  # valid checksum, inconsistent lanes
    with pytest.raises(ValueError, match="corrupt"):
        store.decode_block(0)
    store = WeightStore.from_blobs([good.to_bytes()], backend="torch")
    with count_host_syncs() as first:
        store.decode_block(0)
    with count_host_syncs() as later:
        store.decode_block(0)
    assert first.count("decode") >= 1 and later.total == 0
