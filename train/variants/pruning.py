"""ELIP vision-token pruning (Guo et al., "ELIP: Efficient Language-Image Pre-training with Fewer
Vision Tokens") for open_clip's VisionTransformer, as the authors' open_clip port does it
(guoyang9/ELIP, CLIP/src/open_clip/transformer.py, `VisionTransformer.vision_token_pruning`).

Before each pruning block i (0-based; defaults 2, 4, 10, the reference's `begin_layer`):
1. **Text-guided CLS.** A copy of the block's input tokens gets its CLS replaced by
   `0.8·cls + 0.2·(text @ visual.proj.T)`, the text being the same forward's L2-normalised,
   detached raw-text embedding (texts are encoded first, `train/model.py`). `visual.proj.T` maps it
   into the vision width (open_clip's towers differ in width), as the reference does, with no
   rescaling; `text_rescale=True` scales the mapped text to the CLS norm first (this project's
   earlier rule). Without text (an image-only training encode) the CLS alone guides.
2. **Look-ahead scoring.** The copy runs through blocks i … i+L−1 under no_grad, and the
   candidates are scored by the head-averaged attention of the CLS query in block i+L−1 (read
   from that block's own `nn.MultiheadAttention`, with every hook the model has). L is the layer's
   entry in `act_layers`; by default each look-ahead runs up to the block before the next pruning
   layer and the last one to the end of the tower: with layers (2, 4, 10) in a 12-block ViT that
   is the reference's `num_act_layers` [2, 6, 2], so blocks 3, 9 and 11 score. `[1, 1, 1]`
   scores with block i's own attention, this project's earlier rule.
3. **Keep and fuse.** The candidates are every token after the CLS, a fused token of an earlier
   pruning layer included (it competes like a patch, as in the reference). The top k stay in
   their order; the rest are fused into one token appended at the end, weighted by their scores
   renormalised to sum 1: layout [CLS, kept candidates, fused].

Keep counts (`keep_counts`): k = int(N·r) with N = the ORIGINAL token count counting the CLS
(patches + 1, not the current candidates): the reference's `int(197 * r)` for ViT-B/16 at 224 px
(177, 128, 78), generalised to the tower's own grid. k ≥ the layer's candidates prunes nothing,
so keep ratio 1.0 is exactly the unpruned model.

Where this still differs from the reference, and why:
- Training forwards only: `model.eval()` sees every token. The reference prunes whenever its
  `forward` gets text; its evaluation encodes images without text, i.e. unpruned: the same.
- Counts follow the tower's grid; the reference hard-codes 197 tokens (for ViT-B/32's 49 patches
  it would keep them all). Products such as 0.29 × 100 = 28.999999999999996 count as 29.
- The fused weights are divided by their sum (they sum to 1); the reference divides by sum + 1e-6
  (a relative shrink of 1e-6 / sum of the fused token).
- The look-ahead runs the blocks themselves under no_grad instead of `copy.deepcopy` copies (the
  same numbers without copying weights every step), and stops the scoring block after its
  attention: the reference discards that block's MLP output.
- An image-only training encode prunes with the CLS alone; the reference does not prune without
  text. `lip-train`'s forwards always carry text.
- Ties in the scores keep the earlier token (stable sort); the reference's sort leaves them open.

Hooks, not a copied forward: pre-hooks on the pruning `resblocks` replace their input tokens, which
open_clip's loop (grad checkpointing included: its backward recompute reuses the forward's
selection, see `_Pruner._recall`) passes on unchanged; pooling reads token 0 (CLS).
Patch dropout is refused: it drops tokens too and would break the original-grid keep counts.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LAYERS = (2, 4, 10)
DEFAULT_KEEP = (0.9, 0.65, 0.4)
CLS_WEIGHT = 0.8  # the text gets 1 - CLS_WEIGHT


def keep_counts(grid_patches: int, keep: Sequence[float]) -> list[int]:
    """Candidates kept per pruning layer: int(N × ratio), N = grid_patches + 1 (the CLS counted,
    as the reference's int(197 × r)), at least 1. The rounding guards products that land just
    below an integer."""
    n = grid_patches + 1
    return [max(1, math.floor(round(r * n, 6))) for r in keep]


def default_act_layers(layers: Sequence[int], depth: int) -> list[int]:
    """Look-ahead lengths when none are given: up to the block before the next pruning layer, the
    last to the tower's end. This is how the reference's [2, 6, 2] relates to its layers (2, 4, 10)
    in 12 blocks, and it stays valid when the layers or the depth change (demo towers)."""
    ends = list(layers[1:]) + [depth]
    return [end - layer for layer, end in zip(layers, ends)]


def select(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, n] → (kept [B, keep] in ascending order, dropped [B, n - keep]) candidate
    indices: the top `keep` by score stay, in their original order."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    return order[:, :keep].sort(dim=1).values, order[:, keep:]


def merge(x: torch.Tensor, scores: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """x [B, 1 + n, D] → [B, 1 + keep + 1, D]: CLS, the kept candidates, then the dropped ones
    fused with their scores renormalised to sum 1 (scores carry no gradient; the tokens do)."""
    candidates = x[:, 1:]
    gather = lambda idx: candidates.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
    weights = scores.gather(1, dropped)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    fused = (weights.unsqueeze(-1).to(x.dtype) * gather(dropped)).sum(dim=1, keepdim=True)
    return torch.cat([x[:, :1], gather(kept), fused], dim=1)


def prune_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """x [B, 1 + n, D] (CLS, n candidates), scores [B, n] → [B, 1 + keep + 1, D]; unchanged when
    nothing is to be dropped."""
    if keep >= x.shape[1] - 1:
        return x
    return merge(x, scores, *select(scores, keep))


class _Scored(Exception):
    """Raised once the scoring block's attention weights are read: the rest of it is unused."""


class _Pruner:
    """The pruning plan of one visual tower plus the guidance text of the forward under way."""

    def __init__(self, visual: nn.Module, layers: Sequence[int], keep: Sequence[float],
                 act_layers: Sequence[int] | None = None, text_rescale: bool = False):
        blocks = visual.transformer.resblocks
        depth, grid = len(blocks), visual.grid_size[0] * visual.grid_size[1]
        layers, keep = list(layers), list(keep)
        if len(layers) != len(keep) or not layers:
            raise ValueError(f"token pruning: {len(layers)} layers but {len(keep)} keep ratios")
        bad = [layer for layer in layers if not 0 <= layer < depth]
        if bad:
            raise ValueError(f"token pruning layer {', '.join(map(str, bad))} is outside the vision "
                             f"tower (depth {depth}: layers 0..{depth - 1})")
        if layers != sorted(set(layers)):
            raise ValueError(f"token pruning layers {layers} must be strictly increasing")
        if any(not 0 < r <= 1 for r in keep) or keep != sorted(keep, reverse=True):
            raise ValueError(f"token pruning keep ratios {keep} must be in (0, 1], non-increasing")
        act = default_act_layers(layers, depth) if act_layers is None else list(act_layers)
        if len(act) != len(layers):
            raise ValueError(f"token pruning: {len(layers)} layers but {len(act)} act_layers")
        if any(isinstance(a, bool) or not isinstance(a, int) or a < 1 for a in act):
            raise ValueError(f"token pruning act_layers {act} must be whole numbers ≥ 1")
        past = [f"layer {layer} + {a}" for layer, a in zip(layers, act) if layer + a > depth]
        if past:
            raise ValueError(f"token pruning act_layers look past the vision tower ({', '.join(past)} "
                             f"blocks > depth {depth})")
        if not visual.transformer.batch_first:  # open_clip ≥ 2.24 vision towers are batch-first
            raise ValueError("token pruning expects a batch-first (N, L, D) vision transformer")
        if getattr(visual.patch_dropout, "prob", 0.0) > 0:
            raise ValueError("token pruning and patch dropout both drop tokens: use one")
        for layer, a in zip(layers, act):
            if not isinstance(getattr(blocks[layer + a - 1], "attn", None), nn.MultiheadAttention):
                raise ValueError(f"token pruning needs nn.MultiheadAttention blocks (layer {layer + a - 1})")
        self.visual, self.text, self.text_rescale = visual, None, text_rescale
        self.act_layers = act
        self.looking_ahead = False  # set while the look-ahead runs blocks: their pre-hooks stand by
        self.kept: dict[int, torch.Tensor] = {}  # the last pruning forward's kept candidates per layer
        self._selections: dict[int, list] = {}  # see _recall
        # Static plan (candidates in, keep, look-ahead) per layer: hooks stay stateless, so grad
        # checkpointing's recompute of a block prunes exactly as its first run did.
        self.plan, candidates = {}, grid
        for layer, k, a in zip(layers, keep_counts(grid, keep), act):
            self.plan[layer] = (candidates, k, a)
            candidates = k + 1 if k < candidates else candidates  # kept + the new fused token
        self.handles = [blocks[layer].register_forward_pre_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer: int):
        def hook(block: nn.Module, args: tuple):
            if not self.visual.training or self.looking_ahead:
                return None
            x = args[0]
            candidates, keep, _ = self.plan[layer]
            if x.shape[1] != 1 + candidates:
                raise RuntimeError(f"token pruning at layer {layer}: {x.shape[1]} tokens, "
                                   f"expected {1 + candidates}")
            if keep >= candidates:  # nothing to drop: skip the look-ahead too
                return None
            selection = self._recall(layer, x)
            if selection is None:
                scores = self.scores(layer, x)
                selection = (scores, *select(scores, keep))
                self._remember(layer, x, selection)
            scores, kept, dropped = selection
            self.kept[layer] = kept
            return (merge(x, scores, kept, dropped),) + args[1:]
        return hook

    # Grad checkpointing reruns a block in the backward pass, when the forward's guidance text is
    # gone: a fresh look-ahead would select other tokens for the same graph. Its recompute gets the
    # very input tensor the forward got, so the selection is kept per input (weakly: it goes with
    # the tensor) and reused, which also spares the recompute the look-ahead.
    def _recall(self, layer: int, x: torch.Tensor):
        for ref, version, selection in self._selections.get(layer, ()):
            if ref() is x and x._version == version:
                return selection
        return None

    def _remember(self, layer: int, x: torch.Tensor, selection: tuple) -> None:
        alive = [entry for entry in self._selections.get(layer, ()) if entry[0]() is not None]
        self._selections[layer] = alive[-7:] + [(weakref.ref(x), x._version, selection)]

    @contextlib.contextmanager
    def guide(self, text_features: torch.Tensor | None):
        """Guide the pruning of image encodes inside the block with `text_features` [B, embed_dim]
        (detached: no gradient flows through the scores)."""
        previous, self.text = self.text, None if text_features is None else text_features.detach()
        try:
            yield
        finally:
            self.text = previous

    @torch.no_grad()
    def guided_cls(self, cls: torch.Tensor) -> torch.Tensor:
        """[B, width] → the text-guided CLS `0.8·cls + 0.2·(text @ proj.T)` (the CLS alone
        without text)."""
        if self.text is None:
            return cls
        if self.text.shape[0] != cls.shape[0]:
            raise ValueError(f"token pruning: {self.text.shape[0]} texts for {cls.shape[0]} images")
        dtype = torch.promote_types(cls.dtype, torch.float32)  # half-precision runs map in float32
        text = F.normalize(self.text.to(dtype), dim=-1)
        proj = self.visual.proj
        if proj is not None:  # embed dim → vision width
            text = text @ proj.to(dtype).T
        if self.text_rescale:
            norm = text.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            text = text * cls.to(dtype).norm(dim=-1, keepdim=True) / norm
        return CLS_WEIGHT * cls + (1 - CLS_WEIGHT) * text.to(cls.dtype)

    @torch.no_grad()
    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[B, 1 + n, D], the input of pruning block `layer` → [B, n]: the look-ahead's
        head-averaged CLS attention over the n candidates (at least float32)."""
        _, _, act = self.plan[layer]
        blocks = self.visual.transformer.resblocks
        ahead = x.clone()
        ahead[:, 0] = self.guided_cls(ahead[:, 0])
        self.looking_ahead = True  # the pruning hooks of blocks inside the look-ahead stand by
        try:
            for block in blocks[layer:layer + act - 1]:
                ahead = block(ahead)
            weights = self._cls_attention(blocks[layer + act - 1], ahead)
        finally:
            self.looking_ahead = False
        return weights[:, 1:].to(torch.promote_types(weights.dtype, torch.float32))  # fp16: fuse in fp32

    @staticmethod
    def _cls_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run `block` on x until its attention has run; return that attention's head-averaged
        CLS row [B, 1 + n]. Read from the module itself (hooks asking it for its weights), so
        whatever the model does before the attention (LayerNorm, adapters) is in the score."""
        captured = []

        def want_weights(module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": True}

        def capture(module, args, output):
            captured.append(output[1][:, 0])
            raise _Scored

        handles = [block.attn.register_forward_pre_hook(want_weights, with_kwargs=True),
                   block.attn.register_forward_hook(capture)]
        try:
            block(x)
        except _Scored:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"token pruning: the scoring block ran its attention {len(captured)} times")
        return captured[0]


def apply_token_pruning(model: nn.Module, layers: Sequence[int] = DEFAULT_LAYERS,
                        keep: Sequence[float] = DEFAULT_KEEP, act_layers: Sequence[int] | None = None,
                        text_rescale: bool = False) -> None:
    """Prune `model.clip.visual`'s tokens in training forwards. A training `model(images, raw, syn)`
    (DualPathCLIP) encodes the texts first and guides the pruning with that forward's raw-text
    features; a bare `model.encode_image` is guided by the CLS alone. `act_layers` None: see
    `default_act_layers` ([2, 6, 2] for the default layers in a 12-block tower)."""
    visual = model.clip.visual
    if hasattr(visual, "token_pruning"):
        raise ValueError("token pruning is already installed on this model")
    visual.token_pruning = _Pruner(visual, layers, keep, act_layers, text_rescale)
    if hasattr(model, "image_guide"):  # DualPathCLIP's forward guides its image encode with its raw text
        model.image_guide = visual.token_pruning.guide


@contextlib.contextmanager
def pruning_guidance(model: nn.Module, text_features: torch.Tensor | None):
    """Guide the pruning of image encodes inside the block with `text_features` [B, embed_dim]
    (detached here: no gradient flows through the scores)."""
    pruner = getattr(model.clip.visual, "token_pruning", None)
    if pruner is None:  # nothing installed: nothing to guide
        yield
        return
    with pruner.guide(text_features):
        yield


def encode_image_pruned(model: nn.Module, images: torch.Tensor, text_features: torch.Tensor | None):
    """`model.encode_image(images)` (unnormalised, as open_clip returns it) guided by the texts."""
    with pruning_guidance(model, text_features):
        return model.encode_image(images)
