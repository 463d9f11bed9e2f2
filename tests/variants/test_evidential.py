"""Evidential fine-tuning (ELIP; `loss.mode=evidential`, train/variants/evidential.py).

1. Against hand-computed values: evidence and u = K/S (unclamped), ψ(S) − ψ(α_y) (digamma of
   integers is a harmonic sum), KL(Dir(α̃) ‖ Dir(1)) from the Beta density, the annealing weight
   (epochs counted from 1, as ELIP's trainer counts them); the expected
   cross-entropy also against a Monte-Carlo estimate from torch's own Dirichlet.
2. The loss over a batch: both directions averaged, the clamp saturates, gradients flow.
   Float32 logits at every clamp the config allows (10, 30, 60, 100): loss and gradient against a
   100-digit mpmath evaluation of the reference's formula (the reference's own layout fails there).
3. The trainer: every `loss.text` trains three steps and logs the terms it uses.
"""
from __future__ import annotations

import math

import mpmath
import pytest
import torch

from conftest import build_synthetic_shards, overrides, run_main
from train.config import ConfigError, load_config
from train.variants.evidential import EvidentialLoss, evidence, evidential_rows, kl_to_uniform, kl_weight, uncertainty


def test_evidence_and_uncertainty_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0)], [50.0, -50.0]])
    alpha = evidence(logits, clamp=10.0)
    assert torch.allclose(alpha[0], torch.tensor([2.0, 3.0]))
    assert torch.allclose(alpha[1], torch.tensor([math.exp(10) + 1, math.exp(-10) + 1]))  # clamped
    u = uncertainty(logits)  # the evaluation's: no clamp
    assert u[0].item() == pytest.approx(2 / 5)
    assert u[1].item() == pytest.approx(2 / (math.exp(50) + 2 + math.exp(-50)))
    assert uncertainty(torch.full((3, 7), -1e4)).allclose(torch.ones(3, dtype=torch.float64), atol=1e-3)  # u → 1


def test_expected_cross_entropy_by_hand_and_by_sampling():
    logits = torch.tensor([[0.0, math.log(2.0)]])  # α = [2, 3], S = 5
    nll = evidential_rows(logits, torch.tensor([0]), kl_weight=0.0)
    # ψ(5) − ψ(2) = H_4 − H_1 = 1/2 + 1/3 + 1/4
    assert nll.item() == pytest.approx(1 / 2 + 1 / 3 + 1 / 4, abs=1e-6)
    torch.manual_seed(0)
    p = torch.distributions.Dirichlet(torch.tensor([2.0, 3.0])).sample((200_000,))
    assert (-p[:, 0].log()).mean().item() == pytest.approx(nll.item(), abs=0.01)


def test_kl_to_uniform_by_hand():
    # Dir(3, 1) is Beta(3, 1), density 3x²: KL to uniform = ln 3 + 2·E[ln x] = ln 3 − 2/3.
    assert kl_to_uniform(torch.tensor([[3.0, 1.0]])).item() == pytest.approx(math.log(3) - 2 / 3, abs=1e-6)
    assert kl_to_uniform(torch.ones(2, 5)).abs().max().item() < 1e-6
    # The KL term sees α̃ = y + (1 − y)·α: the true class's evidence is removed.
    logits = torch.tensor([[5.0, math.log(2.0)]])  # α = [e^5 + 1, 3], label 0 → α̃ = [1, 3]
    with_kl = evidential_rows(logits, torch.tensor([0]), kl_weight=0.5)
    without = evidential_rows(logits, torch.tensor([0]), kl_weight=0.0)
    assert (with_kl - without).item() == pytest.approx(0.5 * (math.log(3) - 2 / 3), abs=1e-6)


def test_kl_annealing():
    assert [kl_weight(e, 20) for e in (0, 4, 9, 19, 40)] == [0.05, 0.25, 0.5, 1.0, 1.0]
    assert kl_weight(0, 0) == 1.0


def test_loss_is_the_mean_of_both_directions_and_trains():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    loss_fn = EvidentialLoss(clamp=10.0, anneal_epochs=20, scale=None)  # the scale passed in
    loss_fn.epoch = 9
    scale = torch.tensor(20.0)
    logits = scale * image @ text.T
    labels = torch.arange(8)
    expected = (evidential_rows(logits, labels, 0.5).mean() + evidential_rows(logits.T, labels, 0.5).mean()) / 2
    loss = loss_fn(image, text, scale)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    # Matching pairs carry the evidence: aligning them lowers the loss.
    assert loss_fn(text, text, scale).item() < loss.item()


def test_clamp_saturates_confident_matches():
    """At logit scale 100 ELIP's clamp of 10 stops at cosine 0.1: a match at cosine 0.2 gets no
    gradient towards a better one; a wider clamp (60) still pulls it."""
    def grad(cos, clamp):
        c = torch.tensor(cos, requires_grad=True)
        logits = 100 * torch.stack([torch.stack([c, c.new_tensor(0.05)]), torch.stack([c.new_tensor(0.05), c])])
        evidential_rows(logits, torch.arange(2), 0.0, clamp).mean().backward()
        return c.grad.item()
    assert grad(0.2, 10) == 0.0 and grad(0.05, 10) < 0
    assert grad(0.2, 60) < 0


def _mp_rows(logits: torch.Tensor, kl_w: float, clamp: float) -> tuple[list, list]:
    """(row losses, d loss / d logits) of the reference's formula in 100-digit mpmath: ψ(S) − ψ(α_y)
    + w·KL(Dir(α̃) ‖ Dir(1)) with lnΓ and ψ as written, and its analytic gradient
    e^L_j·[ψ′(S) − δ_jy·ψ′(α_y) + w·(1 − δ_jy)·((α_j − 1)·ψ′(α_j) − (S̃ − K)·ψ′(S̃))], 0 where clamped."""
    mp = mpmath.mp.clone()
    mp.dps = 100  # lnΓ(S) reaches 1e45 at clamp 100: 100 digits leave 55 for the KL
    values, grads = [], []
    for y, row in enumerate(logits.tolist()):
        ell = [min(max(mp.mpf(v), -clamp), clamp) for v in row]
        a = [mp.exp(v) + 1 for v in ell]
        k, s = len(a), sum(a)
        at = [mp.mpf(1) if j == y else a[j] for j in range(k)]
        st = sum(at)
        kl = (mp.loggamma(st) - mp.loggamma(k) - sum(mp.loggamma(v) for v in at)
              + sum((v - 1) * (mp.digamma(v) - mp.digamma(st)) for v in at))
        values.append(float(mp.digamma(s) - mp.digamma(a[y]) + kl_w * kl))
        g = []
        for j in range(k):
            d = mp.psi(1, s) - (mp.psi(1, a[y]) if j == y else 0)
            if j != y:
                d += kl_w * ((a[j] - 1) * mp.psi(1, a[j]) - (st - k) * mp.psi(1, st))
            g.append(float(d * mp.exp(ell[j])) if -clamp < row[j] < clamp else 0.0)
        grads.append(g)
    return values, grads


@pytest.mark.parametrize("clamp", [10.0, 30.0, 60.0, 100.0])
def test_float32_loss_and_gradient_match_mpmath_at_every_allowed_clamp(clamp):
    """Cosines in [−0.6, 1] at scale 100, float32 logits as the trainer passes them: the row losses
    within 1e-12 relative of 100-digit arithmetic, the gradient within 1e-6 (its float32 rounding).
    The reference's layout in float32 gives −4e7 at clamp 30 on these logits (issue 28)."""
    g = torch.Generator().manual_seed(int(clamp))
    logits = (100 * (torch.rand(6, 6, generator=g) * 1.6 - 0.6)).requires_grad_()
    rows = evidential_rows(logits, torch.arange(6), 0.7, clamp)
    rows.sum().backward()
    values, grads = _mp_rows(logits.detach(), 0.7, clamp)
    ref = torch.tensor(values, dtype=torch.float64)
    assert rows.dtype == torch.float64 and ((rows.detach() - ref).abs() / ref.abs()).max() < 1e-12
    ref_grad = torch.tensor(grads, dtype=torch.float64)
    assert logits.grad.dtype == torch.float32
    assert ((logits.grad.double() - ref_grad).norm() / ref_grad.norm()).item() < 1e-6
    assert (logits.grad.double() - ref_grad).abs().max() <= 1e-6 * ref_grad.abs().max()


def test_loss_keeps_the_features_dtype():
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert EvidentialLoss(clamp=60.0)(image, image, torch.tensor(1.0)).dtype == torch.float32


@pytest.mark.parametrize("bad", ["0", "-5", "101", "nan", "inf"])
def test_clamp_outside_what_holds_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="loss.evidential_clamp"):
        load_config(None, ["data.train_shards=x", "loss.mode=evidential", f"loss.evidential_clamp={bad}"])
    assert load_config(None, ["data.train_shards=x", "loss.evidential_clamp=100"]).loss.evidential_clamp == 100


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return str(build_synthetic_shards(tmp_path_factory.mktemp("evidential_data"), 64, "wds", 32) / "wds")


@pytest.mark.parametrize("text,terms", [("raw", {"loss_raw"}), ("syn", {"loss_syn"}),
                                        ("both", {"loss_raw", "loss_syn"})])
def test_trainer_runs_evidential(shards, tmp_path, text, terms):
    summary = run_main(overrides(shards, tmp_path, f"ev-{text}", loss__mode="evidential", loss__text=text,
                                 loss__kl_anneal_epochs=1))
    final = summary
    assert summary["steps"] == 3 and math.isfinite(final["loss"])
    assert terms == {k for k in ("loss_raw", "loss_syn") if k in final}
    assert final["loss"] == pytest.approx(sum(final[k] for k in terms), rel=1e-5)


def test_bad_text_choice_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="loss.text"):
        load_config(None, ["data.train_shards=x", "loss.mode=evidential", "loss.text=caption"])
