"""A shuffling sampler that can resume mid-epoch. Pure torch.

The order of epoch e is a permutation drawn from (seed, e), so it does not depend on how many epochs
this process has seen; after a restart the first ``skip`` samples of the resumed epoch are left out,
so training continues with exactly the batches an uninterrupted run would have seen next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """``lengths`` + ``batch_size`` turn on length bucketing: within windows of ``BUCKET_WINDOW`` batches of
    the shuffled order, samples are sorted by length and cut into batches, and the batches are shuffled,
    so each batch holds similar lengths and padding shrinks (still a function of (seed, epoch))."""

    BUCKET_WINDOW = 50

    def __init__(
        self, n: int, seed: int = 0, shuffle: bool = True, lengths: Optional[list] = None, batch_size: int = 1
    ) -> None:
        self.n, self.seed, self.shuffle, self.lengths, self.batch_size = n, seed, shuffle, lengths, batch_size
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
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        return bucketed(order, self.lengths, self.batch_size, g) if self.lengths is not None else order

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        return iter(order[self.skip :] if self.epoch == self.skip_epoch else order)

    def __len__(self) -> int:
        # The whole epoch's length even while skipping: Lightning's restored batch counter already
        # includes the skipped batches and ends the epoch when counter == len(dataloader).
        return self.n


def bucketed(
    order: list[int], lengths: list, batch_size: int, g: torch.Generator, window: int = ResumableSampler.BUCKET_WINDOW
) -> list[int]:
    """Length-bucketed batches from a shuffled ``order`` (see ResumableSampler); every index kept once.
    ``lengths`` are sort keys: numbers, or tuples compared in order."""
    batches = []
    for lo in range(0, len(order), batch_size * window):
        chunk = sorted(order[lo : lo + batch_size * window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    # The short last batch stays last (drop_last-compatible); the full ones are shuffled.
    last = batches.pop() if batches and len(batches[-1]) < batch_size else None
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()] + ([last] if last else [])
    return [i for b in batches for i in b]
