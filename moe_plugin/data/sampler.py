"""Resumable, layout-independent sample order.

The order of samples is defined globally, independent of how many processes read it:

    epoch permutation  perm_e = randperm(N, seed + e)          (or arange(N) without shuffle)
    global batch b     perm_e[b*G : (b+1)*G],   G = batch_size * world_size
    rank r's share     perm_e[b*G + r*batch_size : b*G + (r+1)*batch_size]

so a run with the same global batch size G sees the same samples at every step whatever its world
size, and a checkpoint only needs (epoch, global samples consumed in that epoch) to continue at another
world size. Lightning does not fast-forward map-style data loaders on resume; this sampler does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalOrderSampler(Sampler[int]):
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start_sample: int = 0,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_sample = start_sample  # global samples to skip in the current epoch (resume)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def first_sample(self, micro_batch: int = 0) -> int:
        """Position of this rank's first sample within an optimizer step's samples, for the `micro_batch`-th
        batch of the step (gradient accumulation): micro_batch * G + rank * batch_size. The routing warmup
        keys its noise by it (layers/routing_warmup.py), so the same global batch gets the same noise on
        any world size."""
        return micro_batch * self.global_batch + self.rank * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_sample = 0  # the resume offset belongs to the epoch it was saved in
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def _batches(self) -> range:
        n = self.num_samples if not self.drop_last else self.num_samples - self.num_samples % self.global_batch
        first = self.start_sample // self.global_batch
        last = (n + self.global_batch - 1) // self.global_batch
        return range(first, last)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        for b in self._batches():
            start = b * self.global_batch + self.rank * self.batch_size
            yield from order[start : min(start + self.batch_size, self.num_samples)].tolist()

    def __len__(self) -> int:
        return sum(
            max(0, min(self.batch_size, self.num_samples - (b * self.global_batch + self.rank * self.batch_size)))
            for b in self._batches()
        )
