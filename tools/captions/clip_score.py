"""CLIP image-text scores of a sample's raw text and synthetic captions: the signal a later run
filters or weights captions by (attach-captions --clip-score).

The checkpoint is the trainer's export (`open_clip_model.pt`), a lip-train checkpoint or any
open_clip state-dict file, loaded from a local path by `train.eval.evaluate.load_model` (the loader
lip-eval uses, so a score here means what retrieval there measures). Images are decoded and
transformed as the eval loader does (shorter side bicubic, centre crop, CLIP mean/std).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from pipelines.augment.images import decode_rgb
from pipelines.schema import Sample
from pipelines.text import tokenize

BATCH = 64


class ClipScorer:
    def __init__(self, checkpoint: str, model_name: str, device: str = "cpu"):
        from pipelines.backends.torch_loader import torchvision_transform
        from pipelines.augment.transforms import AugmentSpec
        from train.eval.evaluate import EvalConfigError, load_model
        from train.model import EOT_TOKEN, fit_context

        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        try:
            self.model = load_model(model_name, checkpoint, self.device)
        except EvalConfigError as e:
            raise ValueError(f"--clip-score: {e}") from e
        self.checkpoint, self.name = checkpoint, model_name
        size = self.model.visual.image_size
        self.transform = torchvision_transform(AugmentSpec(size=size[0] if isinstance(size, (tuple, list)) else size,
                                                           train=False))
        self._fit = lambda t: fit_context(t, self.model.context_length, EOT_TOKEN)

    def describe(self) -> dict:
        return {"model": self.name, "checkpoint": os.path.abspath(self.checkpoint),
                "score": "cosine similarity of normalized image and text features"}

    @torch.no_grad()
    def scores(self, samples: list[Sample]) -> list[tuple[float, list[float]]]:
        """(raw text score, [score per synthetic caption]) per sample, cosine in [-1, 1]."""
        out = []
        for b in range(0, len(samples), BATCH):
            chunk = samples[b:b + BATCH]
            images = torch.stack([self.transform(decode_rgb(s.image)) for s in chunk]).to(self.device)
            texts = [t for s in chunk for t in (s.txt, *s.syn)]
            tokens = torch.from_numpy(tokenize(texts).astype(np.int64)).to(self.device)
            img = torch.nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)
            txt = torch.nn.functional.normalize(self.model.encode_text(self._fit(tokens)).float(), dim=-1)
            start = 0
            for i, s in enumerate(chunk):
                sims = (txt[start:start + 1 + len(s.syn)] @ img[i]).tolist()
                start += 1 + len(s.syn)
                out.append((round(sims[0], 4), [round(v, 4) for v in sims[1:]]))
        return out

    def annotate(self, samples: list[Sample]) -> None:
        """Store `meta.clip_score = {"txt": float, "syn": [float, ...], "model": name}`."""
        for s, (raw, syn) in zip(samples, self.scores(samples)):
            s.meta["clip_score"] = {"txt": raw, "syn": syn, "model": self.name}
