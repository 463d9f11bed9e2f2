"""A format folder opened for loading: its shards, random access by global sample id, and the
bad shards and samples found while opening it. The folder is local or in object storage
(`s3://bucket/prefix`): then shards stream through a node-wide bounded cache
(`pipelines.storage.shard_cache`).

Opening costs what grows with the shards, not the samples: the folder index (`index.bin`, see
`pipelines/formats/index.py`) is mapped, not parsed, so a sample costs about 50 bytes of shared
page cache and nothing in Python until a batch reads it; a local open checks each shard file's
size (one `stat` each); a remote one reads manifest.json and the index, two requests whatever the
number of shards. Shard files are opened when a batch needs them, and a process keeps at most
`max_open` of them mapped (none holding a descriptor); a shard a batch reads fewer than `MAP_FROM`
samples of, and that is not mapped, is read by offset (`pread`) and closed after the batch's reads.

Problems are found here, before an epoch is planned, so that a bad shard can never make one rank
yield fewer batches than another (a DDP hang): with `on_error="raise"` the first problem is an
error naming the shard; with `on_error="skip"` the shard or sample is left out and counted in
`skipped`. Indexing names samples without image or text and samples past the end of their file;
opening names shards listed but missing.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections import Counter

import numpy as np

from pipelines.errors import SampleReadError, ShardError
from pipelines.formats.folder_index import SUFFIX, indexes, local_index, piece, shard_names
from pipelines.formats import arrow, recordio, wds
from pipelines.formats.base import DEFAULT_OPEN_SHARDS, MappedFile, OpenShards, ShardFile
from pipelines.formats.index import INDEX_NAME, FolderIndex, Piece
from pipelines.schema import CONTEXT_LENGTH, Sample
from pipelines.storage.cached_files import cache_folder, content_version, fetch_once, identity_of
from pipelines.storage.shard_cache import ShardCache
from pipelines.storage.remote import DEFAULT_CACHE_DIR, DEFAULT_CACHE_LIMIT, is_remote, join, parse_size
from pipelines.storage.remote_index import index_remote_folder, remote_manifest
from pipelines.text import choose_captions, sample_tokens


log = logging.getLogger("pipelines")

# read_batch's text row: raw tokens, synthetic-caption tokens, has_syn.
TEXT_WIDTH = 2 * CONTEXT_LENGTH + 1

ERROR_POLICIES = ("raise", "skip")
_OPENERS = {"wds": MappedFile, "arrow": MappedFile, "rec": recordio.RecFiles}
# Handles that read by offset instead (`ShardFile`): for a shard a batch reads fewer than
# MAP_FROM samples of and no one holds mapped. A map costs about as much as four `pread`s (measured
# at 500 shards, global shuffle: 2 → 4 gave 1.09-1.19× the host rate at batch 64 and 256; 5 shards
# read only by offset: 0.82×).
_READERS = {"wds": ShardFile, "arrow": ShardFile, "rec": functools.partial(recordio.RecFiles, mapped=False)}
MAP_FROM = 4



def position_of(epoch: int, batch: int) -> int:
    """A read's place in the plan as one integer (the cache serves earlier places first)."""
    return (int(epoch) << 32) + int(batch)


class ShardSet:
    def __init__(self, folder: str, fmt: str, on_error: str = "raise", cache_dir: str = DEFAULT_CACHE_DIR,
                 cache_limit: int | str = DEFAULT_CACHE_LIMIT, max_open: int = DEFAULT_OPEN_SHARDS):
        """`cache_dir`: where a remote folder's shards are cached (one folder per url, shared by
        the ranks of a node) and where indexes the loader builds itself are kept; `cache_limit`
        (bytes, or text such as "8GiB"): the remote cache's size; `max_open`: shard files a process keeps mapped."""
        if on_error not in ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ERROR_POLICIES}, not {on_error!r}")
        if fmt not in SUFFIX:
            raise ValueError(f"unknown shard format {fmt!r}; choose from {', '.join(SUFFIX)}")
        self.cache: ShardCache | None = None
        self.format, self.on_error = fmt, on_error
        if is_remote(folder):
            folder, self.index, missing = self._open_remote(folder, fmt, cache_dir, cache_limit)
        else:
            folder, self.index, missing = self._open_local(folder, fmt, cache_dir)
        self.folder = folder
        self.skipped: Counter = Counter()
        self.problems: list[str] = []
        index = self.index
        counts = index.shards["count"].astype(np.int64)
        listed = index.problems
        for _, reason, message in listed:
            self._problem(reason, message)
        for reason, n in index.problem_counts.items():  # beyond the messages the index keeps
            self.skipped[reason] += n - sum(1 for _, r, _ in listed if r == reason)
        for s in missing:
            self._problem("bad_shard", f"{join(folder, index.names[s])}: listed in manifest.json but missing")
            counts[s] = 0
        self.numbers = np.flatnonzero(counts)  # index shard number of each shard in use
        self.ends = np.cumsum(counts[self.numbers])
        self._starts = self.ends - counts[self.numbers]
        self._row0 = index.shards["row0"].astype(np.int64)[self.numbers]
        self.paths = [join(folder, index.names[s]) for s in self.numbers]
        if not self.ends.size or self.ends[-1] == 0:
            raise ShardError(f"{folder}: no readable samples ({dict(self.skipped)})")
        self._open = OpenShards(max_open)
        self._repaired: dict[int, Piece] = {}  # shard position -> its rows indexed again (a damaged index)
        self._following = None  # (plan, the next epoch's plan) the cache follows

    # --- opening ---

    def _problem(self, reason: str, message: str) -> None:
        if self.on_error == "raise":
            raise ShardError(message + "  (set on_error='skip' to skip and count instead)")
        self.skipped[reason] += 1
        self.problems.append(message)

    @staticmethod
    def _open_local(folder: str, fmt: str, cache_dir: str) -> tuple[str, FolderIndex, list[int]]:
        if not os.path.isdir(folder):
            raise ShardError(f"{folder}: no such shard folder; pass the make-shards --out folder "
                             f"or its {fmt}/ subfolder")
        has_index = indexes(folder, fmt)
        names = [] if has_index else shard_names(folder, fmt)[0]
        if not has_index and not names and os.path.isdir(os.path.join(folder, fmt)):
            folder = os.path.join(folder, fmt)  # the make-shards --out folder itself
            has_index = indexes(folder, fmt)
            names = [] if has_index else shard_names(folder, fmt)[0]
        if not has_index and not names:
            others = [f for f in SUFFIX if f != fmt and os.path.isdir(os.path.join(folder, f))]
            hint = f" (it holds {', '.join(others)}: set the format to match)" if others else ""
            raise ShardError(f"{folder}: no {fmt} shards found{hint}")
        index, missing = local_index(folder, fmt, cache_dir)
        return folder, index, missing

    def _open_remote(self, url: str, fmt: str, cache_dir: str, cache_limit: int | str) -> tuple[str, FolderIndex, list[int]]:
        """Read manifest.json and the folder index (each fetched once per node), set up the
        cache: two requests for a folder written by make-shards, whatever its size."""
        url, manifest = remote_manifest(url, fmt)
        node = cache_folder(cache_dir, url)
        if manifest is not None and manifest.get("index"):
            node = cache_folder(cache_dir, url, content_version(manifest))  # its files, this version's only
            info = manifest["index"]
            index = FolderIndex(fetch_once(join(url, info["name"]), os.path.join(node, INDEX_NAME), info["bytes"],
                                           identity_of(info["sha256"]), info["sha256"]))
            etags = {}
        else:
            index, etags, node = index_remote_folder(url, fmt, manifest, node)
        files = []
        for s, name in enumerate(index.names):
            info = index.shard_info(s)
            entry = [(name, info["bytes"], identity_of(info["sha256"], etags.get(name)))]
            if fmt == "rec":
                text = name[: -len(".rec")] + ".jsonl"
                entry.append((text, info["text_bytes"], identity_of(info["text_sha256"], etags.get(text))))
            files.append(entry)
        self.cache = ShardCache(url, files, node, parse_size(cache_limit))
        return url, index, []  # a remote shard that is gone fails its fetch, naming it

    # --- the cache's schedule ---

    def follow(self, plan, batch: int, shards: tuple[int, int] | None = None) -> None:
        """The loader's position: batch `batch` of `plan` is the next one it yields. A remote set's
        cache fetches ahead from there (the rest of this epoch, then the next); a local set
        ignores it. `shards`: the plan's shard numbers [first, end) that are this set's (one
        source of a mixture, pipelines/sources.py); default all."""
        if self.cache is not None:
            if self._following is None or self._following[0] is not plan:  # one next-epoch plan per epoch
                self._following = (plan, dataclasses.replace(plan, epoch=plan.epoch + 1, offset=0))
            first, end = shards or (0, len(self.numbers))
            self.cache.schedule(functools.partial(self._future, plan, self._following[1], batch, first, end))

    def _future(self, plan, following, batch: int, first: int, end: int):
        """Shard numbers in order of first use from batch `batch` of `plan` on, through the next
        epoch, in chunks (the cache stops reading once its window is full)."""
        for p, start in ((plan, batch), (following, 0)):
            for chunk in p.read_order(start):
                mine = chunk[(chunk >= first) & (chunk < end)] - first
                if mine.size:
                    yield self.numbers[mine]

    def close(self) -> None:
        """Unmap this process's shards and stop a remote set's fetching (the loader's close)."""
        self._open.close()
        if self.cache is not None:
            self.cache.close()

    # --- random access ---

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getstate__(self):  # workers map their own shards, and follow no plan
        return {**self.__dict__, "_open": OpenShards(self._open.capacity), "_following": None}

    def _locate(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(position in `self.numbers` of each id's shard, its row in the folder index)."""
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sample ids must lie in [0, {len(self)}), got {ids.min()}..{ids.max()}")
        pos = np.searchsorted(self.ends, ids, side="right")
        return pos, self._row0[pos] + (ids - self._starts[pos])

    def locate(self, gid: int) -> tuple[int, int]:
        """(shard position in `paths`, row within the shard's readable samples) of sample `gid`."""
        pos, _ = self._locate([gid])
        return int(pos[0]), int(gid - self._starts[pos[0]])

    def key(self, gid: int) -> str:
        return self.keys([gid])[0]

    def keys(self, ids) -> list[str]:
        pos, rows = self._locate(ids)
        if self._check(pos):
            return [self._row(int(p), int(r))[0] for p, r in zip(pos, rows)]
        return self.index.keys(rows)

    def where(self, gid: int) -> str:
        """How an error names a sample: its shard file and key."""
        pos, _ = self._locate([gid])
        return f"{self.paths[int(pos[0])]}: sample {self.key(gid)}"

    def _check(self, pos: np.ndarray) -> bool:
        """Check the index rows of the shards at positions `pos` (once per shard and process); a
        shard whose rows fail their checksum (a damaged index) is indexed again from its own files,
        so a damaged index never yields a wrong sample. Whether any of them was."""
        pos = np.unique(np.asarray(pos, np.int64))
        for s in self.index.unverified(self.numbers[pos]).tolist():
            p = int(np.searchsorted(self.numbers, s))
            if p not in self._repaired and not self.index.verified(s):
                self._repaired[p] = self._reindex(p)
        return bool(self._repaired) and any(int(p) in self._repaired for p in pos)

    def _reindex(self, p: int) -> Piece:
        name, path = self.index.names[int(self.numbers[p])], self.paths[p]
        if self.cache is not None:
            raise ShardError(f"{self.index.path}: damaged (the rows of {name} fail their checksum); delete it "
                             "and open the folder again: it is fetched anew")
        log.warning("%s: damaged (the rows of %s fail their checksum); indexing %s again", self.index.path, name, path)
        strict = os.path.exists(os.path.join(self.folder, "manifest.json"))
        fresh = piece(self.format, self.folder, name, strict)
        want = int(self.ends[p] - self._starts[p])
        if len(fresh.keys) != want:
            raise ShardError(f"{self.index.path}: damaged, and {path} indexed again holds {len(fresh.keys)} readable "
                             f"samples, not {want}: delete the index and open the folder again")
        return fresh

    def _row(self, p: int, row: int):
        """(key, index record as a tuple, or None) of index row `row` of the shard at position p."""
        keys, recs = self._rows(p, [row])
        return keys[0], recs[0]

    def _rows(self, p: int, rows: list[int], keys: bool = True) -> tuple[list, list]:
        """(keys, or Nones without `keys`; index records as tuples or Nones) of index rows `rows` of
        the shard at position p: two numpy calls for a batch (a record's fields read one by one cost
        ~0.5 µs each)."""
        fixed = self._repaired.get(p)
        if fixed is None:
            samples = self.index.samples
            names = self.index.keys(rows) if keys else [None] * len(rows)
            return names, [None] * len(rows) if samples is None else samples[rows].tolist()
        local = [row - int(self._row0[p]) for row in rows]
        return ([fixed.keys[i] for i in local] if keys else [None] * len(rows),
                [None] * len(rows) if fixed.samples is None else fixed.samples[local].tolist())

    def _grouped(self, ids):
        """(shard position, [(index in ids, index row)]) per shard the ids touch, in order of first need."""
        pos, rows = self._locate(ids)
        order = np.argsort(pos, kind="stable")
        cuts = np.flatnonzero(np.diff(pos[order])) + 1
        groups = np.split(order, cuts) if len(order) else []
        groups.sort(key=lambda g: int(g[0]))
        return [(int(pos[g[0]]), [(int(i), int(rows[i])) for i in g]) for g in groups]

    def _handle(self, p: int, position: int, reads: int, table: bool = False):
        """(handle on shard position p, its cache hold or None, whether the caller closes it after
        `reads` samples). Local shards stay mapped in this process's bounded set, but one this batch
        reads fewer than MAP_FROM samples of and nobody holds mapped is read by offset (`_READERS`):
        under a global shuffle over many shards most reads are such, and a map costs more than it
        saves for a few samples. A cached remote shard is held (locked) only while it is read.
        `table`: an Arrow shard's table (`ColumnViews`: whole samples, and rows without a direct
        index record)."""
        opener = arrow.ColumnViews if table else _OPENERS[self.format]
        if self.cache is None:
            if not table and reads < MAP_FROM and not self._open.holds(p):
                return _READERS[self.format](self.paths[p]), None, True
            key = ("table", p) if table else p
            return self._open.get(key, functools.partial(opener, self.paths[p])), None, False
        held = self.cache.acquire(int(self.numbers[p]), position)
        try:
            return opener(held.path), held, True
        except BaseException:
            held.close()
            raise

    def _read_group(self, p: int, members, position: int, whole: bool, views: bool = False):
        """Read `members` [(slot, row)] of shard position p: Samples (`whole`) or the hot path's
        (image, tokens, n_syn), images as views into the map with `views` (see `read_batch`). From a
        remote shard everything is copied out before it is let go."""
        if p not in self._repaired and not self.index.verified(int(self.numbers[p])):  # once per shard
            self._repaired[p] = self._reindex(p)
        rows = [row for _, row in members]
        # The hot path looks a key up only to name a sample that fails (the Batch's keys come
        # later, in one call for the batch).
        keys, recs = self._rows(p, rows, keys=whole)
        handle, held, owned = self._handle(p, position, len(members), self._table(whole, recs[0]))
        remote = held is not None
        try:
            return [(slot, self._read_named(handle, p, row, key, rec, whole, remote, views, slot))
                    for (slot, row), key, rec in zip(members, keys, recs)]
        finally:
            if owned:
                handle.close()
            if remote:
                held.close()

    def _read_named(self, handle, p: int, row: int, key, rec, whole: bool, copy: bool, views: bool, slot: int):
        """`_read_one`, its failure raised as the SampleReadError of `slot`, naming the sample's key."""
        try:
            return self._read_one(handle, p, row, key, rec, whole, copy, views)
        except ValueError as e:
            if key is None and rec is not None:  # read it again, named, for the message
                try:
                    self._read_one(handle, p, row, self._row(p, row)[0], rec, whole, copy, views)
                except ValueError as named:
                    e = named
            raise SampleReadError(str(e), slot) from e

    def _read_local(self, ids: np.ndarray, whole: bool, views: bool, out: list) -> bool:
        """`_read` for a local set whose index rows all check out, in one pass over the batch: its
        records in one call, each shard's handle taken once. Under a global shuffle over many shards a
        batch touches about as many shards as it has samples, and a pass per shard cost ~10 µs a
        sample more. False (nothing read) where a shard's rows fail their check: `_read` then goes
        shard by shard, reading the repaired ones from their own index."""
        pos, rows = self._locate(ids)
        order = np.argsort(pos, kind="stable")  # shard by shard: a small OpenShards must not close one in use
        pos, rows = pos[order], rows[order]
        plist = pos.tolist()
        reads = Counter(plist)
        if self.index.unverified(self.numbers[list(reads)]).size:
            for q in reads:
                if not self.index.verified(int(self.numbers[q])):
                    return False
        samples = self.index.samples
        keys = self.index.keys(rows) if whole and samples is not None else [None] * len(plist)
        recs = [None] * len(plist) if samples is None else samples[rows].tolist()
        at, handle, owned = None, None, False
        try:
            for slot, p, row, key, rec in zip(order.tolist(), plist, rows.tolist(), keys, recs):
                if p != at:
                    if owned:
                        handle.close()
                    at, (handle, _, owned) = p, self._handle(p, 0, reads[p], self._table(whole, rec))
                out[slot] = self._read_named(handle, p, row, key, rec, whole, False, views, slot)
        finally:
            if owned:
                handle.close()
        return True

    def _table(self, whole: bool, rec) -> bool:
        """Whether a read goes through an Arrow shard's table: whole samples, and rows without a
        direct index record (a folder indexed before they existed, a compressed foreign file)."""
        return self.format == "arrow" and (whole or rec is None or not rec[-1])

    def _read_one(self, handle, p: int, row: int, key, rec, whole: bool, copy: bool, views: bool = False):
        path, fmt, table = self.paths[p], self.format, self._table(whole, rec)
        if not table and handle.copies:  # read by offset: the bytes are this process's own, no map behind them
            copy, views = False, True
        if table:
            local = row - int(self._row0[p])
            if whole:
                return handle.get(local)
            image, tokens, n_syn = handle.read(local)
        elif fmt == "arrow":
            image, tokens, n_syn = arrow.read_sample(handle.read, rec, path, key)
        else:
            # the sample's span (wds) or record (rec), and its index record addressing it from 0
            at, buf, rec = rec[0], handle.read(rec[0], rec[1]), (0, *rec[1:])
            if fmt == "wds":
                if whole:
                    return wds.get_sample(buf, rec, path, key)
                image, tokens, n_syn = wds.read_sample(buf, rec, path, key)
            else:  # the sidecar only for whole samples and token rows beyond the record's two
                text, rec = handle.text_of(rec) if whole or rec[5] > 2 else (None, rec)
                if whole:
                    return recordio.get_sample(buf, text, rec, path, key, at)
                image, tokens, n_syn = recordio.read_sample(buf, text, rec, path, key, at)
        # Images leave the map as copies unless the caller copies them at once (`views`): a batch is
        # held for a while (a DALI prefetch queue, the trainer's step), and a view keeps its whole
        # shard mapped after OpenShards has closed it, so a global-shuffle batch of 32 kept ~21
        # shards mapped with max_open=4.
        if copy or not views:
            image = np.array(image)
        if copy:  # nothing may map a cached file once its lock is gone
            tokens = None if tokens is None else np.array(tokens)
        return image, tokens, n_syn

    def _read(self, ids: np.ndarray, position: int, whole: bool, views: bool = False) -> list:
        """Per id, in order: a Sample (`whole`) or the hot path's (image, tokens, n_syn)."""
        out: list = [None] * len(ids)
        try:
            if self.cache is None and not self._repaired and self._read_local(ids, whole, views, out):
                return out
            for p, members in self._grouped(ids):
                for slot, value in self._read_group(p, members, position, whole, views):
                    out[slot] = value
        except SampleReadError as e:
            e.gid = int(ids[e.gid])  # from the slot in `ids` to the sample id
            raise
        return out

    def get(self, gid: int, position: int = 0) -> Sample:
        return self.samples([gid], position)[0]

    def samples(self, ids, position: int = 0) -> list[Sample]:
        """Whole samples (every member, copied), in the order of `ids`."""
        return self._read(np.asarray(ids, np.int64), position, whole=True)

    def read_batch(self, ids, seed: int, epoch: int, position: int | None = None,
                   caption_ids=None, views: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
        """The loader's hot path: encoded images (uint8 copies out of the map, no decode) and one int32
        [B, TEXT_WIDTH] array of text (raw tokens | synthetic tokens | has_syn), the synthetic
        caption chosen per (seed, epoch, id); tokenized here for shards stored without tokens.
        `position`: the batch's place in the plan (`position_of`), for a remote cache.
        `caption_ids`: the ids the caption choice is keyed by, when they are not `ids` (a
        mixture's global ids: pipelines/sources.py). `views`: images as read-only views into the
        mapped shards (a remote set's are copies all the same), for a caller that copies them at once
        and holds only the copy (the DALI source: DALI copies as the batch is fed, or into a worker's
        shared memory; one copy a byte instead of two)."""
        position = position_of(epoch, 0) if position is None else position
        ids = np.asarray(ids, np.int64)
        keyed = ids if caption_ids is None else np.asarray(caption_ids, np.int64)
        read = self._read(ids, position, whole=False, views=views)
        images = [image for image, _, _ in read]
        text = np.empty((len(ids), TEXT_WIDTH), np.int32)
        n_syn = np.fromiter((n for _, _, n in read), np.int64, len(read))
        # tokens rows: raw, then each synthetic caption (the raw text again when there is none)
        row_syn = (1 + choose_captions(n_syn, seed, epoch, keyed)).tolist()
        text[:, -1] = n_syn > 0
        slow = []
        for row, ((_, tokens, _), chosen) in enumerate(zip(read, row_syn)):
            if tokens is None or chosen >= len(tokens):  # not stored (older or foreign shards)
                slow.append(row)
                continue
            text[row, :CONTEXT_LENGTH] = tokens[0]
            text[row, CONTEXT_LENGTH:-1] = tokens[chosen]
        if slow:  # shards without stored tokens: tokenize here, in the loader's worker
            samples = self.samples([ids[r] for r in slow], position)
            raw, syn, has_syn = sample_tokens(samples, [keyed[r] for r in slow], seed, epoch)
            text[slow, :CONTEXT_LENGTH], text[slow, CONTEXT_LENGTH:-1], text[slow, -1] = raw, syn, has_syn
        return images, text


__all__ = ["ShardSet", "TEXT_WIDTH", "position_of"]
