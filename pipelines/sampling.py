"""The epoch plan: which samples a rank yields, in which order, and how to resume mid-epoch.

One plan drives every backend, so DALI and torch yield the same keys in the same order for the
same (seed, epoch, rank, world size), and the loader state is a few integers (Mosaic Streaming's
idea): epoch, batches already yielded in it, and the seed.

Elastic resume: the first k batches of every rank are exactly the first k·B·W entries of the
epoch's permutation (rank r holds positions r, r + W, ...). So a state saved at world size W and
batch B resumes at any W', B' as a plan with `offset = k·B·W`: the rest of the permutation,
split across the new ranks, with no sample repeated or lost (beyond the usual remainder).

Order: a permutation of all samples seeded by (seed, epoch) (identity when not shuffling). Ranks
take a strided slice of it (`order[rank::world]`, as torch's DistributedSampler does).
Remainder: with `drop_last` (training) the last `N mod (world * batch)` samples of the
permutation are dropped, so every rank yields exactly `N // (world * batch)` full batches; the
dropped samples differ every epoch because the permutation does. Without `drop_last`
(evaluation) the permutation is padded by wrapping around to its start until it divides by
`world`, every rank yields `ceil(N / world)` samples, and the last batch may be partial (the
same size on every rank); with world size 1 that is exactly every sample once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def mix(*values: int) -> int:
    """A stable 63-bit hash of integers (splitmix64 steps): per-sample choices that do not depend
    on which worker or backend makes them."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 1


@dataclass(frozen=True)
class EpochPlan:
    total: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    drop_last: bool = True
    offset: int = 0  # samples of this epoch's permutation consumed before the plan began (elastic resume)

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if not 0 <= self.offset <= self.total:
            raise ValueError(f"offset {self.offset} outside the epoch's {self.total} samples")
        if self.drop_last and self.offset == 0 and self.total < self.world_size * self.batch_size:
            raise ValueError(f"{self.total} samples cannot give one batch of {self.batch_size} to each "
                             f"of {self.world_size} ranks; lower the batch size or set drop_last=False")

    def order(self) -> np.ndarray:
        """Global sample ids of the whole epoch, before rank slicing."""
        if not self.shuffle:
            return np.arange(self.total, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.total).astype(np.int64)

    def rank_ids(self) -> np.ndarray:
        """This rank's sample ids for the epoch, in the order it yields them."""
        order = self.order()[self.offset:]
        world = self.world_size
        if self.drop_last:
            order = order[: len(order) // (world * self.batch_size) * world * self.batch_size]
        elif len(order) % world:
            pad = world - len(order) % world
            order = np.concatenate([order, np.resize(order, pad)])
        return order[self.rank::world]

    @property
    def num_batches(self) -> int:
        left, world = self.total - self.offset, self.world_size
        per_rank = left // (world * self.batch_size) * self.batch_size if self.drop_last else -(-left // world)
        return -(-per_rank // self.batch_size)

    def consumed(self, batches: int) -> int:
        """Samples of the permutation used up once every rank has yielded `batches` batches
        (counting `offset`): where a plan for another world size or batch size takes over."""
        left = self.total - self.offset
        return self.offset + min(batches * self.batch_size * self.world_size, left)

    def batches(self, start: int = 0) -> list[np.ndarray]:
        """The epoch's batches of sample ids from batch `start` on (resume skips the rest)."""
        ids = self.rank_ids()
        return [ids[i:i + self.batch_size] for i in range(start * self.batch_size, len(ids), self.batch_size)]
