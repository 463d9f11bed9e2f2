"""ELIP's evidential objective (train/variants/evidential.py `EvidentialLoss`): CLIP's objective
with the evidential loss, between the images and the texts `loss.text` names; the KL term annealed
by the loader's epoch; with a constant `loss.evidential_scale` the model's logit scale is frozen."""
from __future__ import annotations

from torch import nn

from train.config import TrainConfig, evidential_scale
from train.distributed import DistEnv
from train.objectives.clip import ClipObjective
from train.variants.evidential import EvidentialLoss


class EvidentialObjective(ClipObjective):
    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.scale = evidential_scale(cfg.loss.evidential_scale)  # None: learned (the model's)
        super().__init__(cfg, env)
        self.texts = (cfg.loss.text in ("raw", "both"), cfg.loss.text in ("syn", "both"))

    def build_loss(self) -> nn.Module:
        loss = self.cfg.loss
        return EvidentialLoss(loss.evidential_clamp, loss.kl_anneal_epochs, self.scale, **self.gather_options())

    def prepare(self, model: nn.Module) -> None:
        if self.scale is not None:
            model.clip.logit_scale.requires_grad_(False)  # no loss term reads it: DDP wants no unused trainables

    def step(self, forward, batch, autocast, epoch: int):
        self.loss_fn.epoch = epoch  # the KL term's annealing
        return super().step(forward, batch, autocast, epoch)
