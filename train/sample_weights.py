"""Per-sample record of the weights ALIP's gates gave during training, indexed by sample id.

What the method actually does to each sample is the weight it got when it was last trained on,
not what the final model would say about it afterwards; recording it costs one indexed write per
step (no second pass over the data). Tensors live on the training device so recording never
waits for the GPU; `merged()` combines the ranks (each records only its own rows) and is what
checkpoints and `sample_weights.pt` hold:
    w_sample  float32 [N]  the last W_s (language gate) per sample id, NaN if never seen
    w_pair    float32 [N]  the last W_s·W_t (the raw path's total weight)
    gate_margin float32 [N]  the last S_tc − H_tc, the language gate's score before W_s clips it at 1
                           (+inf for a sample without a synthetic caption: never gated)
    step      int64   [N]  the step that weight belongs to (1-based), -1 if never seen
plus `steps_per_epoch`, so readers can keep the final epoch's records only.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class SampleWeights:
    def __init__(self, n: int, device: torch.device, steps_per_epoch: int, shardset=None):
        self.n, self.device, self.steps_per_epoch = n, device, steps_per_epoch
        self.shardset = shardset  # maps keys to ids for batches without `ids`
        self._key_to_id: dict[str, int] | None = None
        self.w_sample = torch.full((n,), float("nan"), device=device)
        self.w_pair = torch.full((n,), float("nan"), device=device)
        self.gate_margin = torch.full((n,), float("nan"), device=device)
        self.step = torch.full((n,), -1, dtype=torch.int64, device=device)

    @classmethod
    def for_loader(cls, loader, device: torch.device, steps_per_epoch: int) -> "SampleWeights | None":
        """None when the loader cannot name its samples' ids (e.g. benchmark batches from memory)."""
        shardset = getattr(loader, "shardset", None)
        return cls(len(shardset), device, steps_per_epoch, shardset) if shardset is not None else None

    def ids_of(self, batch) -> torch.Tensor:
        ids = getattr(batch, "ids", None)
        if ids is None:  # loaders that predate Batch.ids: look the keys up once
            if self._key_to_id is None:
                self._key_to_id = {self.shardset.key(g): g for g in range(self.n)}
            ids = torch.tensor([self._key_to_id[k] for k in batch.keys], dtype=torch.int64)
        return ids.to(self.device, non_blocking=True)

    @torch.no_grad()
    def record(self, step: int, batch, info: dict, rank: int = 0) -> None:
        """Store this rank's rows of the global-batch weights in `info` (AlipLoss's) for `batch`."""
        b = len(batch)
        rows = slice(rank * b, (rank + 1) * b)  # gathered features are concatenated in rank order
        ids = self.ids_of(batch)
        w_sample = info["w_sample"][rows].float()
        self.w_sample[ids] = w_sample
        self.w_pair[ids] = w_sample * info["w_raw"][rows].float()
        # W_s = min(1, exp(γ·margin)) ties every sample above the running mean at 1; the margin
        # keeps their order, so readers can tell the gate's ranking from the clip's ties.
        margin = (info["s_tc"][rows] - info["h_tc"]).float()
        self.gate_margin[ids] = torch.where(info["syn_mask"][rows], margin, torch.full_like(margin, float("inf")))
        self.step[ids] = step

    @torch.no_grad()
    def merged(self, world_size: int = 1) -> dict:
        """Every rank's latest record per sample (all ranks must call it: it all-reduces)."""
        step = self.step.clone()
        values = [self.w_sample.clone(), self.w_pair.clone(), self.gate_margin.clone()]
        if world_size > 1:
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
            # A sample is trained on by one rank per step, so the latest record is one rank's.
            mine = self.step == step
            for w in values:
                w.copy_(torch.where(mine, w.nan_to_num(0.0, posinf=float("inf")), torch.zeros_like(w)))
                dist.all_reduce(w)
                w[step < 0] = float("nan")
        return {"w_sample": values[0].cpu(), "w_pair": values[1].cpu(), "gate_margin": values[2].cpu(),
                "step": step.cpu(), "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        for name in ("w_sample", "w_pair", "gate_margin", "step"):
            if name in state:  # checkpoints from before gate_margin was recorded keep it unknown (NaN)
                getattr(self, name).copy_(state[name].to(self.device))

    def save(self, path: str, world_size: int = 1, is_main: bool = True) -> None:
        state = self.merged(world_size)
        if is_main:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            torch.save(state, path)


def final_epoch(state: dict) -> torch.Tensor:
    """bool [N]: the samples whose last record falls in the run's last epoch-length of steps."""
    last = int(state["step"].max())
    return state["step"] > last - int(state["steps_per_epoch"])
