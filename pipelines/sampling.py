"""The epoch plan: which samples a rank yields, in which order, and how to resume mid-epoch.

One plan drives every backend, so DALI and torch yield the same keys in the same order for the
same (seed, epoch, rank, world size), and the loader state is a few integers (Mosaic Streaming's
idea): epoch, batches already yielded in it, and the seed (plus the shuffle mode and block size,
which must not change across a resume).

Elastic resume: the first k batches of every rank are exactly the first k·B·W entries of the
epoch's permutation (rank r holds positions r, r + W, ...). So a state saved at world size W and
batch B resumes at any W', B' as a plan with `offset = k·B·W`: the rest of the permutation,
split across the new ranks, with no sample repeated or lost (beyond the usual remainder). This
holds for every shuffle mode because each is one permutation of the epoch that depends on
(seed, epoch) and the data only, never on the world size.

Order (`shuffle`), from the same generator seeded by (seed, epoch):
- "global": a permutation of all samples. Every batch draws from ~B different shards: fine on a
  local disk, ruinous over a network, where every shard is needed throughout the epoch.
- "block": the shards are permuted, cut into blocks of `block_shards` consecutive shards of that
  permutation, and the samples of each block are shuffled among themselves. The epoch then walks
  through the data a block at a time: a shard is read in one short stretch of the epoch and never
  again, so a cache of two blocks (the current one and the next, prefetched) reads every shard
  once. It needs the shard sizes (`shard_sizes`, data the shard set knows, not loader state:
  global sample ids are numbered shard after shard, so sizes say which ids a shard holds).
- "none": storage order (evaluation).
Ranks take a strided slice of the permutation (`order[rank::world]`, as torch's
DistributedSampler does). With "block", "a few shards at a time" is a property of the whole job:
at every step all ranks read from the same current block (≈ block_shards shards, two blocks at a
boundary, more when one global batch B·W spans several blocks), each rank about 1/W of every
shard in it, so a node reads those few shards at a time, all of them, between its ranks. No rank
can own shards of its own: that would make the permutation depend on W and break elastic resume.
`tools/bench_shuffle.py` measures both views (per rank batch and per global step).

Remainder: with `drop_last` (training) the last `N mod (world * batch)` samples of the
permutation are dropped, so every rank yields exactly `N // (world * batch)` full batches; the
dropped samples differ every epoch because the permutation does. Without `drop_last`
(evaluation) the permutation is padded by wrapping around to its start until it divides by
`world`, every rank yields `ceil(N / world)` samples, and the last batch may be partial (the
same size on every rank); with world size 1 that is exactly every sample once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHUFFLES = ("global", "block", "none")
# 8 shards: ~8,000 samples mixed at a time with ~1,000-sample shards, the scale of open_clip's
# webdataset shuffle buffer (5,000), halving same-shard pairs in a batch against 4 shards, while a
# cache of two blocks (16 shards, ~1.6 GB of 100 MB shards) reads every shard once. Measured against
# other sizes in docs/drafts/shuffle.md (`python -m tools.bench_shuffle`).
DEFAULT_BLOCK_SHARDS = 8


def shuffle_mode(value) -> str:
    """A shuffle setting as one of SHUFFLES: True/"global", "block", False/"none"."""
    if value is True or value is False:  # `is`: the old bool settings, not 0/1
        return "global" if value else "none"
    if value in SHUFFLES:
        return value
    raise ValueError(f"shuffle must be one of {', '.join(SHUFFLES)} (or True / False), not {value!r}")


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
    shuffle: bool | str = True  # normalised to one of SHUFFLES
    drop_last: bool = True
    offset: int = 0  # samples of this epoch's permutation consumed before the plan began (elastic resume)
    block_shards: int = DEFAULT_BLOCK_SHARDS  # shuffle="block": shards whose samples are shuffled together
    # Samples per shard, in storage order (global ids run shard after shard). Needed by "block" and
    # by shards_of / shard_order; the shard set's data, so kept out of repr (a cache key elsewhere).
    shard_sizes: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self):
        object.__setattr__(self, "shuffle", shuffle_mode(self.shuffle))
        if not isinstance(self.shard_sizes, tuple):  # dataclasses.replace passes the tuple on: no copy per batch
            object.__setattr__(self, "shard_sizes", tuple(int(n) for n in self.shard_sizes))
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if not 0 <= self.offset <= self.total:
            raise ValueError(f"offset {self.offset} outside the epoch's {self.total} samples")
        if self.drop_last and self.offset == 0 and self.total < self.world_size * self.batch_size:
            raise ValueError(f"{self.total} samples cannot give one batch of {self.batch_size} to each "
                             f"of {self.world_size} ranks; lower the batch size or set drop_last=False")
        if self.block_shards < 1:
            raise ValueError(f"block_shards must be ≥ 1, not {self.block_shards}")
        if self.shard_sizes and sum(self.shard_sizes) != self.total:
            raise ValueError(f"shard sizes add up to {sum(self.shard_sizes)} samples, not the plan's {self.total}")
        if self.shuffle == "block" and not self.shard_sizes:
            raise ValueError("shuffle='block' needs the shard sizes (shard_sizes); the loader passes "
                             "its shard set's")

    def order(self) -> np.ndarray:
        """Global sample ids of the whole epoch, before rank slicing: int64 [total]."""
        if self.shuffle == "none":
            return np.arange(self.total, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle == "global":
            return rng.permutation(self.total).astype(np.int64)
        sizes = np.asarray(self.shard_sizes, dtype=np.int64)
        shards = rng.permutation(len(sizes))
        lengths = sizes[shards]
        # The shards' ids laid end to end in permuted order: position p of shard s's run holds
        # id starts[s] + p, i.e. arange(total) shifted by (starts[s] - where the run begins).
        runs = np.cumsum(lengths) - lengths
        starts = np.cumsum(sizes) - sizes
        ids = np.arange(self.total, dtype=np.int64) + np.repeat(starts[shards] - runs, lengths)
        bounds = np.append(runs[::self.block_shards], self.total)
        for lo, hi in zip(bounds[:-1], bounds[1:]):  # one in-place shuffle per block: O(total)
            rng.shuffle(ids[lo:hi])
        return ids

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

    def shards_of(self, ids) -> np.ndarray:
        """Shard number (position in `shard_sizes`) of each global sample id: int64, ids' shape."""
        if not self.shard_sizes:
            raise ValueError("this plan has no shard sizes; build it with shard_sizes=")
        return np.searchsorted(np.cumsum(self.shard_sizes), ids, side="right").astype(np.int64)

    def shard_order(self, start: int = 0) -> np.ndarray:
        """The shards this rank reads from batch `start` to the end of the epoch, each once, in
        the order it first needs them: what a shard cache prefetches (and, by the last use,
        may evict). int64 [shards needed]. Under "block" other ranks need the same shards at
        about the same time (see the module docstring); under "global" this is nearly every
        shard within the first few batches."""
        ids = self.rank_ids()[start * self.batch_size:]
        shards = self.shards_of(ids)
        _, first = np.unique(shards, return_index=True)
        return shards[np.sort(first)]
