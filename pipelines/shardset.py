"""A format folder opened for loading: its shards, random access by global sample id, and the
bad shards and samples found while opening it.

Problems are found here, before an epoch is planned, so that a bad shard can never make one rank
yield fewer batches than another (a DDP hang): with `on_error="raise"` the first problem is an
error naming the shard; with `on_error="skip"` the shard or sample is left out and counted in
`skipped`.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from collections import Counter

import numpy as np

from pipelines.formats.arrow import ArrowShard
from pipelines.formats.recordio import RecShard
from pipelines.formats.wds import WdsShard
from pipelines.schema import CONTEXT_LENGTH, IMAGE_EXTS, Sample
from pipelines.text import choose_caption, sample_tokens

# read_batch's text row: raw tokens, synthetic-caption tokens, has_syn.
TEXT_WIDTH = 2 * CONTEXT_LENGTH + 1

ERROR_POLICIES = ("raise", "skip")


class ShardError(ValueError):
    pass


def _data_files(folder: str, fmt: str) -> list[str]:
    suffix = {"wds": ".tar", "arrow": ".arrow", "rec": ".rec"}[fmt]
    manifest = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            names = [e["name"] for e in json.load(f)["files"] if e["name"].endswith(suffix)]
        return [os.path.join(folder, n) for n in names]
    # No manifest: img2dataset output or open_clip-style shards.
    return sorted(glob.glob(os.path.join(folder, f"*{suffix}")))


class ShardSet:
    def __init__(self, folder: str, fmt: str, on_error: str = "raise"):
        if on_error not in ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ERROR_POLICIES}, not {on_error!r}")
        if not os.path.isdir(folder):
            raise ShardError(f"{folder}: no such shard folder; pass the make-shards --out folder "
                             f"or its {fmt}/ subfolder")
        if not _data_files(folder, fmt) and os.path.isdir(os.path.join(folder, fmt)):
            folder = os.path.join(folder, fmt)  # the make-shards --out folder itself
        self.folder, self.format, self.on_error = folder, fmt, on_error
        self.skipped: Counter = Counter()
        self.problems: list[str] = []
        self.shards, valid = [], []
        paths = _data_files(folder, fmt)
        if not paths:
            others = [f for f in ("wds", "arrow", "rec") if f != fmt and os.path.isdir(os.path.join(folder, f))]
            hint = f" (it holds {', '.join(others)}: set the format to match)" if others else ""
            raise ShardError(f"{folder}: no {fmt} shards found{hint}")
        for path in paths:
            try:
                shard = self._open(path)
                ok = self._valid_samples(shard)
            except (OSError, ValueError, tarfile.TarError) as e:  # TarError: a cut tar without .idx
                self._problem("bad_shard", f"{path}: {e}")
                continue
            self.shards.append(shard)
            valid.append(ok)
        self.valid = valid
        self._keys: list[list[str]] | None = None  # per shard, by valid position (ShardSet.keys)
        counts = np.array([len(v) for v in valid], dtype=np.int64)
        self.ends = np.cumsum(counts)
        if not self.ends.size or self.ends[-1] == 0:
            raise ShardError(f"{folder}: no readable samples ({dict(self.skipped)})")

    def _problem(self, reason: str, message: str) -> None:
        if self.on_error == "raise":
            raise ShardError(message + "  (set on_error='skip' to skip and count instead)")
        self.skipped[reason] += 1
        self.problems.append(message)

    def _open(self, path: str):
        if not os.path.exists(path):
            raise ShardError(f"{path}: listed in manifest.json but missing")
        if self.format == "wds":
            idx = path[: -len(".tar")] + ".idx"
            has_manifest = os.path.exists(os.path.join(self.folder, "manifest.json"))
            if not os.path.exists(idx) and has_manifest:
                raise ValueError(f"index {idx} missing; rerun make-shards --resume or DALI's wds2idx")
            return WdsShard(path, idx if os.path.exists(idx) else None)
        if self.format == "arrow":
            return ArrowShard(path)
        return RecShard(path)

    def _valid_samples(self, shard) -> np.ndarray:
        if not isinstance(shard, WdsShard):
            return np.arange(len(shard))
        ok = []
        for i, parts in enumerate(shard.index):
            exts = {p[0] for p in parts}
            name = parts[0][3]
            if not exts & {*IMAGE_EXTS, "jpeg"}:
                self._problem("missing_image", f"{shard.path}: sample {name.split('.')[0]} has no image member")
            elif "txt" not in exts:
                self._problem("missing_text", f"{shard.path}: sample {name.split('.')[0]} has no txt member")
            elif any(off + size > shard.size for _, off, size, _ in parts):
                self._problem("truncated", f"{shard.path}: sample {name.split('.')[0]} lies past the end "
                                           "of the file (truncated tar)")
            else:
                ok.append(i)
        return np.array(ok, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1])

    def locate(self, gid: int) -> tuple[int, int]:
        """(shard number, row within the shard) of global sample id `gid`."""
        s = int(np.searchsorted(self.ends, gid, side="right"))
        local = gid - (int(self.ends[s - 1]) if s else 0)
        return s, int(self.valid[s][local])

    def get(self, gid: int) -> Sample:
        s, i = self.locate(gid)
        return self.shards[s].get(i)

    def key(self, gid: int) -> str:
        s, i = self.locate(gid)
        return self.shards[s].key(i)

    def __getstate__(self):  # workers read samples, they never need the key lists
        return {**self.__dict__, "_keys": None}

    def keys(self, ids) -> list[str]:
        """Keys of a batch of sample ids, from per-shard key lists built once."""
        if self._keys is None:
            self._keys = [[shard.key(int(i)) for i in valid] for shard, valid in zip(self.shards, self.valid)]
        shard = np.searchsorted(self.ends, ids, side="right")
        local = np.asarray(ids) - np.concatenate([[0], self.ends])[shard]
        return [self._keys[s][i] for s, i in zip(shard.tolist(), local.tolist())]

    def where(self, gid: int) -> str:
        """How an error names a sample: its shard file and key."""
        s, i = self.locate(gid)
        return f"{self.shards[s].path}: sample {self.shards[s].key(i)}"

    def read_batch(self, ids, seed: int, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The loader's hot path: encoded images (uint8 views, no decode) and one int32
        [B, 155] text array (raw tokens, tokens of this epoch's synthetic caption, has_syn), with
        as few Python objects per sample as the format allows. Tokenizes only what the shards
        do not store."""
        images, text = [], np.empty((len(ids), TEXT_WIDTH), np.int32)
        slow = []
        for row, gid in enumerate(ids):
            s, i = self.locate(int(gid))
            image, tokens, n_syn = self.shards[s].read(i)
            images.append(image)
            # tokens rows: raw, then each synthetic caption (the raw text again when there is none)
            row_syn = 1 + choose_caption(n_syn, seed, epoch, int(gid)) if n_syn else 1
            if tokens is None or row_syn >= len(tokens):  # not stored (older or foreign shards)
                slow.append(row)
                continue
            text[row, :CONTEXT_LENGTH] = tokens[0]
            text[row, CONTEXT_LENGTH:-1] = tokens[row_syn]
            text[row, -1] = n_syn > 0
        if slow:  # shards without stored tokens: tokenize here, in the loader's worker
            samples = [self.get(int(ids[r])) for r in slow]
            raw, syn, has_syn = sample_tokens(samples, [ids[r] for r in slow], seed, epoch)
            text[slow, :CONTEXT_LENGTH], text[slow, CONTEXT_LENGTH:-1], text[slow, -1] = raw, syn, has_syn
        return images, text
