"""A format folder opened for loading: its shards, random access by global sample id, and the
bad shards and samples found while opening it. The folder is local or in object storage
(`s3://bucket/prefix`): then shards stream through a bounded local cache (`pipelines.storage`).

Problems are found here, before an epoch is planned, so that a bad shard can never make one rank
yield fewer batches than another (a DDP hang): with `on_error="raise"` the first problem is an
error naming the shard; with `on_error="skip"` the shard or sample is left out and counted in
`skipped`.

A remote folder opens from its small files only: manifest.json (or the listing), and the per-shard
indexes (`.idx` of wds and rec, `.jsonl` of rec), fetched once into the cache folder. Validated at
open as for a local folder: missing shards and indexes, samples without image or text, members
past the listed end of a tar. Validated lazily, when a shard's data file is fetched: its size (and
sha256, from manifest.json) and, for arrow, its row count against manifest.json.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import tarfile
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines.formats.arrow import ArrowShard
from pipelines.formats.recordio import RecShard
from pipelines.formats.base import ProcessLocal
from pipelines.formats.wds import WdsShard, read_index, split_name
from pipelines.schema import CONTEXT_LENGTH, IMAGE_EXTS, Sample
from pipelines.storage import (DEFAULT_CACHE_DIR, DEFAULT_CACHE_LIMIT, ShardCache, StorageError, cache_folder,
                               download_file, human, is_remote, join, list_files, read_json)
from pipelines.text import choose_caption, sample_tokens

# read_batch's text row: raw tokens, synthetic-caption tokens, has_syn.
TEXT_WIDTH = 2 * CONTEXT_LENGTH + 1

ERROR_POLICIES = ("raise", "skip")
SUFFIX = {"wds": ".tar", "arrow": ".arrow", "rec": ".rec"}
COMPANIONS = {"wds": (".idx",), "arrow": (), "rec": (".idx", ".jsonl")}  # small: fetched at open
OPEN_PER_PROCESS = 128  # cached shards a process keeps open (evicted files hold disk space while open)


class ShardError(ValueError):
    pass


def _data_files(folder: str, fmt: str) -> list[str]:
    suffix = SUFFIX[fmt]
    manifest = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            names = [e["name"] for e in json.load(f)["files"] if e["name"].endswith(suffix)]
        return [os.path.join(folder, n) for n in names]
    # No manifest: img2dataset output or open_clip-style shards.
    return sorted(glob.glob(os.path.join(folder, f"*{suffix}")))


class ShardSet:
    def __init__(self, folder: str, fmt: str, on_error: str = "raise", cache_dir: str = DEFAULT_CACHE_DIR,
                 cache_limit: int = DEFAULT_CACHE_LIMIT, rank: int = 0):
        """`cache_dir`, `cache_limit` (bytes) and `rank` matter for remote folders only: the
        cache lives in a folder per (url, rank) under `cache_dir`."""
        if on_error not in ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ERROR_POLICIES}, not {on_error!r}")
        self.cache: ShardCache | None = None
        self._planned: dict = {}
        if is_remote(folder):
            folder, paths = self._open_remote(folder, fmt, cache_dir, cache_limit, rank)
        elif not os.path.isdir(folder):
            raise ShardError(f"{folder}: no such shard folder; pass the make-shards --out folder "
                             f"or its {fmt}/ subfolder")
        else:
            if not _data_files(folder, fmt) and os.path.isdir(os.path.join(folder, fmt)):
                folder = os.path.join(folder, fmt)  # the make-shards --out folder itself
            paths = _data_files(folder, fmt)
        self.folder, self.format, self.on_error = folder, fmt, on_error
        self.skipped: Counter = Counter()
        self.problems: list[str] = []
        self.shards, valid = [], []
        if not paths and self.cache is None:
            others = [f for f in ("wds", "arrow", "rec") if f != fmt and os.path.isdir(os.path.join(folder, f))]
            hint = f" (it holds {', '.join(others)}: set the format to match)" if others else ""
            raise ShardError(f"{folder}: no {fmt} shards found{hint}")
        for path in paths:
            try:
                shard = self._open(path) if self.cache is None else self._open_cached(path)
                ok = self._valid_samples(shard)
            except (OSError, ValueError, tarfile.TarError) as e:  # TarError: a cut tar without .idx
                self._problem("bad_shard", f"{path}: {e}")
                continue
            self.shards.append(shard)
            valid.append(ok)
        self.valid = valid
        if self.cache is not None:
            self.cache.in_use = len(self.shards)
        self._keys: dict[int, list[str]] = {}  # per shard, by valid position (ShardSet.keys)
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

    def _open_remote(self, url: str, fmt: str, cache_dir: str, cache_limit: int, rank: int) -> tuple[str, list[str]]:
        """List the folder, read manifest.json, fetch the shards' small index files, build the
        cache: (format folder url, data file urls)."""
        suffix = SUFFIX[fmt]
        listing = list_files(url)
        if not any(n.endswith(suffix) for n in listing) and f"{fmt}/" in listing:
            url = join(url, fmt)  # the make-shards --out folder itself
            listing = list_files(url)
        if "manifest.json" in listing:
            files = {e["name"]: e for e in read_json(join(url, "manifest.json"))["files"]}
        elif fmt == "arrow":
            raise ShardError(f"{url}: no manifest.json; remote arrow shards need it for their sample counts "
                             "(make-shards writes it)")
        else:
            files = {n: {"bytes": b} for n, b in sorted(listing.items())}
        names = [n for n in files if n.endswith(suffix)]
        if not names:
            others = [f for f in ("wds", "arrow", "rec") if f"{f}/" in listing]
            hint = f" (it holds {', '.join(others)}: set the format to match)" if others else ""
            raise ShardError(f"{url}: no {fmt} shards found{hint}")
        self._remote = {"files": files, "listing": listing}
        self.cache = ShardCache(url, names, [int(files[n]["bytes"]) for n in names],
                                [files[n].get("sha256") for n in names],
                                cache_folder(cache_dir, url, rank), cache_limit)
        small = [(n[: -len(suffix)] + ext) for n in names for ext in COMPANIONS[fmt]]
        small = [n for n in small if n in listing and not (
            os.path.exists(local := os.path.join(self.cache.folder, n)) and os.path.getsize(local) == listing[n])]
        if small:
            from tqdm import tqdm

            fetch = functools.partial(_fetch_small, url, self.cache.folder, listing)
            with ThreadPoolExecutor(16) as pool:
                list(tqdm(pool.map(fetch, small), total=len(small), desc="shard indexes", unit="file",
                          disable=len(small) < 64))
        return url, [join(url, n) for n in names]

    def _open_cached(self, url: str) -> "CachedShard":
        name = url.rsplit("/", 1)[1]
        n, stem = self.cache.numbers[name], os.path.join(self.cache.folder, name[: -len(SUFFIX[self.format])])
        if name not in self._remote["listing"]:
            raise ShardError(f"{url}: listed in manifest.json but missing")
        length = self._remote["files"][name].get("samples")
        for ext in COMPANIONS[self.format]:
            if not os.path.exists(stem + ext):
                fix = "rerun make-shards --resume or DALI's wds2idx" if ext == ".idx" else "reconvert this shard"
                raise ValueError(f"index {url[: -len(SUFFIX[self.format])]}{ext} missing; {fix}")
        if self.format == "wds":
            index = read_index(stem + ".idx")
            return CachedShard(self.cache, n, "wds", len(index), index=index)
        if self.format == "rec":
            meta = RecShard(self.cache.path(n))  # reads only the local .idx and .jsonl
            return CachedShard(self.cache, n, "rec", len(meta), meta=meta)
        if length is None:
            raise ValueError(f"{url}: manifest.json gives no sample count; rewrite it with make-shards")
        return CachedShard(self.cache, n, "arrow", int(length))

    def follow(self, plan, batch: int) -> None:
        """The loader's position: batch `batch` of `plan` is the next one it yields. A remote set's
        cache fetches ahead from there (the rest of this epoch, then the next); a local set
        ignores it."""
        if self.cache is not None:
            for p in (plan, dataclasses.replace(plan, epoch=plan.epoch + 1, offset=0)):
                self._plan_shards(p)  # here: a batch too big for the cache is the caller's error
            self.cache.schedule(functools.partial(self._future, plan, batch))

    def _plan_shards(self, plan) -> tuple[np.ndarray, np.ndarray]:
        """(shard number in the cache per planned sample, first position of each batch) of a plan,
        kept for the current and the next epoch."""
        key = plan  # frozen dataclass: hashable
        if key not in self._planned:
            batches = plan.batches()
            starts = np.cumsum([0] + [len(b) for b in batches])
            flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
            numbers = np.array([s.n for s in self.shards])[np.searchsorted(self.ends, flat, side="right")]
            self._check_batches(plan, numbers, starts)
            kept = {k: v for k, v in self._planned.items() if v[0] >= plan.epoch}
            self._planned = {**kept, key: (plan.epoch, numbers, starts)}
        return self._planned[key][1:]

    def _check_batches(self, plan, numbers: np.ndarray, starts: np.ndarray) -> None:
        sizes = np.asarray(self.cache.sizes, np.int64)
        for b in range(len(starts) - 1):
            used = np.unique(numbers[starts[b]:starts[b + 1]])
            need = int(sizes[used].sum())
            if need > self.cache.limit:
                raise ShardError(f"{self.cache.url}: batch {b} of epoch {plan.epoch} reads {len(used)} shards, "
                                 f"{human(need)}, more than cache_limit {human(self.cache.limit)}; raise "
                                 "cache_limit or shuffle by blocks of shards")

    def _future(self, plan, batch: int):
        """Shard numbers in order of use from batch `batch` of `plan` on, through the next epoch,
        in growing chunks (the cache stops reading once its window is full)."""
        following = dataclasses.replace(plan, epoch=plan.epoch + 1, offset=0)
        for p, start in ((plan, batch), (following, 0)):
            numbers, starts = self._plan_shards(p)
            pos, step = int(starts[min(start, len(starts) - 1)]), 256
            while pos < len(numbers):
                chunk = numbers[pos:pos + step]
                _, first = np.unique(chunk, return_index=True)
                yield chunk[np.sort(first)]
                pos, step = pos + step, step * 2

    def close(self) -> None:
        """Stop a remote set's fetching (the loader's close)."""
        if self.cache is not None:
            self.cache.close()

    def _valid_samples(self, shard) -> np.ndarray:
        if self.format != "wds":
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

    def __getstate__(self):  # workers read samples, they never need the key lists or plans
        return {**self.__dict__, "_keys": {}, "_planned": {}}

    def keys(self, ids) -> list[str]:
        """Keys of a batch of sample ids, from per-shard key lists built when first needed."""
        shard = np.searchsorted(self.ends, ids, side="right")
        local = np.asarray(ids) - np.concatenate([[0], self.ends])[shard]
        for s in set(shard.tolist()) - self._keys.keys():
            self._keys[s] = [self.shards[s].key(int(i)) for i in self.valid[s]]
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


def _fetch_small(url: str, folder: str, listing: dict[str, int], name: str) -> None:
    download_file(join(url, name), os.path.join(folder, name), listing[name])


def _wds_shard(path: str) -> WdsShard:
    return WdsShard(path, path[: -len(".tar")] + ".idx")


_OPENERS = {"wds": _wds_shard, "arrow": ArrowShard, "rec": RecShard}
_OPEN: "OrderedDict[int, CachedShard]" = OrderedDict()  # this process's open cached shards, oldest first
_OPEN_PID: list[int] = [0]


class CachedShard:
    """One shard of a remote folder, with the format shard's interface (len, key, get, read).
    Length, keys (wds, rec) and the member index (wds) come from the index files fetched at open;
    the data file comes through the cache. The format's own shard object is built on the local
    copy in each process that reads it, and rebuilt when the cache fetched the file anew after an
    eviction (another inode). A process keeps at most OPEN_PER_PROCESS of them open: an evicted
    file's disk space returns only once no process holds it."""

    def __init__(self, cache: ShardCache, n: int, fmt: str, length: int, index=None, meta=None):
        self.cache, self.n, self.format, self._len = cache, n, fmt, length
        self.path = join(cache.url, cache.names[n])
        self.index, self.size, self._meta = index, cache.sizes[n], meta
        self._shard, self._file, self._pid = None, None, None

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        return {**self.__dict__, "_shard": None, "_file": None, "_pid": None}

    def key(self, i: int) -> str:
        if self.index is not None:
            return split_name(self.index[i][0][3])[0]
        return (self._meta or self._data()).key(i)

    def get(self, i: int) -> Sample:
        return self._call("get", i)

    def read(self, i: int):
        return self._call("read", i)

    def _call(self, method: str, i: int):
        for _ in range(100):
            shard = self._data()
            try:
                return getattr(shard, method)(i)
            except FileNotFoundError:  # evicted between the stat and the lazy open: wait again
                self.release()
        raise StorageError(f"{self.path}: evicted from the cache again and again while being read; "
                           "raise cache_limit")

    def _data(self):
        pid = os.getpid()
        if _OPEN_PID[0] != pid:  # a fresh (forked) process: what it inherited is not its own
            _OPEN.clear()
            _OPEN_PID[0] = pid
        while True:
            local, st = self.cache.acquire(self.n)
            if self._shard is not None and self._pid == pid and self._file == (st.st_dev, st.st_ino):
                _OPEN.move_to_end(id(self))
                return self._shard
            self.release()
            try:
                shard = _OPENERS[self.format](local)
            except FileNotFoundError:
                continue
            if len(shard) != self._len:
                raise ShardError(f"{self.path}: holds {len(shard)} samples, manifest.json lists {self._len}; "
                                 "reconvert or re-upload this folder")
            self._shard, self._file, self._pid = shard, (st.st_dev, st.st_ino), pid
            _OPEN[id(self)] = self
            while len(_OPEN) > OPEN_PER_PROCESS:
                _OPEN.popitem(last=False)[1].release()
            return shard

    def release(self) -> None:
        """Close this process's handles on the local copy (fds closed, memory maps dropped)."""
        shard, self._shard = self._shard, None
        _OPEN.pop(id(self), None)
        if shard is not None:
            for handle in vars(shard).values():
                if isinstance(handle, ProcessLocal):
                    handle.close()
