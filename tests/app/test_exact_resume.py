"""Exact resume of the default pipeline: the shuffled training loader's position is checkpointed, so a run killed
with SIGKILL and resumed from ``last.ckpt`` ends with the same weights as the uninterrupted run."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.kill_resume import loader_state, run_trials
from nz_lightning.lm.data import TextDataModule
from nz_lightning.lm.resumable import ResumableLoader, epoch_permutation

DATA = TensorDataset(torch.arange(103))  # 12 full batches of 8 and a dropped remainder


def ids(batches: object) -> list[list[int]]:
    """The sample ids (TensorDataset) or token blocks (TextDataModule) of each batch."""
    return [(b["input_ids"] if isinstance(b, dict) else b[0]).tolist() for b in batches]  # type: ignore[attr-defined]


def loader(**kwargs: object) -> ResumableLoader:
    return ResumableLoader(DATA, batch_size=8, seed=0, drop_last=True, **kwargs)  # type: ignore[arg-type]


def roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as in a checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- the loader ----------------------------------------------------------------------------------------------------


def test_first_epoch_is_the_shuffled_dataloaders_order() -> None:
    """A fresh run sees the batches ``DataLoader(shuffle=True, generator=manual_seed(seed))`` gave before."""
    plain = DataLoader(DATA, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True)
    assert ids(loader()) == ids(plain)
    assert len(loader()) == len(plain) == 12


def test_epochs_are_a_function_of_seed_and_epoch() -> None:
    """Each pass is the next epoch (or the one ``set_epoch`` chose); epochs differ, repeat for the same epoch."""
    dl = loader()
    first, second = ids(dl), ids(dl)
    assert first != second
    assert sum(second, []) == epoch_permutation(103, 0, 1)[:96].tolist()
    dl.sampler.set_epoch(0)  # type: ignore[attr-defined]
    assert ids(dl) == first
    dl.sampler.set_epoch(5)  # type: ignore[attr-defined]
    assert sum(ids(dl), []) == epoch_permutation(103, 0, 5)[:96].tolist()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("taken", [0, 1, 5, 11, 12])
def test_resumes_where_the_saved_loader_was(num_workers: int, taken: int) -> None:
    """A new loader given the state after ``taken`` batches hands out the rest of the uninterrupted run's batches,
    then the next epoch; a state saved after an epoch's last batch resumes at the next epoch. Counting is where the
    batches are handed out, so worker prefetching does not move it."""
    reference = ids(loader()) + ids_of_epoch(1)
    dl = loader(num_workers=num_workers)
    it = iter(dl)
    seen = [next(it)[0].tolist() for _ in range(taken)]
    state = roundtrip(dl.state_dict())
    assert state["epoch"] == (1 if taken == 12 else 0) and state["batches"] == (0 if taken == 12 else taken)
    resumed = loader(num_workers=num_workers)
    resumed.load_state_dict(state)
    assert seen + ids(resumed) + (ids(resumed) if taken < 12 else []) == reference
    assert resumed.state_dict()["epoch"] == 2 if taken < 12 else 1


def ids_of_epoch(epoch: int) -> list[list[int]]:
    perm = epoch_permutation(103, 0, epoch)[:96].tolist()
    return [perm[i : i + 8] for i in range(0, 96, 8)]


def test_state_loaded_after_iter_applies_at_the_first_batch() -> None:
    """Lightning (under a strategy that restores after setup) calls ``iter()`` before the state arrives."""
    dl = loader()
    it = iter(dl)
    dl.load_state_dict({"epoch": 3, "batches": 4})
    assert ids(it) == ids_of_epoch(3)[4:]


def test_changed_data_warns() -> None:
    state = loader().state_dict() | {"batch_size": 4}
    with pytest.warns(UserWarning, match="batch_size"):
        loader().load_state_dict(state)


def test_datamodule_checkpoints_the_training_loader() -> None:
    """``TextDataModule.state_dict`` holds the loader's position; ``load_state_dict`` reaches the live loader, or
    the next one built (Lightning may build it before or after restoring)."""
    dm = TextDataModule(max_bytes=20000, seq_len=64, batch_size=4)
    assert dm.state_dict() == {}
    dl = dm.train_dataloader()
    assert isinstance(dl, ResumableLoader)
    it = iter(dl)
    for _ in range(3):
        next(it)
    state = roundtrip(dm.state_dict())
    assert state["train_loader"]["batches"] == 3
    rest = ids(it)

    later = TextDataModule(max_bytes=20000, seq_len=64, batch_size=4)
    later.load_state_dict(state)  # before the loader exists
    assert ids(later.train_dataloader()) == rest

    early = TextDataModule(max_bytes=20000, seq_len=64, batch_size=4)
    it = iter(early.train_dataloader())  # after it exists (and was iterated)
    early.load_state_dict(state)
    assert ids(it) == rest
    assert not isinstance(early.val_dataloader(), ResumableLoader)


# -- SIGKILL and resume ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("restore_cpu_threads")
def test_sigkill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    """``train.py +strategy=neuzip`` (shuffled, 11 batches an epoch, checkpoints every 4 steps and ``last.ckpt``) is
    killed with SIGKILL after its step-8 checkpoint and resumed from ``last.ckpt``: mid-epoch, across the epoch end,
    to step 14. Weights and optimizer state equal the uninterrupted run's bit for bit."""
    reference, (outcome,) = run_trials(tmp_path, [(8, 0.05)], steps=14, every=4)
    assert outcome.killed
    (state,) = outcome.resumed_from
    assert 0 < state["batches"] < 11, state  # resumed mid-epoch
    assert outcome.differences == []
    assert loader_state(reference)[0]["epoch"] == 1
