"""Deterministic data order for training: the same global batches however the work is split.

A global step consumes `global_batch = batch_size * accum * world_size` clips. The order of an
epoch is a permutation drawn from (seed, epoch); global step s of the epoch takes
perm[s * G : (s + 1) * G]. Within it, accumulation micro-step a of rank r reads the slice
starting at (a * world + r) * batch_size. So one process with accum 2 and two processes with
accum 1 train on the same clips per step, with the same augmentation: every item carries its
own seed, derived from (seed, epoch, position), and the augmentation draws from it
(`SeededItems`), not from whichever worker happens to load it. Resuming mid-epoch starts at
the step's offset in the same permutation.
"""

from typing import Iterator, List, Tuple

import torch
from torch.utils.data import Dataset, Sampler


class GlobalBatchSampler(Sampler):
    """Batch sampler yielding this rank's micro-batches of (index, item_seed) pairs."""

    def __init__(self, num_items: int, batch_size: int, accum: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0) -> None:
        self.num_items = num_items
        self.batch_size, self.accum = batch_size, accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.global_batch = batch_size * accum * world_size
        if num_items < self.global_batch:
            raise ValueError(f"the training split has {num_items} clips, fewer than one global "
                             f"batch ({self.global_batch}); lower batch_size/accum or add data")
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch  # the incomplete last global batch is dropped

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch `epoch` from its global step `start_step` (for resuming)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.num_items, generator=g).tolist()
        item_seeds = torch.randint(0, 2**62, (self.num_items,), generator=g).tolist()
        b = self.batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            base = step * self.global_batch
            for a in range(self.accum):
                start = base + (a * self.world_size + self.rank) * b
                yield [(perm[i], item_seeds[i]) for i in range(start, start + b)]


class SeededItems(Dataset):
    """Wraps a dataset whose __getitem__ draws from torch's global RNG: item (index, seed) is
    loaded with the global RNG seeded to `seed` (restored afterwards), so its augmentation is a
    function of the seed alone."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
