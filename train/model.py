"""The dual-path model: open_clip towers, one shared text tower for raw text and synthetic caption.

Towers come from any open_clip model config (`ViT-B-32`, `ViT-B-16`, …) or ours in
`train/model_configs/` (tiny ones for CPU runs), randomly initialized or loaded from an open_clip
checkpoint file. Nothing is downloaded: the open_clip configs and BPE vocabulary ship in its wheel.
"""
from __future__ import annotations

import contextlib
import os

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

MODEL_CONFIGS = os.path.join(os.path.dirname(__file__), "model_configs")
open_clip.add_model_config(MODEL_CONFIGS)
EOT_TOKEN = 49407  # CLIP BPE end of text


def create_clip(name: str, pretrained: str | None = None) -> nn.Module:
    """An open_clip CLIP model; `pretrained` must be a local checkpoint file (never a hub tag)."""
    if name not in open_clip.list_models():
        raise ValueError(f"model {name!r} is not an open_clip config; try one of "
                         f"{', '.join(m for m in open_clip.list_models() if m.startswith(('ViT-B', 'lip-')))}")
    if pretrained and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"model.pretrained {pretrained}: no such file (weights are never downloaded)")
    return open_clip.create_model(name, pretrained=pretrained, pretrained_text=False)


def fit_context(tokens: torch.Tensor, context_length: int, eot: int) -> torch.Tensor:
    """Crop [B, 77] tokens to a model with a shorter context (our CPU configs), ending a cut
    sequence with EOT as open_clip's tokenizer does when it truncates."""
    if tokens.shape[1] <= context_length:
        return tokens
    cut = tokens[:, :context_length].clone()
    truncated = tokens[:, context_length:].ne(0).any(dim=1)
    cut[truncated, -1] = eot
    return cut


def text_extent(tokens: torch.Tensor) -> int:
    """Positions up to the batch's last non-padding token (padding is 0, after each row's EOT)."""
    used = tokens.ne(0).any(dim=0)
    return int((torch.arange(1, len(used) + 1, device=used.device) * used).max()) or tokens.shape[1]


def encode_text_prefix(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` (open-clip-torch 3.x, model.py) over the first L positions only:
    the positional embedding and causal mask cut to L. With the causal mask no position sees a
    later one, so the EOT's features are those of the full-context call (to float rounding), and
    the text tower costs L/77 of it: Flickr batches of 64 end by position 27."""
    length = tokens.shape[1]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:length].to(cast)
    x = clip.transformer(x, attn_mask=None if clip.attn_mask is None else clip.attn_mask[:length, :length])
    x = text_global_pool(clip.ln_final(x), tokens, clip.text_pool_type,
                         eos_token_id=getattr(clip, "text_eos_id", None))
    if clip.text_projection is None:
        return x
    return clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection


def trims_text(clip: nn.Module) -> bool:
    """Whether `encode_text_prefix` applies: open_clip's `CLIP` with a causal mask and pooling by
    argmax/EOT (CustomTextCLIP, CoCa and the like keep their own call)."""
    return (isinstance(clip, open_clip.CLIP) and clip.attn_mask is not None
            and getattr(clip, "text_pool_type", None) in ("argmax", "eos"))


class DualPathCLIP(nn.Module):
    """forward(images [B,3,H,W], raw [B,77], syn [B,77] | None) → normalized image, raw and
    synthetic features [B, D] and the exponentiated logit scale. Raw and synthetic texts go
    through the text tower in one [2B, L] call (L: the longest of them, `trim_text`)."""

    def __init__(self, clip: nn.Module, trim_text: bool = True):
        super().__init__()
        self.clip = clip
        self.context_length = clip.context_length
        # Run the text tower up to the batch's longest text only (`model.trim_text`)
        self.trim_text = trim_text and trims_text(clip)
        # A variant that reads the forward's raw-text features while the image is encoded sets this
        # to `guide(raw_features) → context manager` (token pruning, train/variants/pruning.py):
        # the variant hooks into the model, the model knows no variant.
        self.image_guide = None

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's call, for [B, 77] tokens whatever the model's context length; with `trim_text`
        over the positions up to the batch's longest text (`encode_text_prefix`)."""
        tokens = fit_context(tokens, self.context_length, EOT_TOKEN)
        if not self.trim_text:
            return self.clip.encode_text(tokens)
        return encode_text_prefix(self.clip, tokens[:, :text_extent(tokens)])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def forward(self, images, raw_tokens, syn_tokens=None):
        # Texts first: an image guide (token pruning) lets the raw text steer the image encode.
        if syn_tokens is None:
            raw, syn = F.normalize(self.encode_text(raw_tokens), dim=-1), None
        else:
            raw, syn = F.normalize(self.encode_text(torch.cat([raw_tokens, syn_tokens])), dim=-1).chunk(2)
        with self.image_guide(raw) if self.image_guide is not None else contextlib.nullcontext():
            image = F.normalize(self.clip.encode_image(images), dim=-1)
        return image, raw, syn, self.clip.logit_scale.exp()


def build_model(name: str, pretrained: str | None = None, grad_checkpointing: bool = False,
                trim_text: bool = True) -> DualPathCLIP:
    clip = create_clip(name, pretrained)
    if grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return DualPathCLIP(clip, trim_text)


def export_open_clip(model: DualPathCLIP, path: str) -> None:
    """Weights in open_clip's state-dict layout: `open_clip.create_model(name, pretrained=path)`.
    LilT's adapters (`model.adapters`) are not in that layout: they go to `adapters.pt` beside it
    (`train.variants.tuning.load_lilt` hooks them back in)."""
    torch.save(model.clip.state_dict(), path)
    if hasattr(model, "adapters"):
        torch.save(model.adapters.state_dict(), os.path.join(os.path.dirname(path), "adapters.pt"))
