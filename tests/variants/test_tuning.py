"""LiT and LilT (`model.tuning`, train/variants/tuning.py) on the CPU with `lip-tiny` (2-layer towers of
width 64) and, for the parameter count, ViT-B-32 (random init, nothing downloaded), checked against
the reference (codezakh/LilT: models/vit.py `Block`, models/med.py `BertSelfOutput`/`BertOutput`,
models/clip_adjustable.py), not against this project's code.

1. Adapters sit where the reference puts them: a forward-hook trace of every block shows the
   image adapters read the block input / the mid-block residual and feed only `ln_1` / `ln_2`, the
   text adapters read the attention / MLP output and their output is what the residual adds; each
   block's output equals a manual re-computation with the reference's formula (and not the
   other placements'). Init: both layers N(0, 0.02), biases 0; `adapter_init=zero` starts as the
   frozen model bitwise; perturbing one tower's adapters changes that tower's features only.
2. Which parameters train: the counts against hand-computed ones (LilT on ViT-B-32: 6.8 %),
   frozen parameters get no gradient; LiT: `visual.proj` gets a gradient, no other image-tower
   parameter does, and the tower stays in eval mode.
3. The trainer, per tuning and loss mode: frozen parameters unchanged after three steps, the
   trainable ones changed, the optimizer holds only the trainable ones, the fraction is logged,
   and the export loads in open_clip (LilT: with `adapters.pt` through `load_lilt`); lip-eval's
   `load_model` on the trainer checkpoint gives the trained model (adapters included).
4. Export round trip: `export_open_clip` + `load_lilt` give the adapted model's features; an
   `adapters.pt` of the earlier placement (keys `..._ln_1`) fails to load.
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
from train.eval.evaluate import load_model
from train.main import main
from train.model import build_model, export_open_clip
from train.variants.tuning import Adapter, apply_tuning, load_lilt, trainable_summary
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


def tuned(tuning: str, seed: int = 0, adapter_init: str = "reference"):
    """The model the trainer builds for `tuning` with `run.seed=seed`."""
    seed_everything(seed)
    model = build_model(MODEL)
    apply_tuning(model, tuning, adapter_init)
    return model


# --- 1. where the adapters sit, and their init -----------------------------------------------------

def blocks(model):
    """(path, tower, block) of every residual block of the open_clip model, in call order."""
    return [(name, "image" if name.startswith("visual.") else "text", m) for name, m in model.clip.named_modules()
            if isinstance(m, open_clip.transformer.ResidualAttentionBlock)]


def reference_block(block, x, attn_mask, a1, a2, placement):
    """One open_clip block computed by hand (`.forward` calls skip every hook) with the adapters
    `a1` (attention branch) and `a2` (MLP branch) where `placement` puts them. `reference-image` is
    codezakh/LilT's ViT `Block`: `x + attn(norm1(adapter1(x)))`; `reference-text` its BERT output
    layers: the adapter on the branch output before the residual add (`LayerNorm(adapter(dense(h))
    + input)`, pre-LN here). The others are the wrong placements the test must tell apart."""
    ln1, ln2, mlp = block.ln_1.forward, block.ln_2.forward, block.mlp.forward

    def attn(z):
        return block.attn.forward(z, z, z, need_weights=False, attn_mask=attn_mask)[0]

    if placement == "reference-image":
        h = x + attn(ln1(a1(x)))
        return h + mlp(ln2(a2(h)))
    if placement == "reference-text":
        h = x + a1(attn(ln1(x)))
        return h + a2(mlp(ln2(h)))
    if placement == "on-residual":  # the adapter on the block's stream: the residual adapted too
        h = a1(x) + attn(ln1(a1(x)))
        return a2(h) + mlp(ln2(a2(h)))
    assert placement == "after-norm"  # the earlier placement: the adapter on the norm's output
    h = x + attn(a1(ln1(x)))
    return h + mlp(a2(ln2(h)))


def test_adapters_sit_where_the_reference_puts_them():
    model = tuned("lilt").eval()
    for adapter in model.adapters.values():  # well away from the identity, so a misplacement shows
        for layer in (adapter.down, adapter.up):
            torch.nn.init.normal_(layer.weight, std=0.2)
            torch.nn.init.normal_(layer.bias, std=0.2)
    trace, handles = {}, []

    def record(key):
        def hook(module, args, kwargs, output):
            trace[key] = (args, kwargs, output)
        return hook

    found = blocks(model)
    assert [t for _, t, _ in found] == ["image"] * 2 + ["text"] * 2
    for name, _, block in found:
        assert isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)
        for part in ("", ".ln_1", ".ln_2", ".attn", ".mlp", ".ls_1", ".ls_2"):
            module = model.clip.get_submodule(name + part)
            handles.append(module.register_forward_hook(record(name + part), with_kwargs=True))
    for key, adapter in model.adapters.items():
        handles.append(adapter.register_forward_hook(record(key), with_kwargs=True))
    images, tokens = inputs()
    with torch.no_grad():
        model(images, tokens)
        for name, tower, block in found:
            key = name.replace(".", "_")
            (x, *rest), kwargs, out = trace[name]
            attn_mask = kwargs.get("attn_mask", rest[2] if len(rest) > 2 else None)
            attn_out, mlp_out = trace[name + ".attn"][2][0], trace[name + ".mlp"][2]
            if tower == "image":  # adapter → ln → branch; the residual adds the raw stream
                a1, a2 = model.adapters[key + "_attn_in"], model.adapters[key + "_mlp_in"]
                assert f"{key}_attn_out" not in model.adapters
                h = x + attn_out
                assert torch.equal(trace[key + "_attn_in"][0][0], x)
                assert torch.equal(trace[name + ".ln_1"][0][0], trace[key + "_attn_in"][2])
                assert torch.equal(trace[key + "_mlp_in"][0][0], h)
                assert torch.equal(trace[name + ".ln_2"][0][0], trace[key + "_mlp_in"][2])
                assert torch.equal(out, h + mlp_out)
            else:  # ln → branch → adapter → residual add
                a1, a2 = model.adapters[key + "_attn_out"], model.adapters[key + "_mlp_out"]
                assert torch.equal(trace[key + "_attn_out"][0][0], attn_out)
                assert torch.equal(trace[name + ".ls_1"][2], trace[key + "_attn_out"][2])
                h = x + trace[key + "_attn_out"][2]
                assert torch.equal(trace[name + ".ln_2"][0][0], h)
                assert torch.equal(trace[key + "_mlp_out"][0][0], mlp_out)
                assert torch.equal(out, h + trace[key + "_mlp_out"][2])
            # The block's output is the reference's formula, and none of the other placements'.
            want = f"reference-{tower}"
            for placement in ("reference-image", "reference-text", "on-residual", "after-norm"):
                manual = reference_block(block, x, attn_mask, a1.forward, a2.forward, placement)
                if placement == want:
                    torch.testing.assert_close(out, manual, rtol=0, atol=1e-5)
                else:
                    assert (out - manual).abs().max() > 1e-2, (name, placement)
    for handle in handles:
        handle.remove()


def test_adapter_init_as_the_reference():
    model = tuned("lilt")
    assert len(model.adapters) == 8  # 2 towers × 2 blocks × (attention, MLP)
    adapters = list(model.adapters.values())
    assert all(isinstance(a, Adapter) for a in adapters)
    assert all(a.down.weight.shape == (16, 64) and a.up.weight.shape == (64, 16) for a in adapters)
    for layer in ("down", "up"):  # 8 × 1,024 weights each: the std is ±0.00016 from sampling
        w = torch.cat([getattr(a, layer).weight.flatten() for a in adapters])
        assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3, layer
        assert all(not getattr(a, layer).bias.any() for a in adapters)
    zero = tuned("lilt", adapter_init="zero")
    assert all(not a.up.weight.any() and not a.up.bias.any() for a in zero.adapters.values())
    w = torch.cat([a.down.weight.flatten() for a in zero.adapters.values()])
    assert abs(w.std().item() - 0.02) < 1e-3
    with pytest.raises(ValueError, match="model.adapter_init: 'kaiming' is not one of reference, zero"):
        tuned("lilt", adapter_init="kaiming")


def test_zero_init_starts_as_the_frozen_model():
    seed_everything(0)
    plain = build_model(MODEL).eval()
    adapted, reference = copy.deepcopy(plain), copy.deepcopy(plain)
    apply_tuning(adapted, "lilt", "zero")
    apply_tuning(reference, "lilt")
    images, tokens = inputs()
    with torch.no_grad():
        want = plain(images, tokens, tokens.flip(0))
        for a, b in zip(want, adapted(images, tokens, tokens.flip(0))):
            assert torch.equal(a, b)  # image, raw and synthetic features, scale
        # The reference init starts near the frozen model, not on it.
        for a, b in zip(want[:3], reference(images, tokens, tokens.flip(0))[:3]):
            assert 0 < (a - b).abs().max() < 0.2
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
    visual = tuned("none").clip.visual
    # LiT: everything but the image tower, plus its projection (width 64 → embed 64)
    assert counts["lit"]["trainable_params"] == total - sum(p.numel() for p in visual.parameters()) + 64 * 64
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
    if tuning == "lit":  # locked as open_clip's lock_image_tower but the projection, kept in eval mode
        assert [n for n, p in model.clip.visual.named_parameters() if p.grad is not None] == ["proj"]
        assert model.clip.visual.proj.grad.abs().sum() > 0
        assert all(p.requires_grad for p in model.clip.transformer.parameters())
        assert not any(m.training for m in model.clip.visual.modules()) and model.clip.transformer.training
    else:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {"clip.visual.proj", "clip.text_projection", "clip.logit_scale",
                "clip.visual.ln_pre.weight", "clip.ln_final.bias",
                "clip.transformer.resblocks.0.ln_2.weight"} <= trainable
        assert not any(n.startswith(("clip.visual.conv1", "clip.token_embedding")) or ".attn." in n
                       or ".mlp." in n for n in trainable)


@pytest.mark.parametrize("key,value,allowed", [("tuning", "lora", "none, lit, lilt, elip"),
                                               ("adapter_init", "kaiming", "reference, zero")])
def test_unknown_tuning_is_a_config_error(shards, tmp_path, capsys, key, value, allowed):
    assert main(overrides(shards, tmp_path, "bad", **{f"model__{key}": value})) == 2
    assert f"model.{key}: {value!r} is not one of {allowed}" in capsys.readouterr().err


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


# --- 4. export round trip -------------------------------------------------------------------------

def test_export_round_trip(tmp_path):
    model = tuned("lilt").eval()
    with torch.no_grad():  # as after training: adapters and a norm moved away from their init
        for p in model.adapters.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.clip.visual.ln_post.weight.mul_(1.5)
    export = str(tmp_path / "open_clip_model.pt")
    export_open_clip(model, export)
    assert set(torch.load(tmp_path / "adapters.pt", weights_only=True)) == set(model.adapters.state_dict())
    loaded = load_lilt(MODEL, export).eval()
    images, tokens = inputs(2)
    with torch.no_grad():
        want = model(images, tokens)
        torch.testing.assert_close(loaded.encode_image(images, normalize=True), want[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.encode_text(tokens[:, :32], normalize=True), want[1], rtol=0, atol=1e-6)
    # An adapters.pt of the earlier placement (after ln_1/ln_2) must not load into this one.
    old = {k.replace("_attn_in", "_ln_1").replace("_attn_out", "_ln_1").replace("_mlp_in", "_ln_2")
           .replace("_mlp_out", "_ln_2"): v for k, v in model.adapters.state_dict().items()}
    torch.save(old, tmp_path / "old_adapters.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_lilt(MODEL, export, str(tmp_path / "old_adapters.pt"))
