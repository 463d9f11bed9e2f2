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
from pipelines.schema import IMAGE_EXTS, Sample

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
            raise ShardError(f"{folder}: no such shard folder; pass the make-shards --out/<format> folder")
        self.folder, self.format, self.on_error = folder, fmt, on_error
        self.skipped: Counter = Counter()
        self.problems: list[str] = []
        self.shards, valid = [], []
        paths = _data_files(folder, fmt)
        if not paths:
            raise ShardError(f"{folder}: no {fmt} shards found")
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

    def get(self, gid: int) -> Sample:
        s = int(np.searchsorted(self.ends, gid, side="right"))
        local = gid - (int(self.ends[s - 1]) if s else 0)
        return self.shards[s].get(int(self.valid[s][local]))
