"""ELIP token pruning (train/variants/pruning.py) on a tiny 12-block open_clip CLIP (32 px, patch 4: 64
patches, vision width 32 ≠ embed dim 24, so the text → vision-width mapping is exercised).

The look-ahead is checked against a straightforward re-computation written from the reference's
description (guoyang9/ELIP's open_clip port): copy the tokens, put the text-guided CLS in, run
deep copies of blocks i … i+L−1, read the last one's attention, keep int(197-style × r) tokens in
order and fuse the rest. Models run in float64 where indices are compared, so no near-tie decides."""
import copy

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from train.model import DualPathCLIP
from train.variants.pruning import (apply_token_pruning, default_act_layers, encode_image_pruned, keep_counts,
                           prune_tokens)

GRID = 64  # (32 / 4) ** 2
B = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine: OpenMP threads contend (1 s vs 20 ms a forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(layers: int = 12, head_width: int = 16) -> DualPathCLIP:
    torch.manual_seed(0)
    clip = CLIP(embed_dim=24,
                vision_cfg=dict(image_size=32, patch_size=4, width=32, head_width=head_width, layers=layers),
                text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    return DualPathCLIP(clip).train()


def batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 32, 32, generator=g).to(dtype)
    raw = torch.randint(1, 1000, (B, 77), generator=g)
    raw[:, 10], raw[:, 11:] = 49407, 0
    syn = torch.randint(1, 1000, (B, 77), generator=g)
    syn[:, 12], syn[:, 13:] = 49407, 0
    return images, raw, syn


def straightforward(plain: DualPathCLIP, images, raw, prune_at: dict):
    """The image features of `plain` (a hook-free twin) pruned as the reference describes;
    prune_at {layer: (kept count, look-ahead L)}. Returns (features, {layer: kept indices})."""
    visual = plain.clip.visual
    with torch.no_grad():
        text = F.normalize(plain.encode_text(raw), dim=-1) @ visual.proj.T
    x, kept_at = visual._embeds(images), {}
    for i, block in enumerate(visual.transformer.resblocks):
        if i in prune_at:
            keep, act = prune_at[i]
            with torch.no_grad():
                ahead = x.clone()
                ahead[:, 0] = 0.8 * ahead[:, 0] + 0.2 * text
                blocks = copy.deepcopy(visual.transformer.resblocks[i:i + act])
                for b in blocks[:-1]:
                    ahead = b(ahead)
                h = blocks[-1].ln_1(ahead)
                _, attn = blocks[-1].attn(h, h, h, need_weights=True)  # [B, T, T], heads averaged
                scores = attn[:, 0, 1:]
                order = scores.sort(dim=-1, descending=True).indices
                kept, dropped = order[:, :keep].sort(dim=-1).values, order[:, keep:]
                weights = scores.gather(1, dropped)
                weights = weights / weights.sum(dim=-1, keepdim=True)
            kept_at[i] = kept
            tokens = x[:, 1:]
            fused = torch.stack([(tokens[b, dropped[b]] * weights[b, :, None]).sum(dim=0) for b in range(B)])
            x = torch.cat([x[:, :1], torch.stack([tokens[b, kept[b]] for b in range(B)]), fused[:, None]], dim=1)
        x = block(x)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj, kept_at


def test_keep_counts_per_grid():
    ratios = [0.9, 0.65, 0.4]
    assert keep_counts(196, ratios) == [177, 128, 78]  # ViT-B/16 at 224: the reference's int(197 × r)
    assert keep_counts(49, ratios) == [45, 32, 20]  # ViT-B/32 at 224: int(50 × r)
    assert keep_counts(576, ratios) == [519, 375, 230]  # ViT-B/16 at 384: int(577 × r)
    assert keep_counts(GRID, ratios) == [58, 42, 26]
    assert keep_counts(99, [0.29, 1.0]) == [29, 100]  # 0.29 × 100 = 28.999999999999996 counts as 29
    assert keep_counts(4, [0.1]) == [1]


def test_default_act_layers_are_the_references():
    assert default_act_layers([2, 4, 10], 12) == [2, 6, 2]  # blocks 3, 9 and 11 score
    assert default_act_layers([1, 2], 3) == [1, 1]
    model = tiny_model()
    apply_token_pruning(model)
    assert model.clip.visual.token_pruning.act_layers == [2, 6, 2]
    from train.config import load_config

    shards = "data.train_shards=shards/x/wds"
    assert load_config(overrides=[shards]).model.token_pruning.act_layers is None  # derived, as above
    cfg = load_config(overrides=[shards, "model.token_pruning.act_layers=[1,1,1]"]).model.token_pruning
    assert cfg.act_layers == [1, 1, 1] and cfg.text_rescale is False


def test_keep_all_is_unpruned_in_train_mode():
    plain = tiny_model()
    pruned = copy.deepcopy(plain)
    apply_token_pruning(pruned, keep=[1.0, 1.0, 1.0])
    images, raw, syn = batch()
    for a, b in zip(plain(images, raw, syn), pruned(images, raw, syn)):
        assert torch.equal(a, b)
    assert torch.equal(plain.encode_image(images), pruned.encode_image(images))


def test_eval_mode_uses_all_tokens():
    plain = tiny_model().eval()
    pruned = copy.deepcopy(plain)
    apply_token_pruning(pruned)
    images, raw, syn = batch()
    with torch.no_grad():
        for a, b in zip(plain(images, raw, syn), pruned(images, raw, syn)):
            assert torch.equal(a, b)
    pruned.train()
    with torch.no_grad():
        assert not torch.allclose(plain(images, raw, syn)[0], pruned(images, raw, syn)[0])


def test_token_counts_after_each_prune_layer():
    model = tiny_model()
    apply_token_pruning(model)  # layers 2, 4, 10
    pruner, counts = model.clip.visual.token_pruning, []
    for block in model.clip.visual.transformer.resblocks:  # the look-ahead's block calls are not counted
        block.register_forward_hook(lambda m, a, out: None if pruner.looking_ahead else counts.append(out.shape[1]))
    model(*batch())
    k = keep_counts(GRID, [0.9, 0.65, 0.4])
    assert counts == [1 + GRID] * 2 + [2 + k[0]] * 2 + [2 + k[1]] * 6 + [2 + k[2]] * 2


def test_fused_token_is_a_candidate_and_weights_sum_to_one():
    # One-hot tokens make the fused token equal to its weight vector.
    x = torch.eye(8).unsqueeze(0)  # [CLS, 6 patches, a fused token of an earlier layer]
    scores = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.02, 0.08, 0.05]])  # all 7 candidates
    out = prune_tokens(x, scores, 2)
    assert out.shape == (1, 1 + 2 + 1, 8)
    assert torch.equal(out[0, 1:3], x[0, [2, 4]])  # top-2 candidates (1 and 3), in their order
    fused = out[0, -1]
    assert fused.sum().item() == pytest.approx(1.0)
    dropped = torch.tensor([0.05, 0.1, 0.02, 0.08, 0.05])  # candidates 0, 2, 4, 5 and the old fused
    assert torch.allclose(fused[[1, 3, 5, 6, 7]], dropped / dropped.sum())
    # The old fused token wins a slot like a patch: it stays, last of the kept, before the new one.
    out = prune_tokens(x, torch.tensor([[0.05, 0.1, 0.1, 0.1, 0.02, 0.08, 0.5]]), 2)
    assert torch.equal(out[0, 1:3], x[0, [2, 7]])
    # A constant input stays constant: weights sum to 1.
    const = torch.full((2, 7, 3), 2.5)
    assert torch.allclose(prune_tokens(const, torch.rand(2, 6), 3), torch.full((2, 5, 3), 2.5))


@pytest.mark.parametrize("act_layers", [[2, 6, 2], [1, 1, 1], [3, 1, 2]])
def test_look_ahead_keeps_the_straightforward_indices(act_layers):
    plain = tiny_model().double()
    model = copy.deepcopy(plain)
    apply_token_pruning(model, act_layers=act_layers)
    pruner = model.clip.visual.token_pruning
    grad_modes = []
    for block in model.clip.visual.transformer.resblocks:
        block.register_forward_pre_hook(lambda m, a: grad_modes.append((pruner.looking_ahead, torch.is_grad_enabled())))
    images, raw, syn = batch(torch.float64)
    images_a, images_b = images.clone().requires_grad_(True), images.clone().requires_grad_(True)
    image, raw_feat, _, _ = model(images_a, raw, syn)
    counts = keep_counts(GRID, [0.9, 0.65, 0.4])
    expected, kept_at = straightforward(plain, images_b, raw, dict(zip([2, 4, 10], zip(counts, act_layers))))
    for layer in (2, 4, 10):
        assert torch.equal(pruner.kept[layer], kept_at[layer]), layer
    assert torch.allclose(image, F.normalize(expected, dim=-1), rtol=1e-9, atol=1e-12)
    # No gradient flows through the look-ahead copy: its blocks run without grad, and the input
    # gradient is the one of the re-computation, whose scores are constants.
    assert {grad for ahead, grad in grad_modes if ahead} == {False}
    assert sum(ahead for ahead, _ in grad_modes) == sum(act_layers)  # L block calls per pruning layer
    (image * raw_feat.detach()).sum().backward()
    (F.normalize(expected, dim=-1) * raw_feat.detach()).sum().backward()
    assert torch.allclose(images_a.grad, images_b.grad, rtol=1e-9, atol=1e-12)


def previous_selection(block, x, text, proj, keep):
    """The project's selection before the look-ahead (commit 334f393): the guided CLS, with the
    text scaled to the CLS norm, queries the UNCHANGED tokens of the pruning block itself;
    ceil(r × patches) patches stay."""
    cls = x[:, 0]
    if text is not None:
        t = F.normalize(text, dim=-1) @ proj.T
        cls = 0.8 * cls + 0.2 * t * cls.norm(dim=-1, keepdim=True) / t.norm(dim=-1, keepdim=True)
    h = block.ln_1(x)
    _, attn = block.attn(block.ln_1(cls)[:, None], h, h, need_weights=True)
    scores = attn[:, 0, 1:]
    order = scores.argsort(dim=1, descending=True, stable=True)
    kept, dropped = order[:, :keep].sort(dim=1).values, order[:, keep:]
    w = scores.gather(1, dropped)
    w = w / w.sum(dim=1, keepdim=True)
    patches = x[:, 1:]
    gather = lambda idx: patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
    return kept, torch.cat([x[:, :1], gather(kept), (w.unsqueeze(-1) * gather(dropped)).sum(1, keepdim=True)], 1)


@pytest.mark.parametrize("guided", [False, True])
def test_act_layers_one_is_the_previous_selection(guided):
    """[1] with text_rescale=True selects what the previous code selected. Its guided CLS now also
    replaces the CLS key, which rescales every patch score of a head alike: with one head (the
    guided case) the ranking and fused weights cannot change; unguided nothing changes."""
    plain = tiny_model(head_width=32 if guided else 16).double()
    model = copy.deepcopy(plain)
    seen = []
    model.clip.visual.transformer.resblocks[2].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    apply_token_pruning(model, layers=[2], keep=[0.5], act_layers=[1], text_rescale=True)  # 32 of 64 either way
    model.clip.visual.transformer.resblocks[2].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    images, raw, syn = batch(torch.float64)
    with torch.no_grad():
        text = model.encode_text(raw) if guided else None
        encode_image_pruned(model, images, text)
        kept, tokens = previous_selection(plain.clip.visual.transformer.resblocks[2], seen[0], text,
                                          plain.clip.visual.proj, 32)
    assert torch.equal(model.clip.visual.token_pruning.kept[2], kept)
    assert torch.allclose(seen[-1], tokens, rtol=1e-9, atol=1e-12)  # ([1:-1]: the look-ahead's calls)


def test_scores_are_the_blocks_own_cls_attention():
    model = tiny_model()
    apply_token_pruning(model, act_layers=[1, 1, 1])
    visual, block = model.clip.visual, model.clip.visual.transformer.resblocks[2]
    x = torch.randn(B, 1 + GRID, 32)
    h = block.ln_1(x)
    _, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=True)
    scores = visual.token_pruning.scores(2, x)
    assert not scores.requires_grad and scores.shape == (B, GRID)
    assert torch.allclose(scores, weights[:, 0, 1:], atol=1e-6)


def test_gradients_reach_kept_and_fused_patches():
    model = tiny_model(layers=3)
    apply_token_pruning(model, layers=[0], keep=[0.25])  # before any mixing: dropped patches
    images, raw, syn = batch()                            # reach the output only via the fused token
    images.requires_grad_(True)
    image, raw_feat, _, _ = model(images, raw, syn)
    (image * raw_feat.detach()).sum().backward()
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0
    per_patch = images.grad.abs().unfold(2, 4, 4).unfold(3, 4, 4).sum(dim=(1, 4, 5))  # [B, 8, 8]
    assert (per_patch > 0).all()


def test_guided_forward_shape_text_once_and_grad_checkpointing():
    model = tiny_model()
    unchecked = copy.deepcopy(model)
    model.clip.set_grad_checkpointing(True)
    apply_token_pruning(model)
    apply_token_pruning(unchecked)
    text_calls = []
    model.clip.transformer.register_forward_hook(lambda m, a, out: text_calls.append(a[0].shape[0]))
    images, raw, syn = batch()
    image, raw_feat, syn_feat, scale = model(images, raw, syn)
    assert text_calls == [2 * B]  # the text tower ran once, before the image (it guides the pruning)
    assert image.shape == (B, 24) and torch.isfinite(image).all()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(torch.cat([raw, syn])), dim=-1)
    assert torch.allclose(torch.cat([raw_feat, syn_feat]), expected, atol=1e-6)
    kept = dict(model.clip.visual.token_pruning.kept)
    (image * raw_feat).sum().backward()  # the checkpointed recompute prunes as the forward did
    for layer, idx in model.clip.visual.token_pruning.kept.items():
        assert torch.equal(idx, kept[layer])
    # ... though the guidance text is gone by then: the gradients are those without checkpointing.
    image_u, raw_u, _, _ = unchecked(images, raw, syn)
    (image_u * raw_u).sum().backward()
    for (name, p), q in zip(model.clip.visual.named_parameters(), unchecked.clip.visual.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    # Guidance changes the selection; image-only encodes prune with the CLS alone.
    with torch.no_grad():
        a = encode_image_pruned(model, images, torch.randn(B, 24))
        b = encode_image_pruned(model, images, torch.randn(B, 24))
        c = model.encode_image(images)
    assert a.shape == c.shape == (B, 24) and not torch.allclose(a, b)


def test_bad_configs():
    with pytest.raises(ValueError, match="layer 12 .*depth 12"):
        apply_token_pruning(tiny_model(), layers=[2, 12], keep=[0.9, 0.5])
    with pytest.raises(ValueError, match="layer 4, 10 .*depth 3"):
        apply_token_pruning(tiny_model(layers=3))
    with pytest.raises(ValueError, match="keep ratios"):
        apply_token_pruning(tiny_model(), layers=[2, 4], keep=[0.9])
    with pytest.raises(ValueError, match="non-increasing"):
        apply_token_pruning(tiny_model(), layers=[2, 4], keep=[0.5, 0.9])
    with pytest.raises(ValueError, match="3 layers but 2 act_layers"):
        apply_token_pruning(tiny_model(), act_layers=[2, 6])
    with pytest.raises(ValueError, match="whole numbers"):
        apply_token_pruning(tiny_model(), act_layers=[2, 0, 2])
    with pytest.raises(ValueError, match=r"look past .*layer 10 \+ 3 blocks > depth 12"):
        apply_token_pruning(tiny_model(), act_layers=[2, 6, 3])
    model = tiny_model()
    apply_token_pruning(model)
    with pytest.raises(ValueError, match="already installed"):
        apply_token_pruning(model)


def test_trainer_trains_with_pruning(tmp_path_factory, tmp_path, capsys):
    from conftest import build_synthetic_shards, overrides, run_main

    shards = build_synthetic_shards(tmp_path_factory.mktemp("pruning_data"), 64, "wds", 32) / "wds"
    summary = run_main(overrides(str(shards), tmp_path, "pruned", model__token_pruning__enabled="true",
                                 model__token_pruning__layers="[0]", model__token_pruning__keep="[0.5]",
                                 model__token_pruning__act_layers="[2]"))  # block 1 scores
    assert summary["steps"] == 3 and summary["loss"] == summary["loss"]  # finite, not NaN
    from train.main import main

    assert main(overrides(str(shards), tmp_path, "too-deep", model__token_pruning__enabled="true")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lip-train: config error: model.token_pruning:") and "depth 2" in err
    assert main(overrides(str(shards), tmp_path, "too-far", model__token_pruning__enabled="true",
                          model__token_pruning__layers="[1]", model__token_pruning__keep="[0.5]",
                          model__token_pruning__act_layers="[2]")) == 2
    assert "look past" in capsys.readouterr().err.strip().splitlines()[-1]
