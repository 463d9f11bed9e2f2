"""ELIP token pruning (train/pruning.py) on a tiny 12-block open_clip CLIP (32 px, patch 4: 64
patches, vision width 32 ≠ embed dim 24, so the text → vision-width mapping is exercised)."""
import copy

import pytest
import torch
from open_clip.model import CLIP

from train.model import DualPathCLIP
from train.pruning import (apply_token_pruning, encode_image_pruned, keep_counts, prune_tokens)

GRID = 64  # (32 / 4) ** 2
B = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine: OpenMP threads contend (1 s vs 20 ms a forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(layers: int = 12) -> DualPathCLIP:
    torch.manual_seed(0)
    clip = CLIP(embed_dim=24,
                vision_cfg=dict(image_size=32, patch_size=4, width=32, head_width=16, layers=layers),
                text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    return DualPathCLIP(clip).train()


def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 32, 32, generator=g)
    raw = torch.randint(1, 1000, (B, 77), generator=g)
    raw[:, 10], raw[:, 11:] = 49407, 0
    syn = torch.randint(1, 1000, (B, 77), generator=g)
    syn[:, 12], syn[:, 13:] = 49407, 0
    return images, raw, syn


def test_keep_counts_per_grid():
    ratios = [0.9, 0.65, 0.4]
    assert keep_counts(196, ratios) == [177, 128, 79]  # ViT-B/16 at 224
    assert keep_counts(49, ratios) == [45, 32, 20]  # ViT-B/32 at 224
    assert keep_counts(576, ratios) == [519, 375, 231]  # ViT-B/16 at 384
    assert keep_counts(GRID, ratios) == [58, 42, 26]
    assert keep_counts(100, [0.7, 1.0]) == [70, 100]
    assert keep_counts(4, [0.1]) == [1]


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
    counts = []
    for block in model.clip.visual.transformer.resblocks:
        block.register_forward_hook(lambda m, a, out: counts.append(out.shape[1]))
    model(*batch())
    k = keep_counts(GRID, [0.9, 0.65, 0.4])
    assert counts == [1 + GRID] * 2 + [2 + k[0]] * 2 + [2 + k[1]] * 6 + [2 + k[2]] * 2


def test_fused_token_weights_sum_to_one():
    # One-hot tokens make the fused token equal to its weight vector.
    n, keep = 6, 2
    x = torch.eye(1 + n + 1).unsqueeze(0)  # [CLS, 6 patches, fused]
    scores = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.02, 0.08, 0.05]])  # 6 patches + fused
    out = prune_tokens(x, scores, keep, fused=True)
    assert out.shape == (1, 1 + keep + 1, 8)
    assert torch.equal(out[0, 1:3], x[0, [2, 4]])  # top-2 patches (1 and 3), in spatial order
    fused = out[0, -1]
    assert fused.sum().item() == pytest.approx(1.0)
    dropped = torch.tensor([0.05, 0.1, 0.02, 0.08, 0.05])  # patches 0, 2, 4, 5 and the old fused
    assert torch.allclose(fused[[1, 3, 5, 6, 7]], dropped / dropped.sum())
    # Without a fused token yet, a constant input stays constant: weights sum to 1.
    const = torch.full((2, 1 + n, 3), 2.5)
    assert torch.allclose(prune_tokens(const, torch.rand(2, n), 3, fused=False), torch.full((2, 5, 3), 2.5))


def test_scores_are_the_blocks_own_cls_attention():
    model = tiny_model()
    apply_token_pruning(model)
    visual, block = model.clip.visual, model.clip.visual.transformer.resblocks[2]
    x = torch.randn(B, 1 + GRID, 32)
    h = block.ln_1(x)
    _, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=True)
    scores = visual.token_pruning.scores(block, x)
    assert not scores.requires_grad and scores.shape == (B, 1 + GRID)
    assert torch.allclose(scores, weights[:, 0], atol=1e-6)


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
    model.clip.set_grad_checkpointing(True)
    apply_token_pruning(model)
    text_calls = []
    model.clip.transformer.register_forward_hook(lambda m, a, out: text_calls.append(a[0].shape[0]))
    images, raw, syn = batch()
    image, raw_feat, syn_feat, scale = model(images, raw, syn)
    assert text_calls == [2 * B]  # the text tower ran once, before the image (it guides the pruning)
    assert image.shape == (B, 24) and torch.isfinite(image).all()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(torch.cat([raw, syn])), dim=-1)
    assert torch.allclose(torch.cat([raw_feat, syn_feat]), expected, atol=1e-6)
    (image * raw_feat).sum().backward()  # the checkpointed recompute prunes as the forward did
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
    model = tiny_model()
    apply_token_pruning(model)
    with pytest.raises(ValueError, match="already installed"):
        apply_token_pruning(model)


def test_trainer_trains_with_pruning(tmp_path_factory, tmp_path, capsys):
    from conftest import build_synthetic_shards, overrides, run_main

    shards = build_synthetic_shards(tmp_path_factory.mktemp("pruning_data"), 64, "wds", 32) / "wds"
    summary = run_main(overrides(str(shards), tmp_path, "pruned", model__token_pruning__enabled="true",
                                 model__token_pruning__layers="[1]", model__token_pruning__keep="[0.5]"))
    assert summary["steps"] == 3 and summary["loss"] == summary["loss"]  # finite, not NaN
    from train.main import main

    assert main(overrides(str(shards), tmp_path, "too-deep", model__token_pruning__enabled="true")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lip-train: config error: model.token_pruning:") and "depth 2" in err
