"""Hand-made samples whose every caption has a token row, written as one shard of any format and
read back through the loader's ShardSet (tests/loading: forked readers, format interop, caption tokens)."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from pipelines.formats.registry import WRITERS
from pipelines.schema import CONTEXT_LENGTH, Sample

SUFFIX = {"wds": ".tar", "arrow": ".arrow", "rec": ".rec"}


def tokens_for(i: int, n_syn: int) -> np.ndarray:
    """[1 + max(1, n_syn), 77] ids that encode sample and row."""
    rows = 1 + max(1, n_syn)
    return (np.arange(rows * CONTEXT_LENGTH, dtype=np.int32).reshape(rows, CONTEXT_LENGTH) % 1000
            + 1000 * (i + 1))


def make_samples(n: int, image_bytes: int = 0) -> list[Sample]:
    """Sample i has i % 4 synthetic captions; `image_bytes` > 0: random bytes of about that size
    (big enough to cross a buffered reader's 8 KiB buffer) instead of a real JPEG."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if image_bytes:
            image = rng.integers(0, 256, image_bytes + 97 * i, dtype=np.uint8).tobytes()
        else:
            buf = io.BytesIO()
            Image.new("RGB", (8 + i, 6), (i * 20 % 256, 0, 0)).save(buf, "JPEG")
            image = buf.getvalue()
        syn = [f"syn {i}.{j}" for j in range(i % 4)]
        out.append(Sample(key=f"{i:09d}", image=image, txt=f"caption {i}", syn=syn, meta={"i": i},
                          tokens=tokens_for(i, len(syn))))
    return out


def write_shard(folder, fmt: str, samples: list[Sample], with_tokens: bool = True) -> str:
    kwargs = {"id_base": 500} if fmt == "rec" else {}
    with WRITERS[fmt](str(folder), 0, with_tokens=with_tokens, **kwargs) as w:
        for s in samples:
            w.write(s)
        w.close()
    return str(folder / f"000000{SUFFIX[fmt]}")


class OneShard:
    """Random access to the one shard of a folder, through the loader's ShardSet: `get(i)` (the
    whole sample, copied) and `read(i)` (the hot path: image view, tokens, synthetic captions)."""

    def __init__(self, fmt: str, path: str):
        from pipelines.shardset import ShardSet

        self.set = ShardSet(os.path.dirname(path), fmt, cache_dir=os.path.join(os.path.dirname(path), ".cache"))

    def __len__(self) -> int:
        return len(self.set)

    def get(self, i: int) -> Sample:
        return self.set.get(i)

    def key(self, i: int) -> str:
        return self.set.key(i)

    def read(self, i: int):
        return self.set._read(np.array([i]), 0, whole=False)[0]


def open_shard(fmt: str, path: str) -> OneShard:
    return OneShard(fmt, path)


def as_tuple(s: Sample) -> tuple:
    return s.key, s.image, s.txt, tuple(s.syn), s.tokens.tobytes(), s.tokens.shape
