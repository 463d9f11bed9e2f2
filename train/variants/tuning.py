"""Which parameters train (`model.tuning`): all (`none`), LiT or LilT, as codezakh/LilT builds them.

- `lit` (Zhai et al. 2022) locks the image tower as open_clip's `lock_image_tower` does and keeps
  it in eval mode (patch dropout and any dropout off), but the image projection (`visual.proj`)
  trains: the reference's LiT script (`freeze_vision_encoder=True`) freezes the encoder only, its
  `vision_proj` stays trainable.
- `lilt` (Khan & Fu, ICLR 2023) freezes both towers, unlocks every LayerNorm, the projections and
  the logit scale, and adds two bottleneck adapters `A(x) = x + W_up·GELU(W_down·x)` (hidden =
  width // 4) per residual block, in both towers, where the reference puts them:
  - image tower (its timm-style ViT `Block`): on the block input, feeding only the branch's norm,
    `x + attn(ln_1(A1(x)))` then `h + mlp(ln_2(A2(h)))`: the residual carries the raw input.
    Forward pre-hooks on `ln_1` / `ln_2` replace what the norm reads and nothing else.
  - text tower (its BERT `BertSelfOutput` / `BertOutput`): on the branch output, before the
    residual add, `x + A1(attn(ln_1(x)))` then `h + A2(mlp(ln_2(h)))`. Forward hooks on `ls_1` /
    `ls_2` (open_clip's LayerScale, an `nn.Identity` unless `ls_init_value` is set), the last
    module of each branch, so the adapter sees exactly what is added to the residual.
  Initialisation (`model.adapter_init`): `reference` draws both layers' weights from N(0, 0.02)
  with zero biases, as the reference's ViT `_init_weights` (trunc-normal at ±2, i.e. the normal
  at this std) and BERT's `initializer_range` do; the first forward is then close to, not equal
  to, the frozen model's. `zero` sets `W_up` and its bias to zero (W_down as `reference`), so the
  first forward is exactly the frozen model's.

The adapters live beside the open_clip model (`DualPathCLIP.adapters`), not inside it, so the
open_clip export keeps open_clip's layout; `export_open_clip` writes them to `adapters.pt` beside
it and `load_lilt` puts them back on an open_clip model. Their keys name the block and the place
(`..._resblocks_0_attn_in`, `..._mlp_out`): an `adapters.pt` from the earlier placement (after
`ln_1`/`ln_2`, keys `..._ln_1`) fails to load instead of loading into the wrong place.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

TUNINGS = ("none", "lit", "lilt", "elip")
ADAPTER_INITS = ("reference", "zero")
REDUCTION = 4
INIT_STD = 0.02  # the reference's ViT and BERT weight init (timm trunc_normal_, initializer_range)


class Adapter(nn.Module):
    """[..., width] → [..., width]: x + W_up·GELU(W_down·x), LilT's conventional adapter;
    `init` as the module docstring says (`zero`: the identity at initialisation)."""

    def __init__(self, width: int, reduction: int = REDUCTION, init: str = "reference"):
        super().__init__()
        if init not in ADAPTER_INITS:
            raise ValueError(f"model.adapter_init: {init!r} is not one of {', '.join(ADAPTER_INITS)}")
        self.down = nn.Linear(width, width // reduction)
        self.up = nn.Linear(width // reduction, width)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=INIT_STD)
            nn.init.zeros_(layer.bias)
        if init == "zero":
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


def _adapt_input(adapter: nn.Module, module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the submodule reads the adapted input (LilT's image blocks: on `ln_1` /
    `ln_2`, so only the branch reads it; the block's residual still adds its raw input)."""
    return (adapter(args[0]), *args[1:])


def _adapt_output(adapter: nn.Module, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the submodule's output is adapted (on `ls_1` / `ls_2`: the branch output,
    before the block adds it to the residual)."""
    return adapter(output)


def hook_adapters(clip: nn.Module, sites, make, tuning: str) -> nn.ModuleDict:
    """`make(width)` hooked on every open_clip `ResidualAttentionBlock` of `clip` where
    `sites(block path)` says: (submodule name, on its input?, key suffix) per adapter. Hooks, so the
    block's code is untouched and the open_clip export keeps its layout. Keyed `<block path>_<key>`
    with `_` for dots."""
    adapters = nn.ModuleDict()
    for name, block in clip.named_modules():
        if not isinstance(block, ResidualAttentionBlock):
            continue
        for site, on_input, key in sites(name):
            adapter = make(block.ln_1.normalized_shape[0]).to(block.ln_1.weight.device)
            module = getattr(block, site)
            if on_input:
                module.register_forward_pre_hook(functools.partial(_adapt_input, adapter))
            else:
                module.register_forward_hook(functools.partial(_adapt_output, adapter))
            adapters[f"{name}.{key}".replace(".", "_")] = adapter
    if not adapters:
        raise ValueError(f"model.tuning={tuning}: {type(clip).__name__} has no open_clip ResidualAttentionBlock")
    return adapters


def _lilt_sites(block: str) -> tuple:
    """LilT's places: the image tower (what sits under `clip.visual`) adapts each branch's input
    before its LayerNorm, the text tower each branch's output before the residual add."""
    if block.startswith("visual."):
        return (("ln_1", True, "attn_in"), ("ln_2", True, "mlp_in"))
    return (("ls_1", False, "attn_out"), ("ls_2", False, "mlp_out"))


def add_adapters(clip: nn.Module, init: str = "reference") -> nn.ModuleDict:
    """LilT's two adapters on every block of `clip`, placed per tower as the module docstring says.
    Returns the adapters, for the caller to hold as a submodule, keyed `<block path>_<attn|mlp>_
    <in|out>`."""
    return hook_adapters(clip, _lilt_sites, functools.partial(Adapter, init=init), "lilt")


def image_projection(visual: nn.Module) -> nn.Parameter | nn.Module | None:
    """The image tower's last linear map into the joint space, which LiT keeps trainable:
    `proj` (ViT; a Parameter, or a Linear in some configs), `head` (timm towers) or the attention
    pool's output projection (ModifiedResNet); None for a tower without one (a ViT built with
    `proj_type='none'`), which LiT then locks whole."""
    for path in ("proj", "head", "attnpool.c_proj"):
        module = visual
        for part in path.split("."):
            module = getattr(module, part, None)
        if module is not None:
            return module
    return None


def _eval_only(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def apply_tuning(model: nn.Module, tuning: str, adapter_init: str = "reference") -> None:
    """Set `requires_grad` on a `DualPathCLIP` for `tuning` (see the module docstring); `lilt`
    also registers `model.adapters` (initialised as `adapter_init`), on the device of the model's
    weights."""
    if tuning not in TUNINGS:
        raise ValueError(f"model.tuning: {tuning!r} is not one of {', '.join(TUNINGS)}")
    clip = model.clip
    if tuning == "lit":
        clip.lock_image_tower()
        projection = image_projection(clip.visual)
        if projection is not None:
            projection.requires_grad_(True)
        # `train()` on the model reaches the tower through its parent: make it a no-op there.
        # (The projection has no train-mode behaviour, so eval mode costs it nothing.)
        clip.visual.train = functools.partial(_eval_only, clip.visual)
        clip.visual.eval()
    elif tuning == "lilt":
        clip.requires_grad_(False)
        for m in clip.modules():
            if isinstance(m, nn.LayerNorm):
                m.requires_grad_(True)
        for x in (getattr(clip.visual, "proj", None), getattr(clip, "text_projection", None), clip.logit_scale):
            if x is not None:  # a Parameter, or an nn.Linear in some open_clip configs
                x.requires_grad_(True)
        model.adapters = add_adapters(clip, adapter_init)
    elif tuning == "elip":
        apply_elip(model)


def trainable_summary(model: nn.Module) -> dict:
    """Trainable and total parameter counts (adapters included) and the fraction, with a line."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fraction = trainable / total
    return {"trainable_params": trainable, "total_params": total, "trainable_fraction": fraction,
            "line": f"trainable {100 * fraction:.1f} % ({trainable:,} of {total:,} parameters)"}


def load_lilt(name: str, export: str, adapters: str | None = None) -> nn.Module:
    """An open_clip model from a LilT run's `open_clip_model.pt` with its `adapters.pt` (default:
    the file beside the export) hooked in; its `encode_image`/`encode_text` are the trained model's.
    The adapters are held as `model.lilt_adapters`."""
    return load_adapted(name, export, "lilt", adapters)


# --- ELIP (heliossun/ELIP, models/elip_retrieval.py) ----------------------------------------------

ELIP_STD = 0.001  # the reference's init_adptr: weights N(0, 0.001²), biases 0
ELIP_SITES = (("ls_1", False, "ls_1"), ("ls_2", False, "ls_2"))  # the branch outputs, before the add


class BranchAdapter(nn.Module):
    """[..., width] → [..., width]: h + W_up·ReLU(W_down·h), hidden = width // 2, both weights
    N(0, std²) and biases 0 as ELIP initialises them: near the identity (|A(h)| ≤ ‖W_up‖‖W_down‖·|h|,
    about 3·width·std²·|h|), not at it."""

    def __init__(self, width: int, std: float = ELIP_STD):
        super().__init__()
        self.down = nn.Linear(width, width // 2)
        self.up = nn.Linear(width // 2, width)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.relu(self.down(h)))


def add_elip_adapters(clip: nn.Module) -> nn.ModuleDict:
    """ELIP's adapters: `x + (h + A(h))` for h = attn(ln_1(x)) and then for h = mlp(ln_2(x)), in
    every block of both towers. The hooks sit on `ls_1` / `ls_2` (identities unless the config sets
    a layer scale, then A sees the scaled branch), the last op before the residual add."""
    return hook_adapters(clip, lambda block: ELIP_SITES, BranchAdapter, "elip")


def apply_elip(model: nn.Module) -> None:
    """`model.tuning=elip`: every loaded weight frozen (LayerNorms, projections and the logit scale
    included, as the reference freezes every name of the CLIP state dict); only the adapters
    (`model.adapters`) train."""
    model.clip.requires_grad_(False)
    model.adapters = add_elip_adapters(model.clip)


def adapters_for(clip: nn.Module, tuning: str) -> nn.ModuleDict:
    """Fresh adapters of a `tuning` that has them (lilt, elip), hooked into an open_clip model."""
    if tuning == "lilt":
        return add_adapters(clip)
    if tuning == "elip":
        return add_elip_adapters(clip)
    raise ValueError(f"model.tuning={tuning} has no adapters")


def load_adapted(name: str, export: str, tuning: str, adapters: str | None = None) -> nn.Module:
    """`load_lilt` for any tuning with adapters (lilt, elip): the open_clip export with its
    `adapters.pt` (default: beside the export) hooked in, held as `model.lilt_adapters`."""
    from train.model import create_clip

    clip = create_clip(name, export)
    clip.lilt_adapters = adapters_for(clip, tuning)
    path = adapters or os.path.join(os.path.dirname(export), "adapters.pt")
    clip.lilt_adapters.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return clip
