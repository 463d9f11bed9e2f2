"""ELIP vision-token pruning (Guo et al., "ELIP: Efficient Language-Image Pre-training with Fewer
Vision Tokens") for open_clip's VisionTransformer.

Before each chosen block (0-based; defaults 2, 4, 10) the patches are scored by the head-averaged
attention of a text-guided CLS query, `0.8·cls + 0.2·text`, computed with that block's own `ln_1`
and q/k projections under no_grad. The top-k patches stay in their original spatial order
(k = keep ratio × the ORIGINAL patch count, see `keep_counts`) and the rest are fused into one token,
weighted by their renormalised scores: layout [CLS, kept patches, fused]. The fused token never
competes for a kept slot; at a later prune layer it is fused again with the newly dropped patches,
weighted by its own score. Only training forwards prune; `model.eval()` uses every token.

Text guidance: ELIP's BLIP-style towers share a width, open_clip's do not (vision width ≠ embed
dim). The detached, L2-normalised text embedding is mapped into the vision width with the transpose
of the visual projection (`text @ visual.proj.T`) and rescaled to the CLS token's norm before the
mix. Without text (an image-only encode) the CLS alone is the query.

Hooks, not a copied forward: pre-hooks on the chosen `resblocks` replace their input tokens, which
open_clip's loop (grad checkpointing included) passes on unchanged; pooling reads token 0 (CLS)
(an `avg`-pooled tower would average the kept and fused tokens).
Patch dropout is refused: it drops tokens too and would break the original-grid keep counts.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LAYERS = (2, 4, 10)
DEFAULT_KEEP = (0.9, 0.65, 0.4)
CLS_WEIGHT = 0.8  # the text gets 1 - CLS_WEIGHT


def keep_counts(grid_patches: int, keep: Sequence[float]) -> list[int]:
    """Patches kept per prune layer: ceil(ratio × original count), at least 1. ceil, as in EViT's
    code that ELIP builds on; the rounding guards products like 0.7×100 = 70.00000000000001."""
    return [max(1, math.ceil(round(r * grid_patches, 6))) for r in keep]


def prune_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, fused: bool) -> torch.Tensor:
    """x [B, 1 + P (+1 fused), D], scores [B, P (+1)] (no grad) → [B, 1 + keep + 1, D]; unchanged
    when nothing is to be dropped, so a keep ratio of 1.0 is exactly the unpruned model."""
    n_patches = x.shape[1] - 1 - int(fused)
    if keep >= n_patches:
        return x
    cls, patches = x[:, :1], x[:, 1:1 + n_patches]
    order = scores[:, :n_patches].argsort(dim=1, descending=True, stable=True)
    kept_idx = order[:, :keep].sort(dim=1).values  # spatial order, for whatever reads positions later
    drop_idx = order[:, keep:]
    gather = lambda idx: patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
    dropped, weights = gather(drop_idx), scores[:, :n_patches].gather(1, drop_idx)
    if fused:
        dropped = torch.cat([dropped, x[:, -1:]], dim=1)
        weights = torch.cat([weights, scores[:, -1:]], dim=1)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    merged = (weights.unsqueeze(-1).to(dropped.dtype) * dropped).sum(dim=1, keepdim=True)
    return torch.cat([cls, gather(kept_idx), merged], dim=1)


class _Pruner:
    """The pruning plan of one visual tower plus the guidance text of the forward under way."""

    def __init__(self, visual: nn.Module, layers: Sequence[int], keep: Sequence[float]):
        blocks = visual.transformer.resblocks
        depth, grid = len(blocks), visual.grid_size[0] * visual.grid_size[1]
        if len(layers) != len(keep) or not layers:
            raise ValueError(f"token pruning: {len(layers)} layers but {len(keep)} keep ratios")
        bad = [layer for layer in layers if not 0 <= layer < depth]
        if bad:
            raise ValueError(f"token pruning layer {', '.join(map(str, bad))} is outside the vision "
                             f"tower (depth {depth}: layers 0..{depth - 1})")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"token pruning layers {list(layers)} must be strictly increasing")
        if any(not 0 < r <= 1 for r in keep) or list(keep) != sorted(keep, reverse=True):
            raise ValueError(f"token pruning keep ratios {list(keep)} must be in (0, 1], non-increasing")
        if not visual.transformer.batch_first:  # open_clip ≥ 2.24 vision towers are batch-first
            raise ValueError("token pruning expects a batch-first (N, L, D) vision transformer")
        if getattr(visual.patch_dropout, "prob", 0.0) > 0:
            raise ValueError("token pruning and patch dropout both drop tokens: use one")
        for layer in layers:
            if not isinstance(getattr(blocks[layer], "attn", None), nn.MultiheadAttention):
                raise ValueError(f"token pruning needs nn.MultiheadAttention blocks (layer {layer})")
        self.visual, self.text = visual, None
        # Static plan (patches in, fused in, keep) per layer: hooks stay stateless, so grad
        # checkpointing's recompute of a block prunes exactly as its first run did.
        self.plan, patches, fused = {}, grid, False
        for layer, k in zip(layers, keep_counts(grid, keep)):
            self.plan[layer] = (patches, fused, k)
            fused, patches = fused or k < patches, min(k, patches)
        self.handles = [blocks[layer].register_forward_pre_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer: int):
        def hook(block: nn.Module, args: tuple):
            if not self.visual.training:
                return None
            x = args[0]
            patches, fused, keep = self.plan[layer]
            if x.shape[1] != 1 + patches + fused:
                raise RuntimeError(f"token pruning at layer {layer}: {x.shape[1]} tokens, "
                                   f"expected {1 + patches + fused}")
            scores = self.scores(block, x)[:, 1:]
            return (prune_tokens(x, scores, keep, fused),) + args[1:]
        return hook

    @torch.no_grad()
    def scores(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] → [B, N]: head-averaged softmax attention of the (guided) CLS query."""
        cls = x[:, 0]
        if self.text is not None:
            if self.text.shape[0] != x.shape[0]:
                raise ValueError(f"token pruning: {self.text.shape[0]} texts for {x.shape[0]} images")
            text = F.normalize(self.text.float(), dim=-1) @ self.visual.proj.float().T
            scale = cls.float().norm(dim=-1, keepdim=True) / text.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            text = text * scale
            cls = CLS_WEIGHT * cls + (1 - CLS_WEIGHT) * text.to(cls.dtype)
        attn = block.attn
        width, heads = x.shape[-1], attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        b = b if b is not None else torch.zeros(3 * width, device=x.device, dtype=x.dtype)
        q = F.linear(block.ln_1(cls), w[:width], b[:width]).view(x.shape[0], heads, 1, -1)
        k = F.linear(block.ln_1(x), w[width:2 * width], b[width:2 * width])
        k = k.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
        attn_weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).float().softmax(dim=-1)
        return attn_weights.mean(dim=1).squeeze(1)  # [B, N]


def apply_token_pruning(model: nn.Module, layers: Sequence[int] = DEFAULT_LAYERS,
                        keep: Sequence[float] = DEFAULT_KEEP) -> None:
    """Prune `model.clip.visual`'s tokens in training forwards. A training `model(images, raw, syn)`
    (DualPathCLIP) encodes the texts first and guides the pruning with that forward's raw-text
    features; a bare `model.encode_image` is guided by the CLS alone."""
    visual = model.clip.visual
    if hasattr(visual, "token_pruning"):
        raise ValueError("token pruning is already installed on this model")
    visual.token_pruning = _Pruner(visual, layers, keep)


@contextlib.contextmanager
def pruning_guidance(model: nn.Module, text_features: torch.Tensor | None):
    """Guide the pruning of image encodes inside the block with `text_features` [B, embed_dim]
    (detached here: no gradient flows through the scores)."""
    pruner = getattr(model.clip.visual, "token_pruning", None)
    if pruner is None:  # nothing installed: nothing to guide
        yield
        return
    previous, pruner.text = pruner.text, None if text_features is None else text_features.detach()
    try:
        yield
    finally:
        pruner.text = previous


def encode_image_pruned(model: nn.Module, images: torch.Tensor, text_features: torch.Tensor | None):
    """`model.encode_image(images)` (unnormalised, as open_clip returns it) guided by the texts."""
    with pruning_guidance(model, text_features):
        return model.encode_image(images)
