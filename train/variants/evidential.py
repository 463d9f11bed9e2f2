"""Evidential contrastive fine-tuning (ELIP, Sun et al., WWW 2024; heliossun/ELIP; docs/design.md §7).

Each row of the logits (image→text and text→image) is read as evidence for a K-way choice over
the batch: α = exp(clamp(L, −c, c)) + 1, S = Σ_j α_j. The loss per row is the expected
cross-entropy under Dir(α), ψ(S) − ψ(α_y), plus an annealed KL(Dir(α̃) ‖ Dir(1)) with
α̃ = y + (1 − y)⊙α (the evidence for the wrong answers, pushed towards "no evidence"). The
uncertainty of a query is u = K / S: 1 with no evidence, → 0 as evidence grows.

As the reference (models/loss_ev.py, train_retrieval.py):
- the logits are 100·cos (`scale=100`), not the model's learned exp(logit_scale): the reference's
  trainer passes the constant 100. `scale=None` (`loss.evidential_scale=learned`) uses the model's.
- the KL weight is min(1, (e + 1) / 20) for 0-based epoch e: the reference passes `epoch + 1`.
- the loss clamps the logits to ±10 (`exp_evidence`). At scale 100 that saturates every cosine
  above 0.1, so all confident matches carry the same evidence e^10 and the loss cannot tell them
  apart; `clamp` is an option of the loss (e.g. 30–50 keeps cosines up to 0.3–0.5 distinct).
- the evaluation's uncertainty has no clamp (`compute_entropy`: α = exp(100·cos) + 1). The
  reference computes it in float32 numpy, where exp(100·cos) overflows to inf for cos > 0.887 and
  u becomes 0; here it is computed in log space in float64, so it is the exact value there too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from train.losses import Contrastive

EVIDENTIAL_SCALE = 100.0  # the reference's constant logit scale


def evidence(logits: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """α = exp(clamp(L, −c, c)) + 1, row-wise Dirichlet parameters (the loss's evidence)."""
    return torch.exp(logits.clamp(-clamp, clamp)) + 1


def log_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """log u per row of [Q, K] logits, unclamped, in float64 without overflow:
    S = Σ_j (e^{L_j} + 1) = K + Σ_j e^{L_j}, so log S = logaddexp(log K, logsumexp_j L_j)."""
    x = logits.double()
    log_k = math.log(x.shape[1])
    return log_k - torch.logaddexp(x.logsumexp(dim=1), x.new_tensor(log_k))


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """u = K / S per row of [Q, K] logits with α = exp(L) + 1 and no clamp (the reference's
    evaluation), float64: in (0, 1], high = unsure; it underflows to 0 only below ~1e-308."""
    return log_uncertainty(logits).exp()


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
    """min(1, (epoch + 1) / anneal_epochs) for the 0-based `epoch` (ELIP: 20 epochs, counted from 1
    as its trainer counts them); 0 disables annealing (full weight)."""
    return 1.0 if anneal_epochs <= 0 else min(1.0, (epoch + 1) / anneal_epochs)


class EvidentialLoss(Contrastive):
    """Mean over rows of both directions' evidential terms, over the global batch (same gather
    options as ClipLoss). `epoch` (0-based, set by the trainer) drives the KL annealing. `scale`:
    the logits' constant scale (the reference's 100), or None for the `logit_scale` passed in."""

    def __init__(self, clamp: float = 10.0, anneal_epochs: float = 20.0, scale: float | None = EVIDENTIAL_SCALE,
                 **kwargs):
        super().__init__(**kwargs)
        self.clamp, self.anneal_epochs, self.scale, self.epoch = clamp, anneal_epochs, scale, 0

    def forward(self, image_features, text_features, logit_scale):
        if self.scale is not None:
            logit_scale = self.scale
        per_image, per_text = self.logits(image_features, text_features, logit_scale)
        labels = self.labels(image_features.device, per_image.shape[0])
        w = kl_weight(self.epoch, self.anneal_epochs)
        return (evidential_rows(per_image, labels, w, self.clamp).mean()
                + evidential_rows(per_text, labels, w, self.clamp).mean()) / 2
