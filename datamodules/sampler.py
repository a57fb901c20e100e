"""A shuffling sampler that can resume mid-epoch. Pure torch.

The order of epoch e is a permutation drawn from (seed, e), so it does not depend on how many epochs
this process has seen; after a restart the first ``skip`` samples of the resumed epoch are left out,
so training continues with exactly the batches an uninterrupted run would have seen next.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.skip_epoch, self.skip = 0, -1, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def resume(self, epoch: int, consumed: int) -> None:
        """Leave out the first ``consumed`` samples of epoch ``epoch`` (they were trained on before the restart)."""
        if consumed >= self.n:  # the epoch was finished (its last batch may be short): nothing to leave out
            self.skip_epoch, self.skip = -1, 0
        else:
            self.skip_epoch, self.skip = epoch, consumed

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        return iter(order[self.skip:] if self.epoch == self.skip_epoch else order)

    def __len__(self) -> int:
        # The whole epoch's length even while skipping: Lightning's restored batch counter already
        # includes the skipped batches and ends the epoch when counter == len(dataloader).
        return self.n
