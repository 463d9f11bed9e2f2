"""What a training objective is: the unit the loop calls for everything that depends on `loss.mode`
(open_clip's `task/` objects have the same shape).

An objective declares the texts its loss pairs with the images (`texts`), builds its loss module
(gates included) on the run's device, computes one micro-batch's loss from the model's forward
(`step`), names what the records log (`metrics`, `histograms`), and owns whatever else its mode
needs: changes to the model before it trains (`prepare`), per-sample records (`record`), the
checkpoint entries (`checkpoint_state`) and files it leaves at the end (`finish`).
"""
from __future__ import annotations

import torch
from torch import nn

from train.config import TrainConfig
from train.distributed import DistEnv


class Objective:
    """The base does what most objectives share; subclasses set `texts`, build `self.loss_fn` in
    their constructor and implement `loss`."""

    texts: tuple[bool, bool] = (True, False)  # (raw, syn): which texts the loss pairs with the images

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.loss_fn: nn.Module | None = None

    def gather_options(self) -> dict:
        """The keyword arguments every `train.losses.Contrastive` takes for this run."""
        return dict(local_loss=self.cfg.loss.local_loss, gather_with_grad=self.cfg.loss.gather_with_grad,
                    cache_labels=True, rank=self.env.rank, world_size=self.env.world_size)

    def prepare(self, model: nn.Module) -> None:
        """Change the built model before DDP and the optimizer take what trains."""

    def begin_run(self, loader, steps_per_epoch: int) -> None:
        """Called once the run's loader is known (before a resume loads `checkpoint_state`)."""

    def step(self, forward, batch, autocast, epoch: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """One micro-batch: (loss, info, the forward's exponentiated logit scale). `forward` is the
        (wrapped) DualPathCLIP, `autocast` a context-manager factory, `epoch` the loader's."""
        use_raw, use_syn = self.texts
        with autocast():  # a syn-only loss sends the synthetic tokens down the first path
            image, first, second, scale = forward(
                batch.images, batch.raw_tokens if use_raw else batch.syn_tokens,
                batch.syn_tokens if use_raw and use_syn else None)
        raw, syn = (first, second) if use_raw else (None, first)
        loss, info = self.loss(image, raw, syn, scale, batch.has_syn)
        return loss, info, scale

    def loss(self, image, raw, syn, scale, has_syn) -> tuple[torch.Tensor, dict]:
        """Normalised features [B, D] (raw or syn None when `texts` leaves it out), the exponentiated
        logit scale and has_syn [B] bool → (loss, info with detached tensors)."""
        raise NotImplementedError

    def record(self, step: int, batch, info: dict) -> None:
        """After each micro-batch's backward: per-sample records (`step` is the one under way)."""

    def metrics(self, info: dict) -> dict[str, float]:
        """The logged step's scalars beyond the loop's own (metrics.jsonl, TensorBoard): the loss
        terms the objective sums."""
        return {k: float(info[k]) for k in ("loss_raw", "loss_syn") if k in info}

    def histograms(self, info: dict) -> dict[str, torch.Tensor]:
        """TensorBoard histograms at each logged step."""
        return {}

    def checkpoint_state(self, world_size: int) -> dict:
        """The checkpoint's entries for this objective; every rank calls it (records may merge)."""
        return {"loss": self.loss_fn.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore from a whole checkpoint dict (what `checkpoint_state` put there)."""
        self.loss_fn.load_state_dict(state["loss"])

    def finish(self, run_dir: str) -> None:
        """At the end of the run, on every rank (a merge may be collective)."""
