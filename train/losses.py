"""Contrastive losses: CLIP's symmetric InfoNCE and ALIP's gated dual-path loss, one
implementation with options each, plain tensors in and out (open_clip's `loss.py` conventions).

Call convention (open_clip's): normalized features, `logit_scale` already exponentiated.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F
from torch import nn

from train.gates import ConsistencyGates


def gather_features(features: list[torch.Tensor], local_loss: bool, gather_with_grad: bool,
                    rank: int, world_size: int) -> list[torch.Tensor]:
    """All-gather each [B, D] tensor to [world·B, D]. Without `gather_with_grad` the other ranks'
    parts are constants; unless `local_loss`, this rank's part keeps its gradient."""
    out = []
    for f in features:
        if gather_with_grad:
            out.append(torch.cat(torch.distributed.nn.all_gather(f), dim=0))
            continue
        parts = [torch.zeros_like(f) for _ in range(world_size)]
        dist.all_gather(parts, f.contiguous())
        if not local_loss:
            parts[rank] = f
        out.append(torch.cat(parts, dim=0))
    return out


class Contrastive(nn.Module):
    """What every contrastive loss here shares: global-batch logits (open_clip's gather options)
    and the matching labels; subclasses turn logits into a loss."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self._labels: dict[tuple, torch.Tensor] = {}

    def labels(self, device, n: int) -> torch.Tensor:
        key = (device, n)
        if key in self._labels:
            return self._labels[key]
        labels = torch.arange(n, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + n * self.rank
        if self.cache_labels:
            self._labels[key] = labels
        return labels

    def logits(self, image: torch.Tensor, text: torch.Tensor, logit_scale, gathered=None):
        """(logits_per_image, logits_per_text): [n, N] where n is the local batch under
        local_loss and the global batch otherwise."""
        if self.world_size > 1:
            all_image, all_text = gathered or gather_features(
                [image, text], self.local_loss, self.gather_with_grad, self.rank, self.world_size)
            if self.local_loss:
                return logit_scale * image @ all_text.T, logit_scale * text @ all_image.T
            per_image = logit_scale * all_image @ all_text.T
            return per_image, per_image.T
        return logit_scale * image @ text.T, logit_scale * text @ image.T

    def per_sample(self, image, text, logit_scale, gathered=None) -> torch.Tensor:
        """(CE_i2t(i) + CE_t2i(i)) / 2 for every row this rank computes."""
        per_image, per_text = self.logits(image, text, logit_scale, gathered)
        labels = self.labels(image.device, per_image.shape[0])
        return (F.cross_entropy(per_image, labels, reduction="none")
                + F.cross_entropy(per_text, labels, reduction="none")) / 2


class ClipLoss(Contrastive):
    """open_clip's ClipLoss: same options, same value and gradients."""

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False):
        loss = self.per_sample(image_features, text_features, logit_scale).mean()
        return {"contrastive_loss": loss} if output_dict else loss


class AlipLoss(Contrastive):
    """ALIP's adaptive contrastive loss over the global batch (docs/design.md §6):
    total = mean_i(W_s·W_t·L_raw(i)) + mean_i(W_s·W_c·L_syn(i)) over the samples with a
    synthetic caption for the second term, where L(i) = (CE_i2t(i) + CE_t2i(i)) / 2.
    `normalize="mean"` divides each weighted sum by its sample count (ALIP's code);
    `"weight_sum"` by the sum of the weights, which keeps the loss scale steady as gates move."""

    def __init__(self, momentum: float = 0.99, gamma_sample: float = 2.0, gamma_pair: float = 2.0,
                 normalize: str = "mean", h_init: str = "one", **kwargs):
        super().__init__(**kwargs)
        if normalize not in ("mean", "weight_sum"):
            raise ValueError(f"normalize must be 'mean' or 'weight_sum', not {normalize!r}")
        self.normalize = normalize
        self.gates = ConsistencyGates(momentum, gamma_sample, gamma_pair, h_init)

    def _reduce(self, losses, weights, mask):
        weights = weights * mask
        denom = mask.sum() if self.normalize == "mean" else weights.sum()
        return (losses * weights).sum() / denom.clamp(min=1e-12)

    def forward(self, image_features, raw_features, syn_features, logit_scale, has_syn=None):
        if has_syn is None:
            has_syn = torch.ones(image_features.shape[0], dtype=torch.bool, device=image_features.device)
        if self.world_size > 1:
            # One gather for all three: the gates need them anyway, the loss reuses them.
            all_image, all_raw, all_syn = gather_features(
                [image_features, raw_features, syn_features], self.local_loss, self.gather_with_grad,
                self.rank, self.world_size)
            all_has_syn = gather_features([has_syn.float()], True, False, self.rank, self.world_size)[0] > 0.5
        else:
            all_image, all_raw, all_syn, all_has_syn = image_features, raw_features, syn_features, has_syn
        info = self.gates(all_image, all_raw, all_syn, all_has_syn)
        w_s, w_t, w_c, mask = info["w_sample"], info["w_raw"], info["w_syn"], info["syn_mask"].float()
        if self.world_size > 1 and self.local_loss:  # rows of this rank only
            rows = slice(self.rank * image_features.shape[0], (self.rank + 1) * image_features.shape[0])
            w_s, w_t, w_c, mask = w_s[rows], w_t[rows], w_c[rows], mask[rows]
        world = self.world_size > 1
        raw_loss = self.per_sample(image_features, raw_features, logit_scale,
                                   (all_image, all_raw) if world else None)
        syn_loss = self.per_sample(image_features, syn_features, logit_scale,
                                   (all_image, all_syn) if world else None)
        loss_raw = self._reduce(raw_loss, w_s * w_t, torch.ones_like(mask))
        loss_syn = self._reduce(syn_loss, w_s * w_c, mask) if mask.any() else syn_loss.sum() * 0
        info.update(loss_raw=loss_raw.detach(), loss_syn=loss_syn.detach())
        return loss_raw + loss_syn, info
