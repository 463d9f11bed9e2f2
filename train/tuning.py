"""Which parameters train (`model.tuning`): all (`none`), LiT or LilT.

- `lit` (Zhai et al. 2022) locks the image tower as open_clip's `lock_image_tower` does (every
  visual parameter frozen) and keeps it in eval mode, so patch dropout and any dropout stay off.
- `lilt` (Khan & Fu, ICLR 2023) freezes both towers, unlocks every LayerNorm, the projections and
  the logit scale, and adds a bottleneck adapter `x + W_up·GELU(W_down·x)` (hidden = width // 4) on
  the input of each residual block's attention and MLP branch, in both towers. `W_up` starts at
  zero, so the first forward equals the frozen model's.

The adapters live beside the open_clip model (`DualPathCLIP.adapters`), not inside it, so the
open_clip export keeps open_clip's layout; `export_open_clip` writes them to `adapters.pt` beside
it and `load_lilt` puts them back on an open_clip model.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

TUNINGS = ("none", "lit", "lilt", "elip")
REDUCTION = 4


class Adapter(nn.Module):
    """[..., width] → [..., width]: x + W_up·GELU(W_down·x); the identity at initialisation."""

    def __init__(self, width: int, reduction: int = REDUCTION):
        super().__init__()
        self.down = nn.Linear(width, width // reduction)
        self.up = nn.Linear(width // reduction, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


def _adapt_output(adapter: Adapter, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a block's `ln_1` / `ln_2`: the branch then reads the adapted norm output."""
    return adapter(output)


def add_adapters(clip: nn.Module) -> nn.ModuleDict:
    """One adapter after `ln_1` and one after `ln_2` of every `ResidualAttentionBlock` of `clip`
    (hooks on those norms; the block's code is untouched). Returns the adapters, for the caller
    to hold as a submodule, keyed by the norm's path with `_` for dots."""
    adapters = nn.ModuleDict()
    for name, block in clip.named_modules():
        if not isinstance(block, ResidualAttentionBlock):
            continue
        for norm_name in ("ln_1", "ln_2"):
            norm = getattr(block, norm_name)
            adapter = Adapter(norm.normalized_shape[0]).to(norm.weight.device)
            norm.register_forward_hook(functools.partial(_adapt_output, adapter))
            adapters[f"{name}.{norm_name}".replace(".", "_")] = adapter
    if not adapters:
        raise ValueError(f"model.tuning=lilt: {type(clip).__name__} has no open_clip ResidualAttentionBlock")
    return adapters


def _eval_only(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def apply_tuning(model: nn.Module, tuning: str) -> None:
    """Set `requires_grad` on a `DualPathCLIP` for `tuning` (see the module docstring); `lilt`
    also registers `model.adapters`, on the device of the model's weights."""
    if tuning not in TUNINGS:
        raise ValueError(f"model.tuning: {tuning!r} is not one of {', '.join(TUNINGS)}")
    clip = model.clip
    if tuning == "lit":
        clip.lock_image_tower()
        # `train()` on the model reaches the tower through its parent: make it a no-op there.
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
        model.adapters = add_adapters(clip)
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
    from train.model import create_clip

    clip = create_clip(name, export)
    clip.lilt_adapters = add_adapters(clip)
    path = adapters or os.path.join(os.path.dirname(export), "adapters.pt")
    clip.lilt_adapters.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return clip


# --- ELIP (heliossun/ELIP, models/elip_retrieval.py) ----------------------------------------------

ELIP_STD = 0.001  # the reference's init_adptr: weights N(0, 0.001²), biases 0
ELIP_SITES = ("ls_1", "ls_2")  # open_clip's branch outputs: attention's and the MLP's, before the add


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


def _adapt_input(adapter: nn.Module, module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the submodule reads the adapted input."""
    return (adapter(args[0]), *args[1:])


def hook_adapters(clip: nn.Module, sites: tuple[str, ...], make, tuning: str, on_input: bool = False) -> nn.ModuleDict:
    """`make(width)` on the output (`on_input`: the input) of each submodule named in `sites` of
    every open_clip `ResidualAttentionBlock` of `clip` (hooks: the block's code is untouched, so the
    open_clip export keeps its layout). Keyed by the submodule's path with `_` for dots."""
    adapters = nn.ModuleDict()
    for name, block in clip.named_modules():
        if not isinstance(block, ResidualAttentionBlock):
            continue
        for site in sites:
            adapter = make(block.ln_1.normalized_shape[0]).to(block.ln_1.weight.device)
            module = getattr(block, site)
            if on_input:
                module.register_forward_pre_hook(functools.partial(_adapt_input, adapter))
            else:
                module.register_forward_hook(functools.partial(_adapt_output, adapter))
            adapters[f"{name}.{site}".replace(".", "_")] = adapter
    if not adapters:
        raise ValueError(f"model.tuning={tuning}: {type(clip).__name__} has no open_clip ResidualAttentionBlock")
    return adapters


def add_elip_adapters(clip: nn.Module) -> nn.ModuleDict:
    """ELIP's adapters: `x + (h + A(h))` for h = attn(ln_1(x)) and then for h = mlp(ln_2(x)), in
    every block of both towers. The hooks sit on `ls_1` / `ls_2` (identities unless the config sets
    a layer scale, then A sees the scaled branch), the last op before the residual add."""
    return hook_adapters(clip, ELIP_SITES, BranchAdapter, "elip")


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
