"""ELIP as its reference (heliossun/ELIP) builds it, checked from the reference's equations, not
from this project's code paths:

1. The loss: logits 100·cos whatever the model's logit scale, α = exp(clamp(L, −10, 10)) + 1,
   per row Σ_j y_j (ψ(S) − ψ(α_j)) + min(1, epoch_num / 20) · KL(Dir(α̃) ‖ Dir(1)) with the
   reference's epoch_num = epoch + 1, both directions averaged: at epoch 0 the KL weight is 1/20.
   Computed here in float64 with the reference's own KL layout (models/loss_ev.py).
2. `model.tuning=elip`: exactly the adapters train (2 per block per tower, by name and by count,
   also on ViT-B-32 whose towers differ in width); each adapter sits on its block's attention /
   MLP output before the residual add (a hook trace re-computes the block); the first forward is
   within what the N(0, 0.001) init allows of the frozen model's.
3. The evaluation's uncertainty u = K / S with α = exp(100·cos) + 1 and no clamp: the float64
   value where that does not overflow, finite where float64's exp would; the mean u over right and
   over wrong top-1s in the OOD metrics.
4. The trainer with `model.tuning=elip`, `loss.mode=evidential`: only the adapters change, the
   export's adapters.pt and lip-eval's checkpoint loading give the trained model.
"""
from __future__ import annotations

import copy
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import build_synthetic_shards, overrides, run_main
from test_tuning import inputs  # the same tiny batch as the LilT tests
from train import checkpoint
from train.eval import ood
from train.config import ConfigError, load_config
from train.eval.evaluate import load_model
from train.variants.evidential import EvidentialLoss, kl_weight, log_uncertainty, uncertainty
from train.model import build_model
from train.objectives import build_objective
from train.trainer import seed_everything
from train.variants.tuning import BranchAdapter, apply_tuning, load_adapted, trainable_summary

MODEL = "lip-tiny"  # 2-layer towers of width 64


# --- 1. the loss ----------------------------------------------------------------------------------

def _digamma(x: float) -> float:
    """ψ(x), x > 0, float64: the recurrence ψ(x) = ψ(x + 1) − 1/x up to x ≥ 6, then the asymptotic
    series (error < 1e-13 there)."""
    shift = 0.0
    while x < 6:
        shift -= 1 / x
        x += 1
    inv2 = 1 / (x * x)
    return shift + math.log(x) - 0.5 / x - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 * (
        1 / 240 - inv2 / 132))))


digamma, gammaln = np.vectorize(_digamma), np.vectorize(math.lgamma)


def reference_loss_f64(image: np.ndarray, text: np.ndarray, epoch: int) -> float:
    """heliossun/ELIP's EVLoss with the trainer's call `loss(img, txt, 100, epoch + 1)`, float64
    (stdlib lgamma, a series digamma: nothing shared with the code under test)."""
    def edl_digamma_loss(logits):
        n = logits.shape[0]
        alpha = np.exp(np.clip(logits, -10, 10)) + 1
        y = np.eye(n)
        s = alpha.sum(axis=1, keepdims=True)
        a = (y * (digamma(s) - digamma(alpha))).sum(axis=1, keepdims=True)
        coef = min(1.0, (epoch + 1) / 20)
        kl_alpha = (alpha - 1) * (1 - y) + 1
        ones = np.ones((1, n))
        s_kl = kl_alpha.sum(axis=1, keepdims=True)
        first = (gammaln(s_kl) - gammaln(kl_alpha).sum(axis=1, keepdims=True)
                 + gammaln(ones).sum(axis=1, keepdims=True) - gammaln(ones.sum(axis=1, keepdims=True)))
        second = ((kl_alpha - ones) * (digamma(kl_alpha) - digamma(s_kl))).sum(axis=1, keepdims=True)
        return float(np.mean(a + coef * (first + second)))

    logits = 100 * image @ text.T
    return (edl_digamma_loss(logits) + edl_digamma_loss(logits.T)) / 2


def features(seed: int, n: int = 6, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit features whose matching pairs share a component: cosines on both sides of 0.1."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, d, generator=g)
    image = F.normalize(common + 2.0 * torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(common + 2.0 * torch.randn(n, d, generator=g), dim=-1)
    return image, text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_at_scale_100_epoch_0_against_float64(seed):
    image, text = features(seed)
    cos = (image @ text.T).double()
    assert (cos.abs() < 0.1).any() and (cos > 0.1).any()  # both sides of the clamp at scale 100
    cfg = load_config(None, ["data.train_shards=x", "loss.mode=evidential"])
    assert cfg.loss.evidential_scale == 100 and cfg.loss.evidential_clamp == 10
    loss_fn = build_objective(cfg, type("Env", (), {"rank": 0, "world_size": 1, "device": torch.device("cpu")})()).loss_fn
    assert loss_fn.epoch == 0 and kl_weight(loss_fn.epoch, cfg.loss.kl_anneal_epochs) == 1 / 20
    want = reference_loss_f64(image.double().numpy(), text.double().numpy(), epoch=0)
    # float64 features: the same value to rounding; float32 (what trains): lgamma(S) at S ≈ 1e5 is
    # ~1e6 in float32, so the KL's cancelling terms keep ~1e-4 of it (the reference's float32 too).
    for model_scale in (1.0, 14.3, 100.0):  # the model's exp(logit_scale) is not read
        got = loss_fn(image.double(), text.double(), torch.tensor(model_scale, dtype=torch.float64))
        assert got.item() == pytest.approx(want, rel=1e-10)
        assert loss_fn(image, text, torch.tensor(model_scale)).item() == pytest.approx(want, rel=1e-3)
    loss_fn.epoch = 4  # min(1, 5 / 20)
    assert loss_fn(image.double(), text.double(), torch.tensor(1.0)).item() == pytest.approx(
        reference_loss_f64(image.double().numpy(), text.double().numpy(), epoch=4), rel=1e-10)
    learned = EvidentialLoss(scale=None)  # loss.evidential_scale=learned: today's behaviour
    assert learned(image.double(), text.double(), torch.tensor(100.0)).item() == pytest.approx(want, rel=1e-10)
    assert learned(image.double(), text.double(), torch.tensor(20.0)).item() != pytest.approx(want, rel=1e-3)


def test_kl_weight_counts_epochs_from_one():
    assert [kl_weight(e, 20) for e in (0, 1, 9, 18, 19, 40)] == [1 / 20, 2 / 20, 10 / 20, 19 / 20, 1.0, 1.0]
    assert kl_weight(0, 0) == 1.0


def test_evidential_scale_config():
    base = ["data.train_shards=x", "loss.mode=evidential"]
    assert load_config(None, base + ["loss.evidential_scale=learned"]).loss.evidential_scale == "learned"
    assert load_config(None, base + ["loss.evidential_scale=50"]).loss.evidential_scale == 50.0
    for bad in ("0", "-1", "fixed", "nan"):
        with pytest.raises(ConfigError, match="loss.evidential_scale"):
            load_config(None, base + [f"loss.evidential_scale={bad}"])
    assert load_config(None, ["data.train_shards=x", "model.tuning=elip"]).model.tuning == "elip"


# --- 2. model.tuning=elip -------------------------------------------------------------------------

def elip_names(layers: int) -> set[str]:
    return {f"adapters.{tower}transformer_resblocks_{i}_ls_{j}.{layer}.{p}"
            for tower in ("visual_", "") for i in range(layers) for j in (1, 2)
            for layer in ("down", "up") for p in ("weight", "bias")}


def elip_count(width: int, layers: int) -> int:
    """ELIP's adapters in one tower: 2 per block of Linear(w → w/2) + Linear(w/2 → w), biases."""
    return layers * 2 * (width * (width // 2) + width // 2 + (width // 2) * width + width)


def test_only_the_adapters_train():
    seed_everything(0)
    model = build_model(MODEL)
    apply_tuning(model, "elip")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == elip_names(2)
    assert len(model.adapters) == 2 * 2 * 2 and all(isinstance(a, BranchAdapter) for a in model.adapters.values())
    assert trainable_summary(model)["trainable_params"] == 2 * elip_count(64, 2) == 33_536
    for a in model.adapters.values():  # the reference's init_adptr
        for layer in (a.down, a.up):
            assert layer.bias.abs().max() == 0 and 0.0008 < layer.weight.std().item() < 0.0012
    model.train()
    image, raw, _, scale = model(*inputs())
    (100 * image @ raw.T).logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name

    seed_everything(0)
    base = build_model("ViT-B-32")  # random init, nothing downloaded; towers of width 768 and 512
    apply_tuning(base, "elip")
    assert {n for n, p in base.named_parameters() if p.requires_grad} == elip_names(12)
    assert trainable_summary(base)["trainable_params"] == elip_count(768, 12) + elip_count(512, 12) == 20_493_312


def test_adapters_sit_on_the_branch_outputs():
    """A hook trace of one block per tower: its output is x1 + (m + A_mlp(m)) with
    x1 = x + (a + A_attn(a)), a = attention(ln_1(x)), m = mlp(ln_2(x1)), as the reference's block."""
    seed_everything(0)
    model = build_model(MODEL).eval()
    apply_tuning(model, "elip")
    for a in model.adapters.values():  # large enough that a misplaced adapter shows
        torch.nn.init.normal_(a.up.weight, std=0.2)
        torch.nn.init.normal_(a.down.weight, std=0.2)
    blocks = {"visual_transformer_resblocks_1": model.clip.visual.transformer.resblocks[1],
              "transformer_resblocks_0": model.clip.transformer.resblocks[0]}
    seen = {}
    for key, block in blocks.items():
        block.register_forward_pre_hook(lambda m, args, key=key: seen.__setitem__((key, "x"), args[0]))
        block.register_forward_hook(lambda m, args, out, key=key: seen.__setitem__((key, "out"), out))
        block.attn.register_forward_hook(lambda m, args, out, key=key: seen.__setitem__((key, "a"), out[0]))
    with torch.no_grad():
        model(*inputs())
        for key, block in blocks.items():
            x, a = seen[key, "x"], seen[key, "a"]
            x1 = x + model.adapters[f"{key}_ls_1"](a)
            m = block.mlp(block.ln_2(x1))
            torch.testing.assert_close(seen[key, "out"], x1 + model.adapters[f"{key}_ls_2"](m), rtol=0, atol=1e-5)
            assert not torch.allclose(seen[key, "out"], x + a + block.mlp(block.ln_2(x + a)), atol=1e-3)


def test_first_forward_is_within_the_init():
    seed_everything(0)
    frozen = build_model(MODEL).eval()
    adapted = copy.deepcopy(frozen)
    apply_tuning(adapted, "elip")
    # Each adapter: |A(h)| ≤ ‖W_up‖₂·‖W_down‖₂·|h| (ReLU is 1-Lipschitz, biases 0), and a Gaussian
    # m×n matrix of std σ has ‖W‖₂ ≲ σ(√m + √n): about 3·64·1e-6 = 2e-4 of |h| at width 64.
    ratios = []
    for key, a in adapted.adapters.items():
        bound = torch.linalg.matrix_norm(a.up.weight, 2) * torch.linalg.matrix_norm(a.down.weight, 2)
        assert bound < 1.2 * 0.001 ** 2 * (math.sqrt(64) + math.sqrt(32)) ** 2
        a.register_forward_hook(lambda m, args, out, bound=bound: ratios.append(
            ((out - args[0]).norm(dim=-1) / (bound * args[0].norm(dim=-1))).max().item()))
    images, tokens = inputs()
    with torch.no_grad():
        want, got = frozen(images, tokens), adapted(images, tokens)
    assert len(ratios) == 8 and max(ratios) <= 1 + 1e-3
    for w, g in zip(want[:2], got[:2]):  # unit image and text features: changed, by < 1e-3
        diff = (w - g).abs().max().item()
        assert 0 < diff < 1e-3, diff
    assert torch.equal(want[3], got[3])  # the logit scale is frozen


# --- 3. the evaluation's uncertainty --------------------------------------------------------------

def test_uncertainty_is_the_unclamped_float64_value():
    g = torch.Generator().manual_seed(0)
    cos = F.normalize(torch.randn(5, 16, generator=g), dim=-1) @ F.normalize(torch.randn(9, 16, generator=g), dim=-1).T
    cos[0, 3] = 1.0  # a perfect match: exp(100) overflows float32, not float64
    logits = 100 * cos
    k = logits.shape[1]
    direct = k / (np.exp(logits.double().numpy()) + 1).sum(axis=1)
    np.testing.assert_allclose(uncertainty(logits).numpy(), direct, rtol=1e-12, atol=0)
    assert torch.isinf(torch.exp(logits[0, 3])) and (k / (torch.exp(logits) + 1).sum(1))[0] == 0  # float32: lost
    assert direct[0] > 0 and uncertainty(logits)[0] > 0
    assert not np.allclose(direct, (k / (np.exp(np.clip(logits.double().numpy(), -10, 10)) + 1).sum(1)))  # no clamp

    huge = torch.tensor([[1000.0, 0.0, -5.0], [800.0, 800.0, 0.0], [0.0, 0.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isinf(np.exp(huge.double().numpy())).any()  # float64 exp overflows here
    log_u = log_uncertainty(huge)
    assert torch.isfinite(log_u).all() and torch.isfinite(uncertainty(huge)).all()
    torch.testing.assert_close(log_u[:2], torch.tensor([math.log(3) - 1000, math.log(3) - 800 - math.log(2)],
                                                       dtype=torch.float64), rtol=1e-12, atol=1e-9)
    assert uncertainty(huge)[2].item() == pytest.approx(3 / 6)  # no evidence anywhere: α = 2 each


def test_ood_metrics_report_u_of_right_and_wrong_top1():
    img = torch.eye(3)
    txt = F.normalize(torch.tensor([[1.0, 0.1, 0], [0, 0.2, 1], [0, 0, 1], [1, 0, 0.3]]), dim=-1)
    t2i = [0, 0, 1, 2]
    per_query: dict = {}
    # the default scale: ELIP's 100; every caption an i2t candidate (ELIP's own draw: tests/eval/test_ood.py)
    m = ood.ood_metrics(img, txt, t2i, per_query=per_query, i2t_u="all")
    per_query["u_i2t"] = per_query.pop("u_i2t_all")
    m = {k.replace("_i2t_all", "_i2t"): v for k, v in m.items()}
    sim = img @ txt.T
    for d, rows in (("i2t", sim), ("t2i", sim.T)):
        k = rows.shape[1]
        u = k / (np.exp(100 * rows.double().numpy()) + 1).sum(axis=1)
        wrong = np.array(per_query[f"wrong_{d}"])
        np.testing.assert_allclose(per_query[f"u_{d}"], u, rtol=1e-12)
        assert m[f"mean_u_{d}"] == pytest.approx(u.mean(), rel=1e-12)
        for key, part in ((f"u_right_{d}", u[~wrong]), (f"u_wrong_{d}", u[wrong])):
            assert (math.isnan(m[key]) if part.size == 0 else m[key] == pytest.approx(part.mean(), rel=1e-12))
    assert set(m) >= {"u_right_i2t", "u_wrong_i2t", "u_right_t2i", "u_wrong_t2i"}
    assert sum(per_query["wrong_i2t"]) == 2 and not math.isnan(m["u_wrong_i2t"])


# --- 4. the trainer -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return str(build_synthetic_shards(tmp_path_factory.mktemp("elip_data"), 64, "wds", 32) / "wds")


def test_trainer_trains_only_the_adapters(shards, tmp_path):
    summary = run_main(overrides(shards, tmp_path, "elip", model__tuning="elip", loss__mode="evidential"))
    run_dir = tmp_path / "elip"
    seed_everything(0)  # the trainer's initial model: same seed, same build order
    start = build_model(MODEL)
    apply_tuning(start, "elip")
    assert summary["trainable_fraction"] == trainable_summary(start)["trainable_fraction"]
    state = checkpoint.load(checkpoint.resolve("latest", str(run_dir / "checkpoints")))
    assert state["step"] == 3
    for name, p in start.named_parameters():
        assert torch.equal(p, state["model"][name]) != p.requires_grad, name
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(elip_names(2))

    trained = copy.deepcopy(start)
    trained.load_state_dict(state["model"])
    trained.eval()
    images, tokens = inputs(1)
    export = str(run_dir / "open_clip_model.pt")
    assert os.path.exists(run_dir / "adapters.pt")
    with torch.no_grad():
        want = trained(images, tokens)
        for model in (load_adapted(MODEL, export, "elip").eval(),
                      load_model(MODEL, checkpoint.resolve("latest", str(run_dir / "checkpoints")))):
            got = (model.encode_image(images, normalize=True), model.encode_text(tokens[:, :32], normalize=True))
            for w, g in zip(want, got):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
