"""The sample contract shared by the converter (writers) and the loaders (readers).

See docs/design.md §2 (the shard schema). A `Sample` is what every shard format stores; each format module in
`pipelines/formats/` writes and reads exactly these fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1
CONTEXT_LENGTH = 77
# ALIP's RecordIO label: raw tokens followed by synthetic-caption tokens.
TOKENS_PER_SAMPLE = 2 * CONTEXT_LENGTH

IMAGE_EXTS = ("jpg", "png", "webp")


@dataclass
class Sample:
    """One image-text pair as stored in a shard.

    key:    unique, filesystem- and webdataset-safe (no dots, no slashes).
    image:  encoded image bytes; `image_ext` names their format (jpg unless passed through).
    txt:    raw/alt text, ftfy-fixed and whitespace-normalized.
    syn:    synthetic captions, possibly empty.
    meta:   JSON-serializable source metadata (source id, original width/height, url, license).
    tokens: optional int32 [R, 77] CLIP BPE ids: row 0 the raw text, row 1 + j synthetic caption
            j, R = 1 + max(1, len(syn)) (row 1 is the raw text again when there is no synthetic
            caption, so R = 2 for at most one caption). Shards converted before every caption was
            tokenized hold R = 2 with several captions (row 1 = the first).
    """

    key: str
    image: bytes
    txt: str
    syn: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    tokens: np.ndarray | None = None
    image_ext: str = "jpg"

    def __post_init__(self):
        if not self.key or any(c in self.key for c in "./\\ \n"):
            raise ValueError(f"sample key {self.key!r} must be non-empty and free of '.', '/', spaces")
        if self.image_ext not in IMAGE_EXTS:
            raise ValueError(f"sample {self.key}: image_ext {self.image_ext!r} not in {IMAGE_EXTS}")
        if self.tokens is not None:
            self.tokens = np.asarray(self.tokens, dtype=np.int32).reshape(-1, CONTEXT_LENGTH)
            if len(self.tokens) not in {2, max(2, 1 + len(self.syn))}:
                raise ValueError(f"sample {self.key}: {len(self.tokens)} token rows for "
                                 f"{len(self.syn)} synthetic captions; expected 2 or "
                                 f"{1 + max(1, len(self.syn))}")


@dataclass
class Batch:
    """What every loader yields (docs/design.md §3, the Batch contract), whatever its backend and format.

    images:     float32 [B, 3, H, W], normalized with the CLIP mean/std, on the loader's device.
    raw_tokens: int64 [B, 77], CLIP BPE of the raw text.
    syn_tokens: int64 [B, 77], of one synthetic caption chosen per epoch, or of the raw text
                when the sample has none.
    has_syn:    bool [B], False where syn_tokens fell back to the raw text.
    keys:       the samples' keys, in batch order.
    ids:        int64 [B], the samples' ids in the shard set (0 .. N-1, on the CPU): what
                per-sample records (e.g. gate weights) index by. Unique over a mixture of
                sources (each source's ids follow the previous source's).
    sources:    int64 [B], each sample's source: its position in the loader's list of sources
                (all 0 for one folder), on the CPU.
    """

    images: "torch.Tensor"  # noqa: F821 - torch stays out of the converter's imports
    raw_tokens: "torch.Tensor"  # noqa: F821
    syn_tokens: "torch.Tensor"  # noqa: F821
    has_syn: "torch.Tensor"  # noqa: F821
    keys: list[str]
    ids: "torch.Tensor | None" = None  # noqa: F821
    sources: "torch.Tensor | None" = None  # noqa: F821 - set by the loader, whatever the backend

    def __len__(self) -> int:
        return len(self.keys)
