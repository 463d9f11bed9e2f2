"""The augmentation spec both backends implement (DALI in pipelines/dali.py, torchvision in
pipelines/torch_loader.py), so their outputs differ only by resampling details."""
from __future__ import annotations

from dataclasses import dataclass

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class AugmentSpec:
    """train: random-resized crop (area, aspect), resize to `size`, optional flip, normalize.
    eval: shorter side to `size` (bicubic), centre crop `size`, normalize."""

    size: int = 224
    train: bool = True
    area: tuple[float, float] = (0.7, 1.0)  # ALIP's crop scale
    aspect: tuple[float, float] = (0.8, 1.25)
    flip: bool = True  # off when captions say "left"/"right"
