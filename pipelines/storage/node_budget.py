"""One `cache_limit` per node: the shard caches of every url and every dataset version under one
cache root (`cache_dir`, or its per-host subfolder on a shared filesystem: pipelines/storage/cached_files.py)
share it, whichever processes own them.

Each cache folder lists its shards' files in a catalog (`.shards`, written once), so that any
owner can account for and evict any folder's shards. An owner reserves room for a download under
the root's `.budget.lock` (a lock held for a scan of the root, never during a transfer): it
counts what lies in every cache folder — the shard files present, plus the full size of each
download in flight (`<shard>.loading`, a record its owner holds: pipelines/storage/cache_locks.py) —
evicts the least recently used shards (a reader touches `<shard>.lock` at each read) that no
reader holds, no live request names and the caller does not keep, until the download fits, and
records its reservation before it lets go. Only a reader's request may evict another live owner's
shards (its folder's `.owned` record is held): read-ahead takes free room, its own folder's and
ownerless folders' shards, so two datasets read together never evict each other's read-ahead
in turns, and a waiting reader still always gets room. Bytes are added only there; a finished download
replaces its reservation, so the total stays within the limit. A dead owner's reservations and
partial downloads are cleared by the next scan, its files are evicted like any other.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from typing import Iterable

from pipelines.storage.cache_locks import WANT, LockFile, Record, live_text, try_lock
from pipelines.storage.cached_files import marker
from pipelines.formats.base import write_atomic

CATALOG = ".shards"
LOADING = ".loading"
OWNED = ".owned"  # a record its folder's owner holds: its read-ahead is not for others to evict
EVICTED = ".evicted"  # rewritten in a folder whose shards another folder's owner evicted
BUDGET_LOCK = ".budget.lock"


def write_catalog(folder: str, files: list[list[tuple[str, int, str | None]]]) -> None:
    """The folder's shards, each [[name, bytes], ...] (data file first), for other folders' owners."""
    path = os.path.join(folder, CATALOG)
    if not os.path.exists(path):
        write_atomic(path, json.dumps([[[name, int(size)] for name, size, _ in f] for f in files]))


class _RootLock:
    """The root's budget lock, held for one scan: a POSIX record lock (lockf), which a forked
    child never inherits — a child's copy of an flock would hold every owner of the node off for
    as long as the child lives — plus a lock per root within the process, since record locks do
    not exclude the threads of one process (two caches under one root: dataset mixing)."""

    def __init__(self, path: str):
        with _MUTEXES_GUARD:
            self.mutex = _MUTEXES.setdefault(path, threading.Lock())
        self.mutex.acquire()
        try:
            self.lock = LockFile(path)
            fcntl.lockf(self.lock.fd, fcntl.LOCK_EX)
        except BaseException:
            self.mutex.release()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.close()  # closing the process's only descriptor of the file lets the record lock go
        self.mutex.release()


_MUTEXES: dict[str, threading.Lock] = {}
_MUTEXES_GUARD = threading.Lock()


def _new_mutexes() -> None:  # a forked child: the parent's may be held by threads it does not have
    global _MUTEXES_GUARD
    _MUTEXES.clear()
    _MUTEXES_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_new_mutexes)


class NodeBudget:
    """The shared limit of the cache folders under `root`. `peak`: the most bytes this process
    saw in use right after one of its reservations."""

    def __init__(self, root: str):
        self.root = root
        self.peak = 0
        self._catalogs: dict[str, tuple[int, dict[str, tuple[str, int]], dict[str, list]]] = {}

    def __getstate__(self):  # a worker never reserves: nothing to carry
        return {"root": self.root, "peak": 0, "_catalogs": {}}

    def folders(self) -> list[str]:
        """Every cache folder under the root: <url folder>/<version>/ holding a catalog."""
        out = []
        for top in _subfolders(self.root):
            out += [v for v in _subfolders(top) if os.path.exists(os.path.join(v, CATALOG))]
        return out

    def _catalog(self, folder: str):
        """(file name -> (shard key, bytes), shard key -> its files), re-read when it changes."""
        path = os.path.join(folder, CATALOG)
        mtime = os.stat(path).st_mtime_ns
        cached = self._catalogs.get(folder)
        if cached is None or cached[0] != mtime:
            with open(path) as f:
                shards = json.load(f)
            files = {name: (s[0][0], int(size)) for s in shards for name, size in s}
            cached = (mtime, files, {s[0][0]: s for s in shards})
            self._catalogs[folder] = cached
        return cached[1], cached[2]

    def _scan(self, keep: dict[str, set[str]], own: str, others: bool) -> tuple[int, list[tuple[str, list, int]]]:
        """(bytes in use under the root, evictable shards as (folder, files, bytes present)): of
        folder `own`, of folders without a live owner, and with `others` of every folder.
        Clears what dead processes left on the way: reservations, partial downloads, requests."""
        used, free = 0, []
        for folder in self.folders():
            evictable = others or folder == own or live_text(os.path.join(folder, OWNED)) is None
            try:
                files, shards = self._catalog(folder)
                entries = os.listdir(folder)
            except (OSError, ValueError):  # removed by hand meanwhile, or a catalog being written
                continue
            loading, wanted, present = set(), set(), {}
            for e in entries:
                if e.endswith(LOADING) and e[:-len(LOADING)] in shards:
                    if live_text(os.path.join(folder, e)) is not None:
                        loading.add(e[:-len(LOADING)])
                elif WANT in e:
                    if live_text(os.path.join(folder, e)) is not None:
                        wanted.add(e.rpartition(WANT)[0])
            # Files listed after the reservations were checked: a download that finished since
            # (its file renamed into place before its reservation went) is seen one way or the other.
            try:
                entries = os.listdir(folder)
            except OSError:
                continue
            for e in entries:
                if e in files:
                    key, size = files[e]
                    present[key] = present.get(key, 0) + size
            for e in entries:  # a partial download whose owner died (no live reservation)
                stem = e.split(".tmp-")[0]
                if stem != e and stem in files and files[stem][0] not in loading:
                    _remove(os.path.join(folder, e))
            for key in loading:
                used += sum(size for _, size in shards[key])
            for key, size in present.items():
                if key in loading:
                    continue
                used += size
                if evictable and key not in wanted and key not in keep.get(folder, ()):
                    free.append((folder, shards[key], size))
        return used, free

    def reserve(self, folder: str, files: list | None, limit: int, keep: dict[str, set[str]], others: bool = False
                ) -> tuple[Record | None, list[tuple[str, str]]]:
        """Room for shard `files` [(name, bytes, ...)] in `folder` within `limit`, evicting least
        recently used shards outside `keep` ({folder: shard keys}), of live owners' folders too
        if `others` (a reader waits for it); (its reservation, or None if it does not fit now,
        and the (folder, shard key) evicted). `files=None`: evict until the root is within
        `limit`, reserve nothing."""
        need = sum(int(f[1]) for f in files) if files else 0
        evicted = []
        with _RootLock(os.path.join(self.root, BUDGET_LOCK)):
            used, free = self._scan(keep, folder, others)
            if used + need > limit:
                for _, where, shard, size in sorted((_last_use(f, s), f, s, b) for f, s, b in free):
                    if evict(where, [name for name, _ in shard]):
                        used -= size
                        evicted.append((where, shard[0][0]))
                        if used + need <= limit:
                            break
            record = None
            if files and used + need <= limit:
                record = Record(os.path.join(folder, files[0][0] + LOADING), str(need))
                self.peak = max(self.peak, used + need)
        for where in {f for f, _ in evicted if f != folder}:
            _note_eviction(where)
        return record, evicted


def evict(folder: str, names: Iterable[str]) -> bool:
    """Delete one shard's files (data file first in `names`) unless a reader holds the shard."""
    names = list(names)
    lock = try_lock(os.path.join(folder, names[0] + ".lock"), exclusive=True)
    if lock is None:
        return False
    try:
        for name in names:
            path = os.path.join(folder, name)
            _remove(path)
            _remove(marker(path))
    finally:
        lock.close()
    return True


def evictions(folder: str) -> bytes:
    """Changes whenever another owner evicted some of `folder`'s shards."""
    try:
        with open(os.path.join(folder, EVICTED), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _note_eviction(folder: str) -> None:
    with open(os.path.join(folder, EVICTED), "wb") as f:  # a torn write still reads as a change
        f.write(os.urandom(8))


def _last_use(folder: str, shard: list) -> float:
    """When the shard was last read or fetched: its lock file's mtime (readers touch it)."""
    for name in (shard[0][0] + ".lock", shard[0][0]):
        try:
            return os.stat(os.path.join(folder, name)).st_mtime
        except FileNotFoundError:
            continue
    return 0.0


def _subfolders(path: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


__all__ = ["NodeBudget", "write_catalog", "evict", "evictions", "CATALOG", "LOADING", "OWNED"]
