"""A resumable, optionally sharded sampler: the data order is a pure function of (seed, epoch).

Epoch ``e`` uses the permutation from ``torch.Generator().manual_seed(seed + e)`` (or ``range(n)`` without
shuffling). With ``num_replicas > 1`` the permutation is padded (or cut with ``drop_last``) to a multiple of
the replica count and rank ``r`` takes elements ``r, r + R, r + 2R, ...``, exactly like
``torch.utils.data.DistributedSampler``, so per-rank batches of ``B / R`` together form the single-process
batch of ``B``. ``set_start(k)`` skips the first ``k`` indices of the epoch without loading them (resume).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(
        self,
        length: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.length, self.shuffle, self.seed = int(length), bool(shuffle), int(seed)
        self.num_replicas, self.rank, self.drop_last = int(num_replicas), int(rank), bool(drop_last)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def _num_local(self) -> int:
        r = self.num_replicas
        return self.length // r if self.drop_last else -(-self.length // r)

    def epoch_indices(self) -> list[int]:
        """This rank's full index list for the current epoch (ignoring ``start``)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self._num_local() * self.num_replicas
        if total > len(order) and order:
            reps = -(-total // len(order))
            order = (order * reps)[:total]
        else:
            order = order[:total]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :])

    def __len__(self) -> int:
        return max(self._num_local() - self.start, 0)
