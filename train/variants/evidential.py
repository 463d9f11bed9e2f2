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
  apart; `clamp` is an option of the loss (e.g. 30–60 keeps cosines up to 0.3–0.6 distinct). The
  reference's layout of the loss (lnΓ and ψ of α ~ e^c, differenced) holds only to c ≈ 20 in float32
  and c ≈ 30 in float64; here lnΓ and ψ are split into logs and Stirling's small remainders and the
  terms that grow like e^c cancel on paper, in float64, so every clamp up to 100 is exact to 1e-12.
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


def log_uncertainty(logits: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """log u per row of [Q, C] logits, unclamped, in float64 without overflow:
    S = Σ_j (e^{L_j} + 1) = C + Σ_j e^{L_j}, so log S = logaddexp(log C, logsumexp_j L_j), and
    u = K / S with K = C unless `k` is given (ELIP's image→text u divides the number of images by
    an S over one fewer caption: train/eval/ood.py, reference_i2t_candidates)."""
    x = logits.double()
    log_c = math.log(x.shape[1])
    return math.log(k or x.shape[1]) - torch.logaddexp(x.logsumexp(dim=1), x.new_tensor(log_c))


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """u = K / S per row of [Q, K] logits with α = exp(L) + 1 and no clamp (the reference's
    evaluation), float64: in (0, 1], high = unsure; it underflows to 0 only below ~1e-308."""
    return log_uncertainty(logits).exp()


# Below this x, μ and r come from torch's lgamma/digamma (float64: errors ~1e-14 there); from it on,
# from their asymptotic series, whose first omitted terms are < 1e-15 of the value at x = 20.
_SERIES_FROM = 20.0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _binet(x: torch.Tensor) -> torch.Tensor:
    """μ(x) = lnΓ(x) − (x − ½)·ln x + x − ½·ln 2π for x > 0: Stirling's remainder, ≈ 1/(12x)."""
    small, big = x.clamp(max=_SERIES_FROM), x.clamp(min=_SERIES_FROM)  # each branch inside its domain
    direct = torch.lgamma(small) - (small - 0.5) * small.log() + small - _HALF_LOG_2PI
    z = big.reciprocal()
    z2 = z * z
    series = z * (1 / 12 - z2 * (1 / 360 - z2 * (1 / 1260 - z2 * (1 / 1680 - z2 / 1188))))
    return torch.where(x < _SERIES_FROM, direct, series)


def _log_minus_digamma(x: torch.Tensor) -> torch.Tensor:
    """r(x) = ln x − ψ(x) for x > 0, ≈ 1/(2x): ψ's distance from the log."""
    small, big = x.clamp(max=_SERIES_FROM), x.clamp(min=_SERIES_FROM)
    direct = small.log() - torch.digamma(small)
    z = big.reciprocal()
    z2 = z * z
    series = z / 2 + z2 * (1 / 12 - z2 * (1 / 120 - z2 * (1 / 252 - z2 * (1 / 240 - z2 / 132))))
    return torch.where(x < _SERIES_FROM, direct, series)


def _per_class(alpha: torch.Tensor, log_alpha: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """½·ln α + μ(α) + (α − 1)·r(α) elementwise (the KL's per-class part, O(ln α)): the series
    above _SERIES_FROM; below it the same sum with the logs cancelled, lnΓ(α) − (α − 1)·ψ(α) + α −
    ½ln 2π, computed only where it applies (lgamma, digamma and their backward, trigamma, are most
    of the loss's cost)."""
    z = alpha.clamp(min=_SERIES_FROM).reciprocal()
    z2 = z * z
    out = (0.5 * log_alpha + z * (1 / 12 - z2 * (1 / 360 - z2 * (1 / 1260 - z2 * (1 / 1680 - z2 / 1188))))
           + excess * (z / 2 + z2 * (1 / 12 - z2 * (1 / 120 - z2 * (1 / 252 - z2 * (1 / 240 - z2 / 132))))))
    small = alpha < _SERIES_FROM
    a = alpha[small]
    return out.masked_scatter(small, torch.lgamma(a) - excess[small] * torch.digamma(a) + a - _HALF_LOG_2PI)


def _kl_from_logs(log_alpha: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """KL(Dir(α) ‖ Dir(1)) per row from log α and α − 1 (`excess`), float64, with lnΓ and ψ split
    into log terms and Stirling's small remainders (lnΓ(x) = (x − ½)ln x − x + ½ln 2π + μ(x),
    ψ(x) = ln x − r(x)): the terms linear in α, which reach e^c and cancel exactly, are cancelled
    on paper, so what is summed is O(K·c), not O(e^c):
    KL = (K − ½)·ln S + (S − K)·r(S) + μ(S) − (K − 1)·½ln 2π − lnΓ(K)
         − Σ_j [½·ln α_j + μ(α_j) + (α_j − 1)·r(α_j)]."""
    k = log_alpha.shape[1]
    alpha = log_alpha.exp()
    log_s = log_alpha.logsumexp(dim=1)
    s = log_s.exp()
    return ((k - 0.5) * log_s + excess.sum(dim=1) * _log_minus_digamma(s) + _binet(s)
            - (k - 1) * _HALF_LOG_2PI - math.lgamma(k) - _per_class(alpha, log_alpha, excess).sum(dim=1))


def kl_to_uniform(alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(α) ‖ Dir(1, …, 1)) per row of [N, K] α > 0, in float64 (see _kl_from_logs)."""
    alpha = alpha.double()
    return _kl_from_logs(alpha.log(), alpha - 1)


def evidential_rows(logits: torch.Tensor, labels: torch.Tensor, kl_weight: float,
                    clamp: float = 10.0) -> torch.Tensor:
    """ψ(S_i) − ψ(α_i,y_i) + kl_weight · KL(Dir(α̃_i) ‖ Dir(1)) for every row i of [N, K] logits,
    float64 [N] whatever their dtype. Computed from log α = log(1 + e^L) and e^L = α − 1, never
    from differences of lnΓ or ψ at α ~ e^c: the reference's layout loses every digit in float32
    from c ≈ 20 on (loss −4e7 at c = 30) and in float64 from c ≈ 30 on (KL < 0 at c = 50); this one
    holds to 1e-12 up to c = 100 (tests/variants/test_evidential.py, against 100-digit mpmath)."""
    x = logits.double().clamp(-clamp, clamp)
    log_alpha = torch.logaddexp(x, torch.zeros_like(x))
    excess = x.exp()  # α − 1, exact also where α rounds to 1
    y = F.one_hot(labels, x.shape[1]).to(x.dtype)
    log_s = log_alpha.logsumexp(dim=1)
    log_alpha_y = (log_alpha * y).sum(dim=1)
    # ψ(S) − ψ(α_y) = (ln S − ln α_y) − (r(S) − r(α_y)): the first a log-softmax, the second small
    nll = (log_s - log_alpha_y) - (_log_minus_digamma(log_s.exp()) - _log_minus_digamma(log_alpha_y.exp()))
    if kl_weight == 0:
        return nll
    keep = 1 - y  # α̃ = y + (1 − y)⊙α: the true class at α̃ = 1 (log 0, excess 0)
    return nll + kl_weight * _kl_from_logs(log_alpha * keep, excess * keep)


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
        loss = (evidential_rows(per_image, labels, w, self.clamp).mean()
                + evidential_rows(per_text, labels, w, self.clamp).mean()) / 2
        return loss.to(per_image.dtype)  # float64 inside only: the loop's sums stay in the features' dtype
