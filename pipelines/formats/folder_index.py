"""Finding, checking and building the index of a shard folder (`pipelines/formats/index.py`).

make-shards (and every tool that rewrites shards) writes `index.bin` into the format folder. A
loader opening a local folder uses it when it matches the folder: every indexed shard present at
its indexed size. A folder without one (converted before the index existed, or foreign tars:
img2dataset, open_clip-style) or whose shards changed size is indexed by the loader itself from
the shards' `.idx` / `.jsonl` files (or a scan of tars that have none), once: the result goes to
the loader's cache folder, never into the data folder, keyed by the folder's path and checked
against each shard's size and modification time, under a lock so that the ranks of a node index
a folder once between them.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from pipelines.errors import FolderIndexError
from pipelines.formats import arrow, recordio, wds
from pipelines.formats.base import file_digest
from pipelines.formats.index import INDEX_NAME, SAMPLE_DTYPES, FolderIndex, Piece, write_index
from pipelines.parent_watch import watch_in_child

log = logging.getLogger("pipelines")

SUFFIX = {"wds": ".tar", "arrow": ".arrow", "rec": ".rec"}
COMPANIONS = {"wds": (".idx",), "arrow": (), "rec": (".idx", ".jsonl")}  # per-shard files the index is built from
PARALLEL_FROM = 32  # shards: index in a process pool from this many on
PIECE_SUFFIX = ".piece"  # one shard's piece of the folder index, as a converter leaves it


def piece(fmt: str, folder: str, name: str, strict: bool, size: int | None = None, mtime: bool = False) -> Piece:
    """Index one shard; a shard that cannot be indexed becomes a piece without samples whose one
    problem ("bad_shard") names it. `strict`: the folder has a manifest, so a wds shard without
    its `.idx` is a bad shard (make-shards wrote one) rather than a foreign tar to scan. `size`:
    the data file's bytes when it is not local (an object store's listing)."""
    path = os.path.join(folder, name)
    try:
        if fmt == "wds":
            idx = path[: -len(".tar")] + ".idx"
            if not os.path.exists(idx) and (strict or size is not None):
                raise ValueError(f"index {idx} missing; rerun make-shards --resume or DALI's wds2idx")
            out = wds.index_piece(path, idx if os.path.exists(idx) else None, name, size=size)
        elif fmt == "rec":
            out = recordio.index_piece(path, name, size=size)
        else:
            out = arrow.index_piece(path, name)
        if mtime:
            out.mtime_ns = os.stat(path).st_mtime_ns
        return out
    except (OSError, ValueError, tarfile.TarError) as e:  # TarError: a cut tar without .idx
        if isinstance(e, FileNotFoundError) and e.filename == path:
            message = f"{path}: listed in manifest.json but missing"
        else:
            message = f"{path}: {e}"
        dtype = SAMPLE_DTYPES[fmt]
        return Piece(name, size or 0, None if dtype is None else np.zeros(0, dtype), [], [("bad_shard", message)])


def _piece_args(args) -> Piece:
    return piece(*args)


def pieces(fmt: str, folder: str, names: list[str], strict: bool, sizes: dict | None = None,
           mtime: bool = False, progress: bool = True):
    """Pieces of `names`, in order: in a process pool for many shards (indexing parses text)."""
    jobs = [(fmt, folder, n, strict, (sizes or {}).get(n), mtime) for n in names]
    bar = None
    if progress and len(jobs) >= 256:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"indexing {folder}", unit="shard")
    workers = min(os.cpu_count() or 1, 8)
    if len(jobs) < PARALLEL_FROM or workers < 2:
        results = map(_piece_args, jobs)
        pool = None
    else:
        # fork: the children only parse files; nothing of the parent's threads is used there. They
        # watch the parent: a loader killed while indexing must not leave them waiting on its queue.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=watch_in_child)
        results = pool.map(_piece_args, jobs, chunksize=8)
    try:
        for p in results:
            if bar is not None:
                bar.update()
            yield p
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()


def shard_names(folder: str, fmt: str) -> tuple[list[str], bool]:
    """(data file names in shard order, whether a manifest listed them)."""
    manifest = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            return [e["name"] for e in json.load(f)["files"] if e["name"].endswith(SUFFIX[fmt])], True
    # No manifest: img2dataset output or open_clip-style shards.
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, f"*{SUFFIX[fmt]}"))), False


def with_digests(p: Piece, fmt: str, files: dict[str, dict]) -> Piece:
    """`p` with its files' digests as manifest.json (or a shard's record) lists them."""
    p.sha256 = files.get(p.name, {}).get("sha256")
    if fmt == "rec":
        text = files.get(p.name[: -len(".rec")] + ".jsonl", {})
        p.text_bytes, p.text_sha256 = int(text.get("bytes", 0)), text.get("sha256")
    return p


def shard_piece(folder: str, fmt: str, name: str, files: dict[str, dict]) -> Piece:
    """Shard `name`'s piece as a converter records it: from its `.idx` / `.jsonl` (Arrow: its
    keys column), with sizes and digests from `files` (its record: name -> {"bytes", "sha256"}),
    so the piece is the same whether the data file is still at hand or already uploaded."""
    return with_digests(piece(fmt, folder, name, True, size=int(files[name]["bytes"])), fmt, files)


def write_piece(path: str, fmt: str, p: Piece) -> str:
    """One shard's piece as an index file of its own (make-shards' `.parts/NNNNNN.piece`): the
    folder index is assembled from these without reading a shard again."""
    return write_index(path, fmt, [p])


def write_folder_index(folder: str, fmt: str, files: dict[str, dict] | None = None, names: list[str] | None = None,
                       pieces_dir: str | None = None, target: str | None = None) -> str:
    """Write `folder/index.bin` (what make-shards and attach-captions call once the shards are
    final). `files`: name -> {"bytes", "sha256"} as manifest.json lists them: the index carries
    each file's digest (a cache checks what it fetches against it), and shards are indexed from
    their `.idx` / `.jsonl` with those sizes, or taken from `pieces_dir/<stem>.piece` where a
    converter left one. Without `files`, the folder's shards are indexed as they are. `target`:
    write there instead (a check's fresh copy)."""
    target = target or os.path.join(folder, INDEX_NAME)
    if files is None:
        names, strict = (names, True) if names is not None else shard_names(folder, fmt)
        return write_index(target, fmt, pieces(fmt, folder, names, strict))
    names = names if names is not None else [n for n in sorted(files) if n.endswith(SUFFIX[fmt])]

    def assembled():
        for name in names:
            kept = os.path.join(pieces_dir, name[: -len(SUFFIX[fmt])] + PIECE_SUFFIX) if pieces_dir else None
            kept = _kept_piece(kept) if kept and os.path.exists(kept) else None
            yield with_digests(kept, fmt, files) if kept else shard_piece(folder, fmt, name, files)
    return write_index(target, fmt, assembled())


def _kept_piece(path: str) -> Piece | None:
    """A converter's piece of one shard, or None when it is damaged (the shard is indexed again)."""
    try:
        index = FolderIndex(path)
        if index.samples is None and SAMPLE_DTYPES[index.format] is not None:
            return None  # an Arrow piece written before per-sample records: indexed again
        return index.piece(0) if len(index.names) == 1 and index.verified(0) else None
    except FolderIndexError as e:
        log.warning("%s; indexing the shard again", e)
        return None


def index_for_manifest(folder: str, fmt: str, entries: list[dict], pieces_dir: str | None = None) -> dict:
    """Write `folder/index.bin` for the shards manifest.json lists (`entries`: its "files") and
    return the manifest's "index" entry (name, bytes, sha256)."""
    path = write_folder_index(folder, fmt, {e["name"]: e for e in entries}, pieces_dir=pieces_dir)
    return {"name": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": file_digest(path)}


def cache_path(cache_dir: str, folder: str, fmt: str) -> str:
    """Where a loader keeps the index it built of a folder: one per folder path and format."""
    real = os.path.realpath(folder)
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", real.strip("/"))[-80:]
    digest = hashlib.sha256(real.encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser(cache_dir), "index", f"{tag}-{digest}", f"{fmt}.{INDEX_NAME}")


def _stale(index: FolderIndex, folder: str, with_mtime: bool) -> tuple[set[int], list[int]]:
    """(shards whose file changed since indexing, shards whose file is missing)."""
    # One stat per shard is what a local open costs (100,000 shards at 100 M samples): names relative
    # to the folder's descriptor (no path joined or walked per shard) and the sizes as Python ints.
    changed, missing = set(), []
    sizes = index.shards["bytes"].tolist()
    mtimes = index.shards["mtime_ns"].tolist() if with_mtime else None
    stat = os.stat
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for s, name in enumerate(index.names):
            try:
                st = stat(name, dir_fd=fd)
            except FileNotFoundError:
                missing.append(s)
                continue
            if st.st_size != sizes[s] or (with_mtime and st.st_mtime_ns != mtimes[s]):
                changed.add(s)
    finally:
        os.close(fd)
    return changed, missing


class IndexLock:
    """An exclusive lock file beside `path` (flock: released by the kernel if the holder dies)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def indexes(folder: str, fmt: str) -> bool:
    """Whether `folder` holds a folder index of `fmt` shards."""
    path = os.path.join(folder, INDEX_NAME)
    try:
        return os.path.exists(path) and FolderIndex(path).format == fmt
    except FolderIndexError:
        return False


def local_index(folder: str, fmt: str, cache_dir: str) -> tuple[FolderIndex, list[int]]:
    """The index of a local format folder and the shard numbers whose file is missing.

    The folder's own `index.bin` when every shard it indexes is there at its indexed size (then
    nothing else is read: not manifest.json, not one `.idx`); else the loader's cached index of
    the folder when that matches (size and mtime of every shard, the same shard list); else a new
    one built into the cache: whole, or, from a folder index that went stale, only the changed
    shards indexed again."""
    own = os.path.join(folder, INDEX_NAME)
    base = None
    if os.path.exists(own):
        try:
            base = FolderIndex(own)
        except FolderIndexError as e:
            log.warning("%s; indexing the folder again into the cache", e)
        if base is not None and base.format == fmt:
            changed, missing = _stale(base, folder, with_mtime=False)
            if not changed:
                return base, missing
        else:
            base = None
    names, strict = shard_names(folder, fmt)
    target = cache_path(cache_dir, folder, fmt)
    with IndexLock(target):
        if os.path.exists(target):
            try:
                cached = FolderIndex(target)
            except FolderIndexError as e:
                log.warning("%s; indexing the folder again", e)
                cached = None
            if cached is not None and cached.format == fmt and cached.names == names:
                changed, missing = _stale(cached, folder, with_mtime=True)
                if not changed:
                    return cached, missing
        log.info("indexing %s (%d %s shards) into %s", folder, len(names), fmt, target)
        reuse = {}
        # An Arrow index written before per-sample records has none to give its unchanged shards.
        if base is not None and (base.samples is not None or SAMPLE_DTYPES[fmt] is None):
            changed, _ = _stale(base, folder, with_mtime=False)
            reuse = {n: s for s, n in enumerate(base.names) if s not in changed}

        def merged():
            fresh = pieces(fmt, folder, [n for n in names if n not in reuse], strict, mtime=True)
            for n in names:
                if n in reuse:
                    p = base.piece(reuse[n])
                    p.mtime_ns = _mtime(os.path.join(folder, n))
                    yield p
                else:
                    yield next(fresh)
        write_index(target, fmt, merged())
        index = FolderIndex(target)
        _, missing = _stale(index, folder, with_mtime=False)
        return index, missing


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0
