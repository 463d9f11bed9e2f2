"""ALIP's objective: the gated dual-path loss (train/losses.py `AlipLoss`, train/gates.py) over
raw text and synthetic caption, its gates' statistics in the records, and the gates' last weight
per sample id (train/sample_weights.py: `sample_weights.pt`, which the training-time AUC reads)."""
from __future__ import annotations

import os

import torch

from train.config import TrainConfig
from train.distributed import DistEnv
from train.losses import AlipLoss
from train.objectives.base import Objective
from train.sample_weights import SampleWeights


def gate_metrics(info: dict) -> dict:
    """The gates' running means and their weights' mean and deciles (w_syn over the samples that
    have a synthetic caption, when any does)."""
    out = {f"gate/{k}": float(info[k]) for k in ("h_tc", "h_xt", "h_xc")}
    for k in ("w_sample", "w_raw", "w_syn"):
        w = info[k].float()
        if k == "w_syn":
            w = w[info["syn_mask"]] if info["syn_mask"].any() else w
        q = torch.quantile(w, torch.tensor([0.1, 0.5, 0.9], device=w.device))
        out.update({f"gate/{k}_mean": float(w.mean()), f"gate/{k}_q10": float(q[0]),
                    f"gate/{k}_q50": float(q[1]), f"gate/{k}_q90": float(q[2])})
    return out


class AlipObjective(Objective):
    texts = (True, True)

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        super().__init__(cfg, env)
        loss = cfg.loss
        self.loss_fn = AlipLoss(loss.momentum, loss.gamma_sample, loss.gamma_pair, loss.normalize, loss.h_init,
                                **self.gather_options()).to(env.device)
        self.weights: SampleWeights | None = None

    def begin_run(self, loader, steps_per_epoch: int) -> None:
        self.weights = SampleWeights.for_loader(loader, self.env.device, steps_per_epoch,
                                                self.cfg.run.sample_record_max)

    def loss(self, image, raw, syn, scale, has_syn):
        # float32 features: the softmax over the global batch and the gates' exponentials need the range
        return self.loss_fn(image.float(), raw.float(), syn.float(), scale.float(), has_syn)

    def record(self, step: int, batch, info: dict) -> None:
        if self.weights is not None:
            self.weights.record(step, batch, info, self.env.rank)  # info holds the global batch

    def metrics(self, info: dict) -> dict[str, float]:
        return {**super().metrics(info), **gate_metrics(info)}

    def histograms(self, info: dict) -> dict[str, torch.Tensor]:
        return {"gate/w_sample": info["w_sample"]}

    def checkpoint_state(self, world_size: int) -> dict:
        state = super().checkpoint_state(world_size)
        if self.weights is not None:  # merging is collective: every rank calls it
            state["sample_weights"] = self.weights.merged(world_size)
        return state

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        if self.weights is not None and "sample_weights" in state:
            self.weights.load_state_dict(state["sample_weights"])

    def finish(self, run_dir: str) -> None:
        if self.weights is not None:
            self.weights.save(os.path.join(run_dir, "sample_weights.pt"), self.env.world_size, self.env.is_main)
