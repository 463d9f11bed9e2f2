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

Order (`shuffle`), each a permutation keyed by (seed, epoch):
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
`tools/bench/bench_shuffle.py` measures both views (per rank batch and per global step).

Remainder: with `drop_last` (training) the last `N mod (world * batch)` samples of the
permutation are dropped, so every rank yields exactly `N // (world * batch)` full batches; the
dropped samples differ every epoch because the permutation does. Without `drop_last`
(evaluation) the permutation is padded by wrapping around to its start until it divides by
`world`, every rank yields `ceil(N / world)` samples, and the last batch may be partial (the
same size on every rank); with world size 1 that is exactly every sample once.

No epoch is ever materialised (plan version 2, `PLAN_VERSION`): a permutation is a function
evaluated at the positions a batch needs (`permute`, a keyed Feistel network with cycle walking:
pipelines/plan/permutation.py), keyed by (seed, epoch, ...). Rank r's batch b is
positions offset + (b·B + j)·W + r, so `batch(b)` costs O(B) time and memory at any N. "block"
permutes the shards with one such permutation over [0, S) (O(S) once per plan: it grows with
shards, not samples), and the samples of block k with another keyed by (seed, epoch, k) over the
block's length; a position finds its block and then its shard by binary search over those O(S)
bounds. `order()`, `rank_ids()`, `batches()` and `shard_order()` still give whole epochs,
computed from the same permutation: O(N), for tests and small tools. Plan version 1 (numpy's
permutations, materialised) ordered epochs differently; a loader state records the version it
was saved with (pipelines/loader.py).

Several sources (`mix`, pipelines/plan/mixing.py): the plan orders the epoch's slots, Σ round(w_s·N_s)
of them, exactly as it orders one folder's samples, and maps each slot to a sample id afterwards
(block shuffle: it shuffles the epoch's shard pieces instead of the shards). So everything above
holds over a mixture unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator, NamedTuple

import numpy as np

from pipelines.plan.mixing import Mix
from pipelines.plan.permutation import ROUNDS, domain, mix, mix_array, permute, round_keys, walk  # noqa: F401 (re-exported)

SHUFFLES = ("global", "block", "none")
# 8 shards: ~8,000 samples mixed at a time with ~1,000-sample shards, the scale of open_clip's
# webdataset shuffle buffer (5,000), halving same-shard pairs in a batch against 4 shards, while a
# cache of two blocks (16 shards, ~1.6 GB of 100 MB shards) reads every shard once. Measured against
# other sizes in docs/benchmarks.md, "Shuffle quality against read locality" (`bench-shuffle`).
DEFAULT_BLOCK_SHARDS = 8


def shuffle_mode(value) -> str:
    """A shuffle setting as one of SHUFFLES: True/"global", "block", False/"none"."""
    if value is True or value is False:  # `is`: the old bool settings, not 0/1
        return "global" if value else "none"
    if value in SHUFFLES:
        return value
    raise ValueError(f"shuffle must be one of {', '.join(SHUFFLES)} (or True / False), not {value!r}")


PLAN_VERSION = 2  # 1: numpy permutations of the whole epoch (until issue 18); 2: keyed Feistel permutations
# Domain tags: the permutations of one (seed, epoch) get unrelated keys.
_GLOBAL, _SHARDS, _BLOCK = 1, 2, 3
_CHUNK = 1 << 20  # positions per step of the whole-epoch helpers: bounds their temporaries



class _Blocks(NamedTuple):
    """shuffle="block"'s layout of one epoch, O(S): the permuted shards laid end to end."""
    shards: np.ndarray  # int64 [S]: the shards in the order the epoch reads them
    run_ends: np.ndarray  # int64 [S]: end position of each permuted shard's run
    shift: np.ndarray  # int64 [S]: global id - position, within that run
    starts: np.ndarray  # int64 [blocks]: first position of each block
    ends: np.ndarray  # int64 [blocks]
    keys: np.ndarray  # uint64 [ROUNDS, blocks]: each block's sample permutation
    lengths: np.ndarray  # uint64 [blocks], and its Feistel domain:
    a: np.ndarray  # uint64 [blocks]
    b: np.ndarray  # uint64 [blocks]


class _memo:
    """`functools.cached_property` without its lock. Python 3.11's takes one lock per property,
    shared by every instance: a loader worker forked while a thread of its parent (the shard cache
    following the plan) held it deadlocked on its first plan (issue 18's CI hang). Two threads may
    both compute a value here; it is a pure function of the plan's fields, so either is right."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


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
    # Several sources (pipelines/plan/mixing.py): `total` is then the epoch's slots, Σ round(w_s·N_s), and
    # each slot is mapped to a sample id after the shuffle; None: one source, slot = sample id.
    mix: Mix | None = field(default=None, repr=False)

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
        if self.mix is not None and self.mix.length != self.total:
            raise ValueError(f"the mixture's epoch holds {self.mix.length} samples, not the plan's {self.total}")
        samples = self.total if self.mix is None else self.mix.total_samples
        if self.shard_sizes and sum(self.shard_sizes) != samples:
            raise ValueError(f"shard sizes add up to {sum(self.shard_sizes)} samples, not the plan's {samples}")
        if self.mix is not None and len(self.shard_sizes) != sum(self.mix.shards):
            raise ValueError(f"{len(self.shard_sizes)} shard sizes for a mixture of {sum(self.mix.shards)} shards")
        if self.shuffle == "block" and not self.shard_sizes:
            raise ValueError("shuffle='block' needs the shard sizes (shard_sizes); the loader passes "
                             "its shard set's")

    def __getstate__(self):  # the fields only: cached layouts are rebuilt where needed (workers)
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # --- per position and per batch: O(batch) -------------------------------------------------------

    def order_at(self, positions) -> np.ndarray:
        """Global sample ids at positions of the epoch's permutation (before rank slicing):
        int [...] in [0, total) → int64, positions' shape. O(positions) time and memory."""
        p = np.asarray(positions, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.total):
            raise IndexError(f"positions outside the epoch's {self.total} samples")
        flat = p.reshape(-1)
        if len(flat) <= _CHUNK:
            return self._ids(flat).reshape(p.shape)
        out = np.empty(len(flat), dtype=np.int64)
        for lo in range(0, len(flat), _CHUNK):
            out[lo:lo + _CHUNK] = self._ids(flat[lo:lo + _CHUNK])
        return out.reshape(p.shape)

    def batch(self, b: int) -> np.ndarray:
        """This rank's batch b of the epoch: global sample ids, int64 [batch_size] (the last one
        shorter without drop_last). O(batch_size) whatever the epoch's size."""
        if not 0 <= b < self.num_batches:
            raise IndexError(f"batch {b} outside this rank's {self.num_batches} batches of epoch {self.epoch}")
        lo = b * self.batch_size
        return self._ids(self._positions(lo, min(lo + self.batch_size, self._per_rank)))

    def iter_batches(self, start: int = 0) -> Iterator[np.ndarray]:
        """`batch(b)` for b from `start` to the end of the epoch, computed as they are taken."""
        for b in range(start, self.num_batches):
            yield self.batch(b)

    def _ids(self, p: np.ndarray) -> np.ndarray:
        """Global ids at positions p (int64 [m], valid): the epoch's permutation evaluated there."""
        if self.shuffle != "block":
            slots = p.copy() if self.shuffle == "none" else permute(p, self.total, self._keys)
            return slots if self.mix is None else self.mix.ids(slots, self.seed, self.epoch)
        lay = self._blocks
        k = np.searchsorted(lay.ends, p, side="right")  # empty blocks end where they start: skipped
        start = lay.starts[k]
        u = start + walk((p - start).astype(np.uint64), lay.lengths[k], lay.a[k], lay.b[k], lay.keys[:, k])
        # u is a position of the permuted shards laid end to end: its shard's run gives the id.
        return u + lay.shift[np.searchsorted(lay.run_ends, u, side="right")]

    def _positions(self, lo: int, hi: int) -> np.ndarray:
        """Epoch positions of this rank's samples lo..hi-1, in the order it yields them: rank r's
        j-th sample is position offset + j·W + r, wrapped to the epoch's start when padding."""
        t = np.arange(lo, hi, dtype=np.int64) * self.world_size + self.rank
        if not self.drop_last:
            t %= self.total - self.offset  # eval padding: the permutation (from offset) again
        return self.offset + t

    @property
    def _per_rank(self) -> int:
        left, world = self.total - self.offset, self.world_size
        return left // (world * self.batch_size) * self.batch_size if self.drop_last else -(-left // world)

    @_memo
    def _keys(self) -> np.ndarray:
        return round_keys(self.seed, self.epoch, _GLOBAL)

    @_memo
    def _ends(self) -> np.ndarray:
        """int64 [shards]: the end of each shard's global ids (storage order)."""
        return np.cumsum(np.asarray(self.shard_sizes, dtype=np.int64))

    @_memo
    def _blocks(self) -> _Blocks:
        # The shards laid end to end, each a run of consecutive ids; a mixture's are its epoch's
        # pieces (whole shards once per repeat, parts of shards for a fractional weight).
        sizes = np.asarray(self.shard_sizes, dtype=np.int64)
        if self.mix is None:
            first, sizes, numbers = self._ends - sizes, sizes, np.arange(len(sizes))
        else:
            first, sizes, numbers = self.mix.pieces(sizes, self.seed, self.epoch)
        order = permute(np.arange(len(sizes)), len(sizes), round_keys(self.seed, self.epoch, _SHARDS))
        lengths = sizes[order]
        run_ends = np.cumsum(lengths)
        run_starts = run_ends - lengths
        starts = run_starts[::self.block_shards]
        ends = np.append(starts[1:], self.total)
        keys = mix_array(self.seed, self.epoch, _BLOCK, np.arange(len(starts))[None, :], np.arange(ROUNDS)[:, None])
        lengths = (ends - starts).astype(np.uint64)
        return _Blocks(numbers[order], run_ends, first[order] - run_starts, starts, ends, keys, lengths,
                       *domain(lengths))

    # --- whole epochs: O(N), for tests, tools and small sets ----------------------------------------

    def order(self) -> np.ndarray:
        """Global sample ids of the whole epoch, before rank slicing: int64 [total]. O(N)."""
        return self.order_at(np.arange(self.total, dtype=np.int64))

    def rank_ids(self) -> np.ndarray:
        """This rank's sample ids for the epoch, in the order it yields them. O(N / W)."""
        return self.order_at(self._positions(0, self._per_rank))

    @property
    def num_batches(self) -> int:
        return -(-self._per_rank // self.batch_size)

    def consumed(self, batches: int) -> int:
        """Samples of the permutation used up once every rank has yielded `batches` batches
        (counting `offset`): where a plan for another world size or batch size takes over."""
        left = self.total - self.offset
        return self.offset + min(batches * self.batch_size * self.world_size, left)

    def batches(self, start: int = 0) -> list[np.ndarray]:
        """The epoch's batches of sample ids from batch `start` on (resume skips the rest). O(N / W):
        loaders take `batch(b)` / `iter_batches(start)` instead."""
        lo = min(start * self.batch_size, self._per_rank)
        ids = self.order_at(self._positions(lo, self._per_rank))
        return [ids[i:i + self.batch_size] for i in range(0, len(ids), self.batch_size)]

    def shards_of(self, ids) -> np.ndarray:
        """Shard number (position in `shard_sizes`) of each global sample id: int64, ids' shape."""
        if not self.shard_sizes:
            raise ValueError("this plan has no shard sizes; build it with shard_sizes=")
        return np.searchsorted(self._ends, ids, side="right").astype(np.int64)

    def read_order(self, start: int = 0, step: int = 8) -> Iterator[np.ndarray]:
        """Shard numbers in the order this rank first needs them from batch `start` on, in chunks,
        computed as they are taken (a cache stops once its window is full); a shard may recur in
        later chunks. "block": whole blocks, from the one batch `start` begins in, straight from
        the O(S) layout; "global" and "none": batch after batch, `step` batches a chunk, growing."""
        if start >= self.num_batches:
            return
        if self.shuffle == "block":
            lay = self._blocks
            first = int(self._positions(start * self.batch_size, start * self.batch_size + 1)[0])
            k = int(np.searchsorted(lay.ends, first, side="right"))
            for lo in range(k * self.block_shards, len(lay.shards), self.block_shards):
                yield lay.shards[lo:lo + self.block_shards]
            return
        b = start
        while b < self.num_batches:
            shards = self.shards_of(np.concatenate([self.batch(k) for k in range(b, min(self.num_batches, b + step))]))
            _, first = np.unique(shards, return_index=True)
            yield shards[np.sort(first)]
            b, step = b + step, min(2 * step, 512)

    def shard_order(self, start: int = 0) -> np.ndarray:
        """The shards this rank reads from batch `start` to the end of the epoch, each once, in
        the order it first needs them: what a shard cache prefetches (and, by the last use,
        may evict). int64 [shards needed]; O(N / W). Under "block" other ranks need the same
        shards at about the same time (see the module docstring); under "global" this is nearly
        every shard within the first few batches."""
        shards = self.shards_of(np.concatenate(self.batches(start) or [np.zeros(0, np.int64)]))
        _, first = np.unique(shards, return_index=True)
        return shards[np.sort(first)]
