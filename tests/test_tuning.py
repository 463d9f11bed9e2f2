"""LiT and LilT (`model.tuning`, train/tuning.py) on the CPU with `lip-tiny` (2-layer towers of
width 64) and, for the parameter count, ViT-B-32 (random init, nothing downloaded).

1. Adapters start as the identity: the adapted model's first forward equals the plain model's
   bitwise; perturbing one tower's adapters changes that tower's features only.
2. Which parameters train: the counts against hand-computed ones (LilT on ViT-B-32: 6.8 %),
   frozen parameters get no gradient, LiT's image tower stays in eval mode.
3. The trainer, per tuning and loss mode: frozen parameters unchanged after three steps, the
   trainable ones changed, the optimizer holds only the trainable ones, the fraction is logged,
   and the export loads in open_clip (LilT: with `adapters.pt` through `load_lilt`); lip-eval's
   `load_model` on the trainer checkpoint gives the trained model (adapters included).
"""
from __future__ import annotations

import copy
import json
import os

import open_clip
import pytest
import torch

from conftest import build_synthetic_shards, overrides, run_main
from train import checkpoint
from train.evaluate import load_model
from train.main import main
from train.model import build_model
from train.tuning import Adapter, apply_tuning, load_lilt, trainable_summary
from train.trainer import seed_everything

MODEL = "lip-tiny"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """200 synthetic photos (64 px) with synthetic captions, tokenized, in four wds shards."""
    return str(build_synthetic_shards(tmp_path_factory.mktemp("tuning_data"), 200, "wds", 50) / "wds")


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 64, 64, generator=g)
    tokens = torch.zeros(4, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, torch.randint(1, 49000, (4, 5), generator=g), 49407
    return images, tokens


def tuned(tuning: str, seed: int = 0):
    """The model the trainer builds for `tuning` with `run.seed=seed`."""
    seed_everything(seed)
    model = build_model(MODEL)
    apply_tuning(model, tuning)
    return model


# --- 1. adapters start as the identity ------------------------------------------------------------

def test_adapters_start_as_identity():
    seed_everything(0)
    plain = build_model(MODEL).eval()
    adapted = copy.deepcopy(plain)
    apply_tuning(adapted, "lilt")
    # 2 towers × 2 blocks × (before attention, before MLP)
    assert len(adapted.adapters) == 8 and all(isinstance(a, Adapter) for a in adapted.adapters.values())
    images, tokens = inputs()
    with torch.no_grad():
        for a, b in zip(plain(images, tokens, tokens.flip(0)), adapted(images, tokens, tokens.flip(0))):
            assert torch.equal(a, b)  # image, raw and synthetic features, scale
        for tower, changed in (("visual", 0), ("transformer", 1)):
            model = copy.deepcopy(adapted)
            for key, adapter in model.adapters.items():
                if key.startswith(tower):
                    torch.nn.init.normal_(adapter.up.weight, std=0.1)
            out = model(images, tokens)
            for i in (0, 1):  # image features, raw-text features
                assert torch.equal(out[i], plain(images, tokens)[i]) == (i != changed), (tower, i)


# --- 2. which parameters train --------------------------------------------------------------------

def lilt_count(vision_width: int, text_width: int, layers: int, embed_dim: int) -> int:
    """LilT's trainable parameters for a ViT/text pair of `layers` blocks each, by hand."""
    def adapters(w):  # two per block: W_down (w → w/4, bias) and W_up (w/4 → w, bias)
        return layers * 2 * (2 * w * (w // 4) + w // 4 + w)
    norms = (2 * layers + 2) * 2 * vision_width + (2 * layers + 1) * 2 * text_width  # ln_pre/post, ln_final
    projections = vision_width * embed_dim + text_width * embed_dim
    return adapters(vision_width) + adapters(text_width) + norms + projections + 1  # + logit_scale


def test_trainable_counts():
    counts = {t: trainable_summary(tuned(t)) for t in ("none", "lit", "lilt")}
    total = counts["none"]["total_params"]
    assert counts["none"]["trainable_params"] == total
    assert counts["lit"]["trainable_params"] == total - sum(p.numel() for p in tuned("none").clip.visual.parameters())
    assert counts["lilt"]["trainable_params"] == lilt_count(64, 64, 2, 64) == 26_625
    seed_everything(0)
    base = build_model("ViT-B-32")
    apply_tuning(base, "lilt")
    summary = trainable_summary(base)
    assert summary["trainable_params"] == lilt_count(768, 512, 12, 512) == 10_982_913
    assert summary["line"] == "trainable 6.8 % (10,982,913 of 161,539,329 parameters)"


@pytest.mark.parametrize("tuning", ["lit", "lilt"])
def test_frozen_parameters_get_no_gradient(tuning):
    model = tuned(tuning)
    model.train()
    image, raw, _, scale = model(*inputs())
    (scale * (image @ raw.T)).logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    if tuning == "lit":  # locked as open_clip's lock_image_tower, and kept in eval mode
        assert not any(p.requires_grad for p in model.clip.visual.parameters())
        assert all(p.requires_grad for p in model.clip.transformer.parameters())
        assert not any(m.training for m in model.clip.visual.modules()) and model.clip.transformer.training
    else:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {"clip.visual.proj", "clip.text_projection", "clip.logit_scale",
                "clip.visual.ln_pre.weight", "clip.ln_final.bias",
                "clip.transformer.resblocks.0.ln_2.weight"} <= trainable
        assert not any(n.startswith(("clip.visual.conv1", "clip.token_embedding")) or ".attn." in n
                       or ".mlp." in n for n in trainable)


def test_unknown_tuning_is_a_config_error(shards, tmp_path, capsys):
    assert main(overrides(shards, tmp_path, "bad", model__tuning="lora")) == 2
    assert "model.tuning: 'lora' is not one of none, lit, lilt, elip" in capsys.readouterr().err


# --- 3. the trainer -------------------------------------------------------------------------------

@pytest.mark.parametrize("tuning,mode", [("lit", "clip-raw"), ("lit", "alip"), ("lilt", "clip-raw"),
                                         ("lilt", "clip-both"), ("lilt", "alip")])
def test_trainer_tunes_only_the_unlocked(shards, tmp_path, capsys, tuning, mode):
    summary = run_main(overrides(shards, tmp_path, "run", model__tuning=tuning, loss__mode=mode))
    run_dir = tmp_path / "run"
    start = tuned(tuning)  # the trainer's initial model: same seed, same build order
    expected = trainable_summary(start)
    assert f"run: model.tuning={tuning}, {expected['line']}" in capsys.readouterr().err
    assert summary["trainable_fraction"] == expected["trainable_fraction"]
    with open(run_dir / "metrics.jsonl") as f:
        assert all(json.loads(line)["trainable_fraction"] == expected["trainable_fraction"] for line in f)

    state = checkpoint.load(checkpoint.resolve("latest", str(run_dir / "checkpoints")))
    assert state["step"] == 3
    end = state["model"]
    for name, p in start.named_parameters():
        assert torch.equal(p, end[name]) != p.requires_grad, f"{name}: trainable {p.requires_grad}"
    n_trainable = sum(p.requires_grad for p in start.parameters())
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == n_trainable

    # The export loads in open_clip; with LilT's adapters.pt it is the trained model.
    images, tokens = inputs(1)
    trained = tuned(tuning)
    trained.load_state_dict(end)
    trained.eval()
    export = str(run_dir / "open_clip_model.pt")
    plain = open_clip.create_model(MODEL, pretrained=export).eval()
    adapted = load_lilt(MODEL, export).eval() if tuning == "lilt" else plain
    assert os.path.exists(run_dir / "adapters.pt") == (tuning == "lilt")
    from_checkpoint = load_model(MODEL, checkpoint.resolve("latest", str(run_dir / "checkpoints")))
    with torch.no_grad():
        want = trained(images, tokens)
        for model in (adapted, from_checkpoint):  # the export (+ adapters), lip-eval on the checkpoint
            got = (model.encode_image(images, normalize=True), model.encode_text(tokens[:, :32], normalize=True))
            for w, g in zip(want, got):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        if tuning == "lilt":  # the bare export is the frozen towers with the tuned norms/projections
            assert not torch.allclose(plain.encode_image(images, normalize=True), want[0], atol=1e-6)
