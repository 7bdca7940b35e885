"""Exact resume: the training data order and every step's random numbers are functions of
(seed, epoch, step, rank), so a run resumed from a checkpoint draws what the uninterrupted run
drew. trainer.fit installs ExactResume when the training loader is a `resumable_loader`."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def stream_seed(*key: Any) -> int:
    """A 63-bit seed of `key` (e.g. seed, "step", 12, rank): distinct keys give unrelated streams."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1


class ResumableSampler(DistributedSampler):
    """Sample order of exactly resumable training: epoch e visits a permutation of the `n` items
    drawn from (seed, e) alone (0..n-1 without `shuffle`), split over DDP ranks as
    DistributedSampler does (padded to a multiple of the world size, rank r takes r::world).

    Each iteration continues where the last stopped and moves to the next epoch once an epoch's
    batches (`batch_size`, `drop_last` as the loader's) are used; `set_step(k)` moves to the start
    of global batch k (fit does that from a resumed checkpoint's global step). A DistributedSampler,
    so that Lightning's DDP keeps it instead of putting its own in.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = False):
        # no DistributedSampler.__init__: the ranks are known only once the process group is up
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = (
            int(n),
            int(batch_size),
            int(seed),
            shuffle,
            drop_last,
        )
        self.epoch, self.start, self._step = 0, 0, None

    @staticmethod
    def _ranks() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def __len__(self) -> int:
        return math.ceil(self.n / self._ranks()[0])

    def _epoch_end(self) -> int:
        """Samples of this rank that an epoch's batches use."""
        used = len(self) // self.batch_size * self.batch_size if self.drop_last else len(self)
        return max(used, 1)

    def order(self, epoch: int) -> list[int]:
        """This rank's items of `epoch`, in order."""
        world, rank = self._ranks()
        if self.shuffle:
            idx = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(stream_seed(self.seed, "epoch", epoch))
            )
        else:
            idx = torch.arange(self.n)
        idx = idx.repeat(math.ceil(len(self) * world / max(self.n, 1)))[: len(self) * world]
        return idx[rank::world].tolist()

    def set_step(self, step: int) -> None:
        """Start the next iteration at global batch `step` (resolved then: it needs the ranks)."""
        self._step = int(step)

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the position follows the batches used (Lightning calls this after it fetched
        a resumed epoch's first batch)."""

    def __iter__(self):
        end = self._epoch_end()
        if self._step is not None:
            batches = max(1, math.ceil(end / self.batch_size))
            self.epoch, batch = divmod(self._step, batches)
            self.start, self._step = batch * self.batch_size, None
        if self.start >= end:
            self.epoch, self.start = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.start < len(order):
            self.start += 1
            yield order[self.start - 1]


def resumable_loader(
    dataset: Dataset, batch_size: int, seed: int, *, shuffle: bool = True, drop_last: bool = False, **kwargs: Any
) -> DataLoader:
    """A training DataLoader with a ResumableSampler, so that `fit` resumes it exactly. `kwargs`
    go to DataLoader (num_workers, collate_fn, ...)."""
    sampler = ResumableSampler(len(dataset), batch_size, seed, shuffle=shuffle, drop_last=drop_last)
    # its own generator: creating the iterator then draws no numbers from torch's global stream
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


class ExactResume(Callback):
    """Puts the training sampler at a resumed checkpoint's step, and seeds torch's global random
    stream (dropout, task genes, noise, gene subsets) from (seed, step, rank) before every step,
    so a resumed run draws what the uninterrupted run drew."""

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.sampler.set_step(int(checkpoint.get("global_step", 0)))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        torch.manual_seed(stream_seed(self.sampler.seed, "step", trainer.global_step, trainer.global_rank))
