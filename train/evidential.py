"""Evidential contrastive fine-tuning (ELIP, Sun et al., WWW 2024; DESIGN.md §6).

Each row of the logits (image→text and text→image) is read as evidence for a K-way choice over
the batch: α = exp(clamp(L, −c, c)) + 1, S = Σ_j α_j. The loss per row is the expected
cross-entropy under Dir(α), ψ(S) − ψ(α_y), plus an annealed KL(Dir(α̃) ‖ Dir(1)) with
α̃ = y + (1 − y)⊙α (the evidence for the wrong answers, pushed towards "no evidence"). The
uncertainty of a query is u = K / S: 1 with no evidence, → 0 as evidence grows.

The clamp: ELIP clamps logits to ±10. At CLIP's logit scale of 100 that saturates every cosine
above 0.1, so all confident matches carry the same evidence e^10 and the loss cannot tell them
apart; `clamp` is an option (e.g. 30–50 keeps cosines up to 0.3–0.5 distinct at scale 100).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from train.losses import Contrastive


def evidence(logits: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """α = exp(clamp(L, −c, c)) + 1, row-wise Dirichlet parameters."""
    return torch.exp(logits.clamp(-clamp, clamp)) + 1


def uncertainty(logits: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """u = K / S per row of [Q, K] logits (queries × candidates): in (0, 1], high = unsure."""
    alpha = evidence(logits.float(), clamp)
    return logits.shape[1] / alpha.sum(dim=1)


def kl_to_uniform(alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(α) ‖ Dir(1, …, 1)) per row."""
    k = alpha.shape[1]
    s = alpha.sum(dim=1)
    return (torch.lgamma(s) - torch.lgamma(alpha.new_tensor(float(k))) - torch.lgamma(alpha).sum(dim=1)
            + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(s)[:, None])).sum(dim=1))


def evidential_rows(logits: torch.Tensor, labels: torch.Tensor, kl_weight: float,
                    clamp: float = 10.0) -> torch.Tensor:
    """ψ(S_i) − ψ(α_i,y_i) + kl_weight · KL(Dir(α̃_i) ‖ Dir(1)) for every row i."""
    alpha = evidence(logits, clamp)
    y = F.one_hot(labels, alpha.shape[1]).to(alpha.dtype)
    nll = torch.digamma(alpha.sum(dim=1)) - torch.digamma((alpha * y).sum(dim=1))
    if kl_weight == 0:
        return nll
    return nll + kl_weight * kl_to_uniform(y + (1 - y) * alpha)


def kl_weight(epoch: int, anneal_epochs: float) -> float:
    """min(1, epoch / anneal_epochs) (ELIP: 20 epochs); 0 disables annealing (full weight)."""
    return 1.0 if anneal_epochs <= 0 else min(1.0, epoch / anneal_epochs)


class EvidentialLoss(Contrastive):
    """Mean over rows of both directions' evidential terms, over the global batch (same gather
    options as ClipLoss). `epoch` (set by the trainer) drives the KL annealing."""

    def __init__(self, clamp: float = 10.0, anneal_epochs: float = 20.0, **kwargs):
        super().__init__(**kwargs)
        self.clamp, self.anneal_epochs, self.epoch = clamp, anneal_epochs, 0

    def forward(self, image_features, text_features, logit_scale):
        per_image, per_text = self.logits(image_features, text_features, logit_scale)
        labels = self.labels(image_features.device, per_image.shape[0])
        w = kl_weight(self.epoch, self.anneal_epochs)
        return (evidential_rows(per_image, labels, w, self.clamp).mean()
                + evidential_rows(per_text, labels, w, self.clamp).mean()) / 2
