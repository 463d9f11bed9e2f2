"""Bad samples met mid-epoch: named, counted, substituted, remembered across a resume.

A shard that opens fine can still hold an image that does not decode. Dropping it would leave
that rank one sample short (a DDP hang); so under `on_error="skip"` the sample is replaced by a
deterministic substitute, the next sample id (cyclically) not known to be bad, and every other
sample keeps its place in the plan. Substitutes depend on the data only, never on which worker
or backend met the fault, so the batch stays identical across backends and resumes. A run of more
than `max_in_a_row` bad samples in plan order is an error (Megatron-Energon's rule): that is a
broken dataset, not noise. Under `on_error="raise"` the first bad sample is an error naming its
shard and key. In a mixture of sources (pipelines/sources.py) both hold per source: a substitute
comes from the bad sample's own source, and runs are counted within each source.
"""
from __future__ import annotations

import logging

import numpy as np

from pipelines.errors import SampleError

log = logging.getLogger("pipelines")


class BadSamples:
    def __init__(self, total: int, on_error: str = "raise", max_in_a_row: int = 100,
                 bounds: list[tuple[int, int]] | None = None):
        """`bounds`: [first id, end id) of each source of a mixture; default one source of `total`."""
        self.total, self.on_error, self.max_in_a_row = total, on_error, max_in_a_row
        self.bounds = bounds or [(0, total)]
        self._starts = np.array([lo for lo, _ in self.bounds[1:]], dtype=np.int64)
        self.found: dict[int, str] = {}  # sample id -> where and why, e.g. "000003.tar: key 0042: ..."
        self._runs = [0] * len(self.bounds)  # bad samples in a row per source, in the order batches were yielded

    def _source(self, gid: int) -> int:
        return int(np.searchsorted(self._starts, gid, side="right"))

    def __len__(self) -> int:
        return len(self.found)

    def substitute(self, gid: int) -> int:
        """The id delivered in place of `gid`: itself unless known bad, else the next good one."""
        g = int(gid)
        lo, hi = self.bounds[self._source(g)]
        for _ in range(hi - lo):
            if g not in self.found:
                return g
            g = lo + (g + 1 - lo) % (hi - lo)
        raise SampleError(f"every one of the {hi - lo} samples{self._of(gid)} failed to decode")

    def _of(self, gid: int) -> str:
        return f" of source {self._source(gid)}" if len(self.bounds) > 1 else ""

    def apply(self, ids: np.ndarray) -> np.ndarray:
        """Planned ids → delivered ids (a copy only when something is substituted)."""
        if not self.found or not any(int(g) in self.found for g in ids):
            return ids
        return np.array([self.substitute(g) for g in ids], dtype=np.int64)

    def report(self, gid: int, where: str, error: BaseException | str) -> None:
        """Record one bad sample; raises under on_error="raise"."""
        message = f"{where}: image does not decode ({error})"
        if self.on_error == "raise":
            raise SampleError(message + "; fix or drop the sample, or set on_error='skip' to substitute it")
        if int(gid) not in self.found:
            log.warning("bad sample, substituted: %s", message)
        self.found[int(gid)] = message

    def count(self, planned: np.ndarray) -> None:
        """Follow the yielded plan for runs of bad samples; too long a run is an error."""
        if not self.found:
            self._runs = [0] * len(self.bounds)
            return
        for g in planned:
            s = self._source(int(g))
            self._runs[s] = self._runs[s] + 1 if int(g) in self.found else 0
            if self._runs[s] > self.max_in_a_row:
                raise SampleError(f"more than {self.max_in_a_row} bad samples in a row{self._of(g)} (last: "
                                  f"{self.found[int(g)]}): the data is broken, not noisy; "
                                  "check the shards with verify-shards")

    def state_dict(self) -> dict:
        runs = self._runs[0] if len(self._runs) == 1 else list(self._runs)  # one source: as before mixing
        return {"found": {str(k): v for k, v in sorted(self.found.items())}, "run": runs}

    def load_state_dict(self, state: dict) -> None:
        self.found = {int(k): v for k, v in state.get("found", {}).items()}
        runs = state.get("run", 0)
        runs = [int(r) for r in runs] if isinstance(runs, list) else [int(runs)] + [0] * (len(self.bounds) - 1)
        self._runs = runs if len(runs) == len(self.bounds) else [0] * len(self.bounds)
