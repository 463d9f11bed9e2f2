"""CLIP's objective: InfoNCE between the images and each text the run pairs with them, one term
per text, summed (`clip-raw`: the raw text; `clip-both`: raw text and synthetic caption). The
evidential objective is this one with another loss module (train/objectives/evidential.py)."""
from __future__ import annotations

from torch import nn

from train.config import TrainConfig
from train.distributed import DistEnv
from train.losses import ClipLoss
from train.objectives.base import Objective


class ClipObjective(Objective):
    def __init__(self, cfg: TrainConfig, env: DistEnv, syn: bool = True):
        super().__init__(cfg, env)
        self.texts = (True, syn)
        self.loss_fn = self.build_loss().to(env.device)

    def build_loss(self) -> nn.Module:
        """A module `(image [B, D], text [B, D], scale) → loss`, applied once per text."""
        return ClipLoss(**self.gather_options())

    def loss(self, image, raw, syn, scale, has_syn):
        """Features in float32 whatever the autocast dtype: the softmax over the global batch needs
        the range. The terms are summed, each logged (`loss_raw`, `loss_syn`)."""
        use_raw, use_syn = self.texts
        texts = {"loss_raw": raw} if use_raw else {}
        if use_syn:
            texts["loss_syn"] = syn
        terms = {name: self.loss_fn(image.float(), text.float(), scale.float()) for name, text in texts.items()}
        return sum(terms.values()), {k: v.detach() for k, v in terms.items()}
