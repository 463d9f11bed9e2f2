"""Per-sample record of the weights ALIP's gates gave during training, indexed by sample id.

What the method actually does to each sample is the weight it got when it was last trained on,
not what the final model would say about it afterwards; recording it costs one indexed write per
step (no second pass over the data). Tensors live on the training device so recording never
waits for the GPU; `merged()` combines the ranks (each records only its own rows) and is what
checkpoints and `sample_weights.pt` hold, one row per recorded sample:
    w_sample  float32 [R]  the last W_s (language gate) per sample, NaN if never seen
    w_pair    float32 [R]  the last W_s·W_t (the raw path's total weight)
    gate_margin float32 [R]  the last S_tc − H_tc, the language gate's score before W_s clips it at 1
                           (+inf for a sample without a synthetic caption: never gated)
    step      int64   [R]  the step that weight belongs to (1-based), -1 if never seen
plus `steps_per_epoch`, so readers can keep the final epoch's records only.

Which samples (`run.sample_record_max`, M, default 1,000,000): a set of N ≤ M samples is recorded
whole, R = N rows indexed by sample id (the layout of every run before the limit existed). A
larger set records a fixed subset of R = M ids: the first M positions of a constant-keyed
permutation of [0, N) (`pipelines.plan.epoch_plan.permute`), sorted, so every run over the same N records
the same samples (seed-free), chosen without structure (not every k-th id of storage order, which
would follow shard boundaries). The file then also holds `ids` (int64 [M], the sample id of each
row) and `samples` (N). Each rank's device memory, each merge (one all-reduce per field) and each
file hold O(M) values whatever N is.

Size per checkpoint and per sample_weights.pt: 20 B per recorded sample (three float32, one
int64), 28 B with `ids`: 20·N bytes for N ≤ M (20 MB at 1 M samples), 28·M bytes above
(28 MB at the default M, at 15 M or 400 M samples alike; the same on each rank's device). A
whole record of 400 M samples would be 8 GB per rank and per checkpoint.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from pipelines.plan.epoch_plan import permute, round_keys

DEFAULT_MAX_RECORDS = 1_000_000
_SUBSET_KEY = round_keys(0x5A4D, 0x1E5)  # a constant: the subset depends on N only, never on the seed


def recorded_ids(n: int, max_records: int = DEFAULT_MAX_RECORDS) -> np.ndarray | None:
    """The sample ids a record of `n` samples keeps: None for every one (n ≤ max_records), else
    int64 [max_records], sorted, in O(max_records) time and memory."""
    if max_records < 1:
        raise ValueError(f"max_records must be ≥ 1, not {max_records}")
    if n <= max_records:
        return None
    return np.sort(permute(np.arange(max_records), n, _SUBSET_KEY))


class SampleWeights:
    def __init__(self, n: int, device: torch.device, steps_per_epoch: int, shardset=None,
                 max_records: int = DEFAULT_MAX_RECORDS):
        self.n, self.device, self.steps_per_epoch = n, device, steps_per_epoch
        self.shardset = shardset  # maps keys to ids for batches without `ids`
        self._key_to_id: dict[str, int] | None = None
        ids = recorded_ids(n, max_records)
        self.ids = None if ids is None else torch.from_numpy(ids).to(device)  # None: every id, row = id
        self.rows = n if ids is None else len(ids)
        # A subset record has one spare row past the end: samples it does not keep are written
        # there, which spares a data-dependent mask (a GPU sync) per step.
        size = self.rows + (ids is not None)
        self.w_sample = torch.full((size,), float("nan"), device=device)
        self.w_pair = torch.full((size,), float("nan"), device=device)
        self.gate_margin = torch.full((size,), float("nan"), device=device)
        self.step = torch.full((size,), -1, dtype=torch.int64, device=device)

    @classmethod
    def for_loader(cls, loader, device: torch.device, steps_per_epoch: int,
                   max_records: int = DEFAULT_MAX_RECORDS) -> "SampleWeights | None":
        """None when the loader cannot name its samples' ids (e.g. benchmark batches from memory)."""
        shardset = getattr(loader, "shardset", None)
        if shardset is None:
            return None
        return cls(len(shardset), device, steps_per_epoch, shardset, max_records)

    def ids_of(self, batch) -> torch.Tensor:
        ids = getattr(batch, "ids", None)
        if ids is None:  # loaders that predate Batch.ids: look the keys up once
            if self._key_to_id is None:
                self._key_to_id = {self.shardset.key(g): g for g in range(self.n)}
            ids = torch.tensor([self._key_to_id[k] for k in batch.keys], dtype=torch.int64)
        return ids.to(self.device, non_blocking=True)

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each sample id (int64, ids' shape); `self.rows` (the spare row) for ids not kept."""
        if self.ids is None:
            return ids
        rows = torch.searchsorted(self.ids, ids).clamp_(max=self.rows - 1)
        return torch.where(self.ids[rows] == ids, rows, torch.full_like(rows, self.rows))

    @torch.no_grad()
    def record(self, step: int, batch, info: dict, rank: int = 0) -> None:
        """Store this rank's rows of the global-batch weights in `info` (AlipLoss's) for `batch`."""
        b = len(batch)
        rows = slice(rank * b, (rank + 1) * b)  # gathered features are concatenated in rank order
        at = self.rows_of(self.ids_of(batch))
        w_sample = info["w_sample"][rows].float()
        self.w_sample[at] = w_sample
        self.w_pair[at] = w_sample * info["w_raw"][rows].float()
        # W_s = min(1, exp(γ·margin)) ties every sample above the running mean at 1; the margin
        # keeps their order, so readers can tell the gate's ranking from the clip's ties.
        margin = (info["s_tc"][rows] - info["h_tc"]).float()
        self.gate_margin[at] = torch.where(info["syn_mask"][rows], margin, torch.full_like(margin, float("inf")))
        self.step[at] = step

    @torch.no_grad()
    def merged(self, world_size: int = 1) -> dict:
        """Every rank's latest record per recorded sample (all ranks must call it: it all-reduces
        O(rows) values, never N)."""
        kept = slice(0, self.rows)
        step = self.step[kept].clone()
        values = [self.w_sample[kept].clone(), self.w_pair[kept].clone(), self.gate_margin[kept].clone()]
        if world_size > 1:
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
            # A sample is trained on by one rank per step, so the latest record is one rank's.
            mine = self.step[kept] == step
            for w in values:
                w.copy_(torch.where(mine, w.nan_to_num(0.0, posinf=float("inf")), torch.zeros_like(w)))
                dist.all_reduce(w)
                w[step < 0] = float("nan")
        state = {"w_sample": values[0].cpu(), "w_pair": values[1].cpu(), "gate_margin": values[2].cpu(),
                 "step": step.cpu(), "steps_per_epoch": self.steps_per_epoch}
        if self.ids is not None:
            state.update(ids=self.ids.cpu(), samples=self.n)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved record (`merged()`'s), whichever samples it kept: rows of samples this
        record keeps too are restored, the others stay unseen."""
        n = int(state.get("samples", len(state["step"])))
        if n != self.n:
            raise ValueError(f"the saved sample record covers {n} samples, but this run's data holds {self.n}: "
                             "resume with the same data")
        saved = state.get("ids")
        if (saved is None and self.ids is None) or (saved is not None and self.ids is not None
                                                    and torch.equal(saved.to(self.device), self.ids)):
            at = slice(0, self.rows)
        else:  # another run.sample_record_max than the run that saved it
            ids = torch.arange(n) if saved is None else saved
            at = self.rows_of(ids.to(self.device))
        for name in ("w_sample", "w_pair", "gate_margin", "step"):
            if name in state:  # checkpoints from before gate_margin was recorded keep it unknown (NaN)
                getattr(self, name)[at] = state[name].to(self.device)

    def save(self, path: str, world_size: int = 1, is_main: bool = True) -> None:
        state = self.merged(world_size)
        if is_main:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            torch.save(state, path)


def final_epoch(state: dict) -> torch.Tensor:
    """bool [rows]: the recorded samples whose last record falls in the run's last epoch-length
    of steps (`state["ids"]` names them when the record is a subset); never those never seen,
    even in a run shorter than an epoch."""
    last = int(state["step"].max())
    return (state["step"] > last - int(state["steps_per_epoch"])) & (state["step"] > 0)


def record_ids(state: dict) -> np.ndarray:
    """int64 [rows]: the sample id of each row of a saved record."""
    return state["ids"].numpy() if "ids" in state else np.arange(len(state["step"]), dtype=np.int64)
