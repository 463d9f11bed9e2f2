"""Several sources in one epoch: how weights become samples per epoch, and which sample each of an
epoch's slots holds (docs/design.md, "Mixing datasets").

Source s holds N_s samples, global ids off_s .. off_s + N_s - 1 (sources laid in list order), and
has a weight w_s > 0, a repeat factor: it contributes M_s = round(w_s · N_s) samples to every epoch.
An epoch is T = Σ M_s slots, laid source after source; the epoch plan (pipelines/plan/epoch_plan.py)
permutes them exactly as it permutes one folder's samples, so every guarantee of the plan (ranks
disjoint, O(batch) per batch, exact and elastic resume) holds over the mixture unchanged. This module
maps a slot v ∈ [0, T) to a sample id, O(1) per slot:
- s is the source whose slots [start_s, start_s + M_s) hold v, and j = v - start_s;
- j < floor(w_s) · N_s, a whole repeat: sample off_s + (j mod N_s), so each sample comes
  floor(w_s) times;
- else the fractional part, k = j - floor(w_s) · N_s < F_s = M_s - floor(w_s) · N_s: sample
  off_s + σ_s((e · F_s + k) mod N_s), where σ_s is a keyed bijection of the source fixed by
  (seed, source) alone. Epoch e takes the window of F_s consecutive σ-positions starting at e · F_s,
  so consecutive epochs take consecutive windows and every sample comes once in every
  ceil(N_s / F_s) epochs (weight 0.25: a different quarter each epoch, all of it over 4).
Each epoch's map is one-to-one onto that multiset, so the plan stays a bijection of the epoch's slots.
With every weight 1 the map is the identity: a one-folder loader orders its epochs as before.

Block shuffle needs runs of whole shards, not single samples: there σ_s permutes the source's
shards (not its samples) and lays them end to end, so an epoch's window is a run of whole shards
plus at most two partial ones; `pieces` lists the epoch's shards and shard parts (each a contiguous
range of ids: whole repeats as the shards themselves, once per repeat), and the plan shuffles those
as it shuffles one folder's shards. O(shards) per epoch, as the plan's block layout already is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.plan.permutation import permute, round_keys

# Key domains (the plan's own are 1..3): a source's fractional windows, by sample and by shard.
_FRACTION, _FRACTION_SHARDS = 4, 5


def per_epoch(samples: int, weight: float) -> int:
    """Samples a source of `samples` contributes to every epoch at `weight`: round(weight · samples),
    halves up."""
    return int(math.floor(weight * samples + 0.5))


def check_weight(weight, where: str) -> float:
    """A source's weight as a float, or a ValueError naming the source and the fix."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"{where}: weight must be a number > 0, not {weight!r}")
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where}: weight must be a finite number > 0, not {weight!r}")
    return float(weight)


@dataclass(frozen=True)
class Mix:
    """What the plan needs of a mixture: per source its samples N_s, weight w_s and number of
    shards (the plan's `shard_sizes` run source after source, in list order)."""

    samples: tuple[int, ...]
    weights: tuple[float, ...]
    shards: tuple[int, ...]

    def __post_init__(self):
        if not len(self.samples) == len(self.weights) == len(self.shards) or not self.samples:
            raise ValueError("a mixture needs samples, weights and shard counts for each of ≥ 1 sources")
        for s, (n, w) in enumerate(zip(self.samples, self.weights)):
            check_weight(w, f"source {s}")
            if per_epoch(n, w) < 1:
                raise ValueError(f"source {s}: weight {w} × {n} samples rounds to no sample per epoch; "
                                 "raise its weight")

    @property
    def per_epoch(self) -> tuple[int, ...]:
        """M_s: samples each source contributes to every epoch."""
        return tuple(per_epoch(n, w) for n, w in zip(self.samples, self.weights))

    @property
    def length(self) -> int:
        """T: slots of an epoch."""
        return sum(self.per_epoch)

    @property
    def total_samples(self) -> int:
        return sum(self.samples)

    @property
    def identity(self) -> bool:
        """True when every slot is its own sample id (each source once per epoch, in place)."""
        return all(m == n and math.floor(w) == 1 for n, w, m in zip(self.samples, self.weights, self.per_epoch))

    def _arrays(self):
        n = np.asarray(self.samples, np.int64)
        m = np.asarray(self.per_epoch, np.int64)
        whole = np.asarray([math.floor(w) for w in self.weights], np.int64) * n
        return n, m, whole, np.cumsum(n) - n, np.cumsum(m)

    def source_of(self, ids) -> np.ndarray:
        """Source position of each global sample id: int64, ids' shape."""
        return np.searchsorted(np.cumsum(np.asarray(self.samples, np.int64)), ids, side="right").astype(np.int64)

    def ids(self, slots, seed: int, epoch: int) -> np.ndarray:
        """Global sample ids of an epoch's slots: int [m] in [0, T) → int64 [m]. O(m)."""
        n, m, whole, offsets, slot_ends = self._arrays()
        v = np.asarray(slots, np.int64)
        s = np.searchsorted(slot_ends, v, side="right")
        j = v - (slot_ends - m)[s]
        out = offsets[s] + j % n[s]
        frac = np.flatnonzero(j >= whole[s])
        if frac.size:
            fs = s[frac]
            f = m[fs] - whole[fs]
            window = (epoch * f + j[frac] - whole[fs]) % n[fs]
            keys = np.stack([round_keys(seed, k, _FRACTION) for k in range(len(n))], axis=1)
            out[frac] = offsets[fs] + permute(window, n[fs], keys[:, fs])
        return out

    def pieces(self, shard_sizes, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An epoch's shards and shard parts for block shuffle, source after source: (first global
        id, samples, shard number), each int64 [P]. Lengths add up to T; O(shards)."""
        sizes = np.asarray(shard_sizes, np.int64)
        ends = np.cumsum(sizes)
        id_starts = ends - sizes
        starts, lengths, numbers = [], [], []
        lo = 0
        for s, (n, w, k) in enumerate(zip(self.samples, self.weights, self.shards)):
            own = np.arange(lo, lo + k)
            lo += k
            for _ in range(math.floor(w)):
                starts.append(id_starts[own]), lengths.append(sizes[own]), numbers.append(own)
            f = per_epoch(n, w) - math.floor(w) * n
            if f == 0:
                continue
            laid = own[permute(np.arange(k), k, round_keys(seed, s, _FRACTION_SHARDS))]
            laid_ends = np.cumsum(sizes[laid])
            laid_starts = laid_ends - sizes[laid]
            a = epoch * f % n
            for seg_lo, seg_hi in ((a, min(a + f, n)), (0, a + f - n)):
                if seg_hi <= seg_lo:
                    continue
                k0 = int(np.searchsorted(laid_ends, seg_lo, side="right"))
                k1 = int(np.searchsorted(laid_starts, seg_hi, side="left"))
                cut_lo = np.maximum(laid_starts[k0:k1], seg_lo)
                cut_hi = np.minimum(laid_ends[k0:k1], seg_hi)
                starts.append(id_starts[laid[k0:k1]] + cut_lo - laid_starts[k0:k1])
                lengths.append(cut_hi - cut_lo)
                numbers.append(laid[k0:k1])
        return tuple(np.concatenate(x).astype(np.int64) for x in (starts, lengths, numbers))


__all__ = ["Mix", "per_epoch", "check_weight"]
