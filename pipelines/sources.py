"""A loader's data as a list of sources, and several sources opened as one shard set.

`LoaderConfig.shards` is one folder or url (one source, as before) or a list of sources, each a
folder/url or a mapping `{shards, weight (default 1), format (default: what the folder says,
`source_format`), name (default: the folder's dataset name)}`. A weight is a repeat factor
(pipelines/plan/mixing.py: round(weight × N) samples of the source in every epoch). Sources may differ
in format and storage.

`Mixture` opens each source as a `ShardSet` and lays their samples end to end: source s's sample j
has the global id offsets[s] + j, so ids stay unique over the mixture (per-sample records never
collide) and the epoch plan, the bad-sample record and the trainer see one shard set. Remote
sources share the node cache under the loader's one `cache_dir` and `cache_limit`.

`fingerprint` is what a resume compares (pipelines/loader.py): per source the shard layout that
decides the epoch's order (samples per shard) and the data's version (its shards' names, sizes and
digests, or sizes and mtimes where a folder has no digests), besides its samples and weight.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipelines.errors import ShardError, StorageError
from pipelines.formats.index import INDEX_NAME, FolderIndex
from pipelines.formats.registry import FORMATS
from pipelines.plan.mixing import check_weight
from pipelines.shardset import ShardSet
from pipelines.storage.remote import is_remote, join, read_json

_KEYS = ("shards", "weight", "format", "name")


@dataclass(frozen=True)
class Source:
    shards: str  # a format folder, the make-shards --out folder, or an s3:// url of either
    weight: float = 1.0  # repeat factor: round(weight × samples) of the source in every epoch
    format: str | None = None  # wds | arrow | rec; None: what the folder says (`source_format`)
    name: str = ""  # in logs and metrics; default: the folder's dataset name


def parse_sources(value, default_format: str = "wds") -> list[Source]:
    """`LoaderConfig.shards` / `data.train_shards` → sources. A single folder keeps
    `default_format` (the loader's `format`, as before mixing); list entries without a format get
    it from their folder when opened (`source_format`). ValueError naming the entry for anything
    malformed. No I/O."""
    if isinstance(value, str):
        if not value:
            raise ValueError("no shards given: a shard folder, an s3:// url or a list of sources")
        return [Source(value, 1.0, default_format, dataset_name(value))]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"shards must be a folder, an s3:// url or a non-empty list of sources, not {value!r}")
    out = []
    for i, entry in enumerate(value):
        where = f"source {i}"
        if isinstance(entry, str):
            entry = {"shards": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a folder or a mapping with keys {', '.join(_KEYS)}, not {entry!r}")
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; a source takes {', '.join(_KEYS)}")
        shards = entry.get("shards")
        if not isinstance(shards, str) or not shards:
            raise ValueError(f"{where}: 'shards' must name a folder or an s3:// url, not {shards!r}")
        where = f"source {i} ({shards})"
        weight = check_weight(entry.get("weight", 1.0), where)
        fmt = entry.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"{where}: format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        name = entry.get("name") or dataset_name(shards)
        if not isinstance(name, str):
            raise ValueError(f"{where}: name must be a string, not {name!r}")
        out.append(Source(shards, weight, fmt, name))
    names = Counter(s.name for s in out)
    seen: Counter = Counter()
    for i, s in enumerate(out):  # two folders named alike (two "train" sets): number them
        if names[s.name] > 1:
            seen[s.name] += 1
            out[i] = Source(s.shards, s.weight, s.format, f"{s.name}-{seen[s.name]}")
    return out


def dataset_name(url: str) -> str:
    """shards/coco/wds → coco; shards/coco → coco; s3://bucket/cc3m/rec → cc3m."""
    parts = [p for p in url.rstrip("/").split("/") if p]
    if len(parts) > 1 and parts[-1] in FORMATS:
        return parts[-2]
    return parts[-1] if parts else url


def source_format(url: str, fmt: str | None) -> str | None:
    """A source's format without reading its manifest where the folder says it: the folder's own
    name (shards/coco/wds), its only format subfolder (the make-shards --out folder), its folder
    index's header; else what manifest.json says (a make-shards --out url in object storage: one
    request or a few). A manifest lists every file, megabytes at 100 M samples: not read for a
    name. ValueError when `fmt` contradicts the folder's name, or a folder holds several formats
    and none is named. None: nothing says (the loader's `format` applies)."""
    named = url.rstrip("/").rsplit("/", 1)[-1]
    named = named if named in FORMATS else None
    if fmt is not None and named is not None and named != fmt:
        raise ValueError(f"{url} is a {named} folder (its name), but the source sets format {fmt!r}; drop the "
                         f"source's format or set it to {named!r}")
    if fmt is not None or named is not None:
        return fmt or named
    if not is_remote(url):
        held = [f for f in FORMATS if os.path.isdir(os.path.join(url, f))]
        if len(held) > 1:
            raise ValueError(f"{url} holds {', '.join(held)} shards: name the source's format")
        if held:
            return held[0]
        if os.path.exists(os.path.join(url, INDEX_NAME)):
            try:
                return FolderIndex(os.path.join(url, INDEX_NAME)).format
            except ValueError:
                pass  # a damaged index: the shard set reports it and indexes the folder again
    found = [(folder, m["format"]) for folder in [url] + [join(url, f) for f in FORMATS]
             if (m := _read_manifest(folder)) is not None and m.get("format") in FORMATS]
    if len({f for _, f in found}) > 1:
        raise ValueError(f"{url} holds {', '.join(f for _, f in found)} shards: name the source's format")
    return found[0][1] if found else None


def _read_manifest(folder: str) -> dict | None:
    try:
        if is_remote(folder):
            return read_json(join(folder, "manifest.json"))
        with open(os.path.join(folder, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError, StorageError):
        return None


def fingerprint(source: Source, shardset: ShardSet) -> dict:
    """What a resume compares for one source (see the module docstring). O(shards), vectorised:
    a 100,000-shard source costs milliseconds."""
    counts = np.diff(np.concatenate([[0], shardset.ends])).astype("<i8")
    table = shardset.index.shards[shardset.numbers]
    rows = np.zeros(len(table), [("count", "<u8"), ("bytes", "<u8"), ("sha256", "u1", 32),
                                 ("text_sha256", "u1", 32), ("mtime_ns", "<i8")])
    for name in ("count", "bytes", "sha256", "text_sha256"):
        rows[name] = table[name]
    # a shard's digest when the index has one, else its mtime (folders indexed by the loader)
    rows["mtime_ns"] = np.where(table["sha256"].any(axis=1), 0, table["mtime_ns"])
    names = shardset.index.names
    if len(shardset.numbers) != len(names):  # shards left out (on_error="skip"): only those in use
        names = [names[s] for s in shardset.numbers]
    version = hashlib.sha256("\n".join(names).encode())
    version.update(rows.tobytes())
    return {"name": source.name, "shards": source.shards, "format": shardset.format, "weight": source.weight,
            "samples": len(shardset), "layout": hashlib.sha256(counts.tobytes()).hexdigest()[:16],
            "version": version.hexdigest()[:16]}


def differences(saved: list[dict], now: list[dict]) -> list[str]:
    """What changed between two mixtures' fingerprints, one phrase each (empty: the same data)."""
    if [s["name"] for s in saved] != [s["name"] for s in now]:
        return [f"sources {[s['name'] for s in saved]} became {[s['name'] for s in now]}"]
    out = []
    for a, b in zip(saved, now):
        for key, what in (("weight", "weight"), ("samples", "samples"), ("layout", "shard layout (re-sharded)"),
                          ("version", "data (re-converted)"), ("format", "format")):
            if a.get(key) != b.get(key):
                detail = f": {a.get(key)} → {b.get(key)}" if key in ("weight", "samples", "format") else ""
                out.append(f"{a['name']}'s {what} changed{detail}")
    return out


class Mixture:
    """Several shard sets as one: `ShardSet`'s interface over global ids (sources end to end)."""

    def __init__(self, sources: list[Source], shardsets: list[ShardSet]):
        self.sources, self.sets = sources, shardsets
        sizes = [len(s) for s in shardsets]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [S + 1]
        self.first_shard = np.concatenate([[0], np.cumsum([len(s.ends) for s in shardsets])]).astype(np.int64)
        self.ends = np.concatenate([s.ends + o for s, o in zip(shardsets, self.offsets)])
        self.paths = [p for s in shardsets for p in s.paths]
        self.format = "+".join(dict.fromkeys(s.format for s in shardsets))
        self.folder = ", ".join(s.folder for s in shardsets)
        self.skipped = sum((s.skipped for s in shardsets), Counter())
        self.problems = [p for s in shardsets for p in s.problems]
        self.cache = None  # each remote source has its own (the node's, under one limit)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, ids) -> np.ndarray:
        """Source position of each global id: int64, ids' shape."""
        return np.searchsorted(self.offsets[1:], np.asarray(ids, np.int64), side="right").astype(np.int64)

    def _split(self, ids):
        """[(source, positions in ids, local ids)] for each source the ids touch, in source order."""
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sample ids must lie in [0, {len(self)}), got {ids.min()}..{ids.max()}")
        src = self.source_of(ids)
        return [(int(s), np.flatnonzero(src == s), ids[src == s] - self.offsets[s]) for s in np.unique(src)]

    def bounds(self) -> list[tuple[int, int]]:
        """[first id, end id) of each source: where a bad sample's substitute is looked for."""
        return [(int(a), int(b)) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    # --- ShardSet's interface ---

    def read_batch(self, ids, seed: int, epoch: int, position: int | None = None, views: bool = False):
        ids = np.asarray(ids, np.int64)
        images: list = [None] * len(ids)
        text = None
        for s, at, local in self._split(ids):
            part_images, part_text = self.sets[s].read_batch(local, seed, epoch, position, caption_ids=ids[at], views=views)
            if text is None:
                text = np.empty((len(ids), part_text.shape[1]), part_text.dtype)
            text[at] = part_text
            for k, image in zip(at, part_images):
                images[k] = image
        return images, text

    def samples(self, ids, position: int = 0) -> list:
        out: list = [None] * len(ids)
        for s, at, local in self._split(ids):
            for k, sample in zip(at, self.sets[s].samples(local, position)):
                out[k] = sample
        return out

    def get(self, gid: int, position: int = 0):
        return self.samples([gid], position)[0]

    def keys(self, ids) -> list[str]:
        out: list = [None] * len(ids)
        for s, at, local in self._split(ids):
            for k, key in zip(at, self.sets[s].keys(local)):
                out[k] = key
        return out

    def key(self, gid: int) -> str:
        return self.keys([gid])[0]

    def where(self, gid: int) -> str:
        s = int(self.source_of([gid])[0])
        return f"{self.sources[s].name}: {self.sets[s].where(int(gid - self.offsets[s]))}"

    def follow(self, plan, batch: int) -> None:
        for s, shardset in enumerate(self.sets):
            shardset.follow(plan, batch, shards=(int(self.first_shard[s]), int(self.first_shard[s + 1])))

    def close(self) -> None:
        for s in self.sets:
            s.close()


def open_sources(sources: list[Source], on_error: str, cache_dir: str, cache_limit: int,
                 max_open: int) -> list[ShardSet]:
    """Each source opened as a ShardSet; errors name the source, the first in list order. Remote
    sources open in threads (their requests wait on the network and overlap), local ones here one
    after another meanwhile: a local open is a stat per shard, which threads slow down (the GIL
    changes hands at every stat: 4 local sources of 100,000 shards took 1.4 s in threads, 0.8 s in
    turn). Two sources that resolve to the same folder are an error (weight one of them instead)."""
    def open_one(source: Source) -> ShardSet:
        fmt = source_format(source.shards, source.format) or "wds"
        return ShardSet(source.shards, fmt, on_error, cache_dir, cache_limit, max_open)

    sets, folders, error = [], {}, None
    with ThreadPoolExecutor(max(1, min(8, sum(is_remote(s.shards) for s in sources)))) as pool:
        remote = {i: pool.submit(open_one, s) for i, s in enumerate(sources) if is_remote(s.shards)}
        for i, source in enumerate(sources):  # local ones here, while the remote ones wait
            where = f"data source {i} ({source.name}: {source.shards})"
            try:
                shardset = remote[i].result() if i in remote else open_one(source)
            except (ShardError, StorageError, ValueError) as e:
                error = error or type(e)(f"{where}: {e}")
                continue
            sets.append(shardset)
            folder = shardset.folder if is_remote(shardset.folder) else os.path.realpath(shardset.folder)
            if folder in folders:
                error = error or ValueError(f"{where} is the same folder as data source {folders[folder]}: list "
                                            "it once and give it a weight instead")
            folders.setdefault(folder, i)
    if error is not None:
        for s in sets:
            s.close()
        raise error
    return sets


__all__ = ["Source", "Mixture", "parse_sources", "open_sources", "fingerprint", "differences", "dataset_name"]
