"""A shuffled training loader that resumes mid-epoch: its position is saved in Lightning checkpoints.

Lightning (2.x) saves the ``state_dict()`` of every training loader that has ``state_dict``/``load_state_dict`` in the
checkpoint (``loops.fit_loop.state_dict.combined_loader``) and hands it back through ``load_state_dict`` before the
resumed run iterates the loader. :class:`ResumableLoader` uses this: its order is a pure function of
``(seed, epoch)`` (:func:`epoch_permutation`), and its state is the epoch and the number of batches it has handed
out in that epoch, so a run resumed from a mid-epoch checkpoint sees exactly the batches the uninterrupted run sees.
The batches are counted where the loader hands them out (not where the sampler is read, which runs ahead of the
consumer with ``num_workers > 0``), and the skipped ones are never loaded: the resumed pass starts part-way through
the permutation.

Epoch 0's permutation is the one ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` gives
(torch's ``RandomSampler`` draws it after the loader's worker base seed, from the same generator), so fresh runs see
the same batches as with the plain shuffled loader; epoch ``e`` is epoch 0 of a loader seeded with ``seed + e``
(as ``DistributedSampler`` seeds its epochs), where the plain loader would continue one generator.

Data parallel: with several processes (``torch.distributed`` initialized, or ``num_replicas``/``rank`` given) each
rank takes every ``num_replicas``-th index of the epoch's permutation from its ``rank`` on, the permutation padded
with its own head to a multiple of ``num_replicas``, as ``DistributedSampler`` does. :class:`ShuffleSampler` is a
``DistributedSampler``, so Lightning keeps it instead of replacing the loader's sampler by its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableLoader", "ShuffleSampler", "TrainLoaderState", "epoch_permutation"]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of ``range(n)`` in ``epoch``: a pure function of ``(n, seed, epoch)``.

    It is the permutation torch's ``RandomSampler`` draws in the first pass of a ``DataLoader`` whose generator is
    seeded with ``seed + epoch``: one int64 (the loader's worker base seed), then ``randperm(n)``.

    Args:
        n: Number of samples.
        seed: Seed of the shuffling.
        epoch: Epoch index (0-based).

    Returns:
        A 1-D int64 tensor holding each of ``0 .. n-1`` once.
    """
    gen = torch.Generator().manual_seed(seed + epoch)
    torch.empty((), dtype=torch.int64).random_(generator=gen)  # the DataLoader's base-seed draw
    return torch.randperm(n, generator=gen)


def _world() -> tuple[int, int]:
    """``(num_replicas, rank)`` of the initialized process group, else ``(1, 0)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ShuffleSampler(DistributedSampler):
    """This rank's indices of :func:`epoch_permutation`, from ``pass_start`` on, for the pass the loader sets up.

    ``set_epoch`` (called by Lightning at the start of every epoch, as for ``DistributedSampler``) chooses the epoch
    of the loader's next pass; the loader fixes ``pass_epoch``/``pass_start`` when a pass begins, so a ``set_epoch``
    between the loader's ``iter()`` and the first batch cannot change a pass that has begun.

    Args:
        n: Number of samples.
        seed: Seed of the shuffling.
        num_replicas: Processes sharing the data (default: the process group's size, 1 without one).
        rank: This process's share (default: its rank in the process group).

    Raises:
        ValueError: ``rank`` outside ``0 .. num_replicas - 1``.
    """

    def __init__(self, n: int, seed: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        world, me = _world()
        num_replicas = world if num_replicas is None else int(num_replicas)
        rank = me if rank is None else int(rank)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        self.n, self.seed = n, seed
        self.epoch = 0
        self.epoch_set = False
        self.pass_epoch = 0
        self.pass_start = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s permutation in the loader's next pass."""
        self.epoch, self.epoch_set = int(epoch), True

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(self.n, self.seed, self.pass_epoch)
        if self.num_replicas > 1:
            order = order.repeat(-(-self.total_size // max(self.n, 1)))[: self.total_size]
            order = order[self.rank :: self.num_replicas]
        return iter(order[self.pass_start :].tolist())


class ResumableLoader(DataLoader):
    """A shuffled ``DataLoader`` whose position within the epoch is checkpointed (``state_dict``/``load_state_dict``).

    Each ``iter()`` is one pass (epoch): the epoch given to the sampler's ``set_epoch`` since the last pass, else the
    next one (the first pass is epoch 0). The state (:meth:`state_dict`) is
    plain ints, safe for ``torch.load(weights_only=True)``. After ``load_state_dict`` the next pass is that epoch,
    starting after the batches already handed out; a state saved after the last batch of an epoch resumes at the
    start of the next epoch. The worker base seed of a pass is drawn from a generator seeded with ``seed + epoch``,
    so workers are seeded the same way in a resumed pass too.

    Args:
        dataset: A map-style dataset (with ``len``).
        batch_size: Samples per batch.
        seed: Seed of the shuffling.
        drop_last: Drop the last, incomplete batch of each epoch.
        num_replicas: Data parallel: processes sharing each epoch (default: the process group's size, else 1).
        rank: Data parallel: this process's share (default: its rank in the process group).
        **kwargs: Other ``DataLoader`` arguments (``num_workers``, ``collate_fn``, ``pin_memory``, ...), not
            ``shuffle``, ``sampler``, ``batch_sampler`` or ``generator``.

    Raises:
        TypeError: The dataset has no length.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, Sized):
            raise TypeError(f"{type(self).__name__} needs a map-style dataset with a length, got {type(dataset)}")
        self.seed = int(seed)
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=ShuffleSampler(len(dataset), self.seed, num_replicas, rank),
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )
        self._epoch = 0  # epoch of the current (or last) pass
        self._batches = 0  # batches of that pass handed out, including skipped ones of a resumed pass
        self._passes = 0
        self._pending: tuple[int, int] | None = None  # (epoch, batches) from load_state_dict

    @property
    def shuffle_sampler(self) -> ShuffleSampler:
        """The loader's :class:`ShuffleSampler`."""
        sampler = self.sampler
        if not isinstance(sampler, ShuffleSampler):
            raise TypeError(f"{type(self).__name__}'s sampler was replaced by {type(sampler).__name__}")
        return sampler

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._pass()

    def _pass(self) -> Iterator[Any]:
        # A generator: the pass is set up at its first batch, so a state loaded after ``iter()`` still applies (under
        # NeuZipStrategy, Lightning creates the iterator before it restores the checkpoint).
        sampler = self.shuffle_sampler
        if self._pending is not None:
            epoch, skip = self._pending
            self._pending = None
        else:
            epoch = sampler.epoch if sampler.epoch_set or self._passes == 0 else self._epoch + 1
            skip = 0
        sampler.epoch, sampler.epoch_set = epoch, False
        sampler.pass_epoch, sampler.pass_start = epoch, skip * int(self.batch_size or 1)
        self._epoch, self._batches = epoch, skip
        self._passes += 1
        if self.generator is not None:
            self.generator.manual_seed(self.seed + epoch)  # the worker base seed is drawn from it
        for batch in super().__iter__():
            self._batches += 1  # counted when handed out: a checkpoint taken after it includes it
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Position of the loader: the epoch, and the batches of it handed out (0 after the epoch's last batch).

        Returns:
            ``{"epoch", "batches", "seed", "samples", "batch_size", "replicas"}`` (``samples``: this rank's).
        """
        if self._pending is not None:
            epoch, batches = self._pending
        elif self._passes == 0:
            epoch, batches = self.shuffle_sampler.epoch, 0
        elif self._batches >= len(self):
            epoch, batches = self._epoch + 1, 0
        else:
            epoch, batches = self._epoch, self._batches
        return {
            "epoch": epoch,
            "batches": batches,
            "seed": self.seed,
            "samples": len(self.shuffle_sampler),
            "batch_size": int(self.batch_size or 1),
            "replicas": self.shuffle_sampler.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next pass resume at the saved position (the saved epoch, after its handed-out batches).

        A state saved with another seed, dataset length or batch size is applied all the same, with a warning: the
        resumed run then does not see the batches the saving run would have seen.

        Args:
            state_dict: A :meth:`state_dict`.
        """
        mine = self.state_dict()
        keys = ("seed", "samples", "batch_size", "replicas")
        changed = [k for k in keys if k in state_dict and state_dict[k] != mine[k]]
        if changed:
            saved = {k: state_dict[k] for k in changed}
            now = {k: mine[k] for k in changed}
            warnings.warn(
                f"resuming a training loader saved with {saved}, now {now}: the order of the batches differs from"
                " the saving run's",
                stacklevel=2,
            )
        self._pending = (int(state_dict["epoch"]), int(state_dict["batches"]))


class TrainLoaderState:
    """``LightningDataModule`` mixin: the training loader's position is part of the datamodule's checkpointed state.

    Lightning saves a stateful training loader itself, but hands the state back only when it builds the loader after
    restoring the loops; a module that asks for ``trainer.estimated_stepping_batches`` in ``configure_optimizers``
    makes it build the loader earlier, and the state is dropped (Lightning 2.6). A datamodule's ``load_state_dict``
    is always called on resume (before the strategy's setup, or after it where the strategy restores after setup,
    as ``NeuZipStrategy`` does), and :class:`ResumableLoader` applies a state at the first batch of a pass, so the
    state reaches the loader either way: the loader :meth:`make_train_loader` built last, or the next one it builds.
    """

    _train_loader: ResumableLoader | None = None
    _train_loader_state: dict[str, Any] | None = None

    def make_train_loader(self, dataset: Dataset, batch_size: int, seed: int, **kwargs: Any) -> ResumableLoader:
        """A :class:`ResumableLoader` (``kwargs`` go to it) positioned where a loaded checkpoint left off."""
        loader = ResumableLoader(dataset, batch_size, seed, **kwargs)
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """``{"train_loader": <its state>}`` once a training loader exists, else ``{}``."""
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Position the training loader (or the next one built) as saved in ``state_dict``."""
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._train_loader_state = dict(state)
