"""A node's bounded local cache of the shard files of one version of one object-storage folder.

The epoch plan is a deterministic function of (seed, epoch), so a loader knows every shard it will
read and in which order. One process per node owns the cache folder (the first loader of the node
to open it: it holds the folder's `.owner` lock): a background thread fetches shards in order of
first future use, as far ahead as `limit` bytes allow. Every process of the node — that loader's
workers, and the other ranks' loaders and workers — reads through the same folder, so a node
fetches each shard once, whatever its number of ranks. When the owner closes, the next loader of
the node to need a shard takes over. The folder is one dataset version's (`cache_folder`: the
manifest's digest, or the listing's ETags, names it), so a job reading a re-converted dataset at
the same url owns a folder of its own and never meets the old version's files.

Guarantees, and how:
- **Bounded disk, per node.** Fetched plus downloading bytes of every cache folder under the
  node's cache root — every url, every version — never exceed `limit` (pipelines/storage/node_budget.py:
  a reservation under the root's lock, evicting the least recently used shards of any folder), and
  a file is deleted only when no process uses it: a reader holds a shared `flock` on the shard's
  lock file (`<name>.lock`) before it opens any of its files and until it has closed them, the
  owner deletes them only under an exclusive one, and remote readers copy what they read before
  they let go (`ShardSet`), so no descriptor or mapping of an evicted file outlives its lock.
- **No reader waits forever.** A reader that finds its shard missing leaves a request
  (`<name>.want.<token>`, holding the position in the plan of what it reads) and holds it under an
  flock while it waits. Requests come first, earliest position first, and a requested shard is
  never evicted, by any owner of the node, until its reader has locked it and withdrawn the
  request (then its lock protects it). A reader locks one shard at a time and holds nothing while
  it waits, so the earliest request always gets room: reads finish whatever the ratio of shard
  size to limit, as long as one shard fits. A request is live while its lock is held, which the
  owner tests with a non-blocking flock (pipelines/storage/cache_locks.py): never by pid, so readers in
  other PID namespaces (one container per rank) are served, and the request of a reader that died
  is dropped at once even when its pid now belongs to another process.
- **Never stale data.** A file enters the folder only by an atomic rename after its download was
  checked against the shard's identity (the sha256 the folder index or manifest lists, else the
  store's ETag), and a marker (`<name>.ok`) records that identity with the file's inode, size and
  mtime. Every reader, owner or not, reads a file only when its marker names the identity it
  expects for this very file; a new owner adopts a file it finds only when its marker matches (or,
  without a marker, once the file's sha256 does: checked once, then remembered), deletes the rest,
  and fetches anew, once its reader has let go, a file it could not delete.
- **Errors reach the readers.** A fetch that failed for good leaves `<name>.error`, which waiting
  readers raise (a `StorageError` naming the object), never mistaken for an undecodable image.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from pipelines.storage.cache_locks import WANT, Held, LockFile, Record, live_text, try_lock, want_token
from pipelines.storage.cached_files import is_marked, is_verified, mark_verified
from pipelines.errors import StorageError
from pipelines.formats.base import write_atomic
from pipelines.storage.node_budget import LOADING, OWNED, NodeBudget, evict, evictions, write_catalog
from pipelines.storage.remote import download_file, human, join

WAIT_TIMEOUT_S = 900.0  # a reader waiting longer for a shard gives up (no owner can fetch it)
TAKEOVER_S = 0.5  # how often a waiting loader tries to become the owner of an ownerless folder
ASK_AFTER_S = 0.05  # a reader asks for a shard it has waited this long for (the schedule usually has it)


class ShardCache:
    """The cache of `url`'s shards in `folder` (one dataset version's), sharing `limit` with every
    cache folder under `root` (default: two levels up, `<root>/<url folder>/<version>`). `files[n]`
    lists shard n's files as (name, bytes, identity), the data file first (RecordIO adds its text
    sidecar). See the module docstring."""

    def __init__(self, url: str, files: list[list[tuple[str, int, str | None]]], folder: str, limit: int,
                 threads: int = 8, root: str | None = None):
        self.url, self.files, self.folder, self.limit, self.threads = url, files, folder, limit, threads
        self.names = [f[0][0] for f in files]
        self.sizes = [sum(b for _, b, _ in f) for f in files]
        self.numbers = {name: n for n, f in enumerate(files) for name, _, _ in f}
        if not files:
            raise ValueError(f"{url}: no shards to cache")
        big = max(range(len(files)), key=self.sizes.__getitem__)
        if self.sizes[big] > limit:
            raise ValueError(f"{join(url, self.names[big])} is {human(self.sizes[big])}, larger than cache_limit "
                             f"{human(limit)}; raise cache_limit")
        os.makedirs(folder, exist_ok=True)
        write_catalog(folder, files)
        self.budget = NodeBudget(root or os.path.dirname(os.path.dirname(os.path.abspath(folder))))
        self.creator = os.getpid()
        self._parent: int | None = None  # set in a pickled copy: the process that sent it
        self._owner_fd: LockFile | None = None
        self._owned: Record | None = None  # tells other folders' owners this one is live
        self._cond = threading.Condition()
        self._present: dict[int, float] = {}  # shard -> when fetched
        self._loading: dict[int, Record] = {}  # shard -> its reservation in the node budget
        self._suspect: set[int] = set()  # unverified files a reader held at takeover: never read, fetched anew
        self._evictions = evictions(folder)
        self._used = self.peak = 0
        self._counts = {"fetched": 0, "evicted": 0, "reused": 0, "bytes": 0}
        self._future: Callable[[], Iterable] | None = None
        self._window: list[int] | None = None
        self._asked: list[int] = []  # the requests the last _wanted() found
        self._error: str | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_claim = 0.0
        self._try_own()

    def path(self, n: int) -> str:
        return os.path.join(self.folder, self.names[n])

    def __getstate__(self):  # what a spawned worker needs to read: never the owner's state
        return {**self.__dict__, "_cond": None, "_thread": None, "_owner_fd": None, "_owned": None, "_future": None,
                "_window": None, "_loading": {}, "creator": None, "_parent": os.getpid()}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if os.getppid() != self._parent:  # not a worker of the process that sent it: nothing to watch
            self._parent = None

    def _orphaned(self) -> bool:
        """A worker whose loader process has gone (its parent: the pickler, or the creator it was
        forked from). Its reads would wait for nothing; torch's watchdog only looks between batches."""
        parent = self._parent if self.creator is None else self.creator
        return parent is not None and os.getpid() != parent and os.getppid() != parent

    @property
    def owner(self) -> bool:
        return self._owner_fd is not None and os.getpid() == self.creator

    # --- readers (any process of the node) ---

    def acquire(self, n: int, position: int = 0) -> Held:
        """Shard n's files, locked against eviction, once present. `position`: where in the plan
        the read lies ((epoch << 32) + batch), so the owner serves the earliest request first."""
        waited, delay, want, last_try = 0.0, 0.001, None, 0.0
        try:
            while True:
                held = self._try_lock(n)
                if held is not None:
                    return held
                if self.owner:
                    self.check()
                    self._start()
                elif os.getpid() == self.creator and waited - last_try >= TAKEOVER_S:
                    last_try = waited
                    if self._try_own():
                        self._start()
                error = self.path(n) + ".error"
                if os.path.exists(error):
                    with open(error) as f:
                        raise StorageError(f.read())
                if want is None and (waited >= ASK_AFTER_S or self._future is None):
                    # held under our flock while we wait: live to the owner in any PID namespace
                    want = Record(f"{self.path(n)}{WANT}{want_token()}", str(int(position)))
                    if self.owner:
                        with self._cond:
                            self._cond.notify_all()
                if self._orphaned():
                    raise StorageError(f"the loader process that started this worker has exited; not waiting for "
                                       f"{join(self.url, self.names[n])}")
                if waited > WAIT_TIMEOUT_S:
                    raise StorageError(f"waited {waited:.0f} s for {join(self.url, self.names[n])} to reach the "
                                       f"cache {self.folder}; is a loader of this node still running?")
                time.sleep(delay)
                waited += delay
                delay = min(2 * delay, 0.02)
        finally:
            if want is not None:
                want.close()

    def _lock_path(self, n: int) -> str:
        return self.path(n) + ".lock"

    def _try_lock(self, n: int) -> Held | None:
        """Shard n held against eviction if all its files are present and marked as the identity
        this version expects, else None. The lock is on a lock file of its own, taken before any
        data file is opened: a reader never holds a file the owner has deleted, not even for the
        moment between an open and a lock."""
        lock = try_lock(self._lock_path(n), exclusive=False)
        if lock is None:  # the owner is evicting it
            return None
        paths = [os.path.join(self.folder, name) for name, _, _ in self.files[n]]
        if not all(is_marked(p, ident) for p, (_, _, ident) in zip(paths, self.files[n])):
            lock.close()
            return None
        os.utime(lock.fd)  # the shard's last use: the node budget evicts the least recently used first
        return Held(paths, [lock])

    # --- the owner ---

    def _try_own(self) -> bool:
        """Become the folder's owner if no other loader of the node is (flock: a dead owner's lock
        goes with it). A new owner adopts the verified files it finds."""
        if self._owner_fd is not None:
            return True
        lock = try_lock(os.path.join(self.folder, ".owner"), exclusive=True)
        if lock is None:
            return False
        self._owner_fd = lock  # a LockFile: a forked child never keeps the folder
        self._owned = Record(os.path.join(self.folder, OWNED))
        self._scan()
        return True

    def _scan(self) -> None:
        """Adopt the complete, verified shards found in the folder; drop the rest (what a dead
        owner was downloading, unverifiable files, errors of an earlier run). A file that fails its
        check but is held by a reader is suspect: never read, fetched anew once it can go."""
        with self._cond:
            self._present, self._suspect, self._used = {}, set(), 0
            entries = set(os.listdir(self.folder))
            for entry in entries:  # only the cache's own: index files beside them belong to others
                stem = entry.split(".tmp-")[0] if ".tmp-" in entry else entry[:-6] if entry.endswith(".error") \
                    else entry[:-len(LOADING)] if entry.endswith(LOADING) else None
                if stem in self.numbers:
                    _remove(os.path.join(self.folder, entry))
            for n, files in enumerate(self.files):
                paths = [os.path.join(self.folder, name) for name, _, _ in files]
                if not any(name in entries for name, _, _ in files):
                    continue
                if all(is_verified(p, ident) for p, (_, _, ident) in zip(paths, files)):
                    self._present[n] = max(os.path.getmtime(p) for p in paths)
                    self._used += self.sizes[n]
                    self._counts["reused"] += 1
                elif not self._evict_files(n):
                    self._suspect.add(n)
            self._reserve(None, set())  # a lower limit than the last run's: back within it
            self.peak = max(self.peak, self._used)

    def _claim(self) -> bool:
        """Try to take the folder over, at most every TAKEOVER_S (a non-owner's thread)."""
        now = time.monotonic()
        if now - self._last_claim < TAKEOVER_S:
            return False
        self._last_claim = now
        return self._try_own()

    def schedule(self, future: Callable[[], Iterable]) -> None:
        """Follow a new position: `future()` yields arrays of shard numbers in order of use. A loader
        that follows a plan runs the cache's thread whether or not it owns the folder: a non-owner's
        thread takes the folder over when its owner closes (its workers read, and they never do)."""
        self.check()
        with self._cond:
            self._future, self._window = future, None
            self._cond.notify_all()
        self._start()

    def check(self) -> None:
        if self._error:
            raise StorageError(self._error)

    def stats(self) -> dict:
        """This cache's counts; `peak_bytes`: the most bytes of the node's cache root in use right
        after one of its reservations (or its own, if more), `used_bytes`: its own."""
        with self._cond:
            return {"peak_bytes": max(self.peak, self.budget.peak), "used_bytes": self._used, "limit": self.limit,
                    "owner": self.owner, **self._counts}

    def close(self) -> None:
        """Stop fetching and give up the folder (another loader of the node may take it over)."""
        if os.getpid() != self.creator or self._cond is None:
            return
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._owned is not None:
            self._owned.close()
            self._owned = None
        if self._owner_fd is not None:
            self._owner_fd.close()
            self._owner_fd = None

    def _start(self) -> None:
        if self._thread is None and os.getpid() == self.creator:
            self._stop = False
            # The thread holds the cache only weakly, so a loader dropped without close() stops it.
            self._thread = threading.Thread(target=ShardCache._run, args=(weakref.ref(self), self._cond, self.threads),
                                            name="shard-cache", daemon=True)
            self._thread.start()

    def _requests(self) -> list[int]:
        """Shards readers wait for, earliest position first; requests no process holds dropped."""
        asked = []
        for entry in os.listdir(self.folder):
            name, _, token = entry.rpartition(WANT)
            if not name or name not in self.numbers:
                continue
            text = live_text(os.path.join(self.folder, entry))
            if text is None:
                continue
            try:
                asked.append((int(text or 0), self.numbers[name]))
            except ValueError:
                continue
        return [n for _, n in sorted(asked)]

    def _wanted(self) -> list[int]:
        """Requested shards (earliest first), then the schedule's shards in order of first use,
        as many as fit in the limit together."""
        if self._window is None:
            self._window, total, seen = [], 0, set()
            for chunk in (self._future() if self._future else ()):
                full = False
                for n in chunk:
                    n = int(n)
                    if n in seen:
                        continue
                    if total + self.sizes[n] > self.limit:
                        full = True
                        break
                    seen.add(n)
                    total += self.sizes[n]
                    self._window.append(n)
                if full or len(seen) == len(self.files):
                    break
        out, total = [], 0
        self._asked = self._requests()
        for n in self._asked + self._window:
            if n not in out and total + self.sizes[n] <= self.limit:
                out.append(n)
                total += self.sizes[n]
        return out

    @staticmethod
    def _run(ref: "weakref.ref[ShardCache]", cond: threading.Condition, threads: int) -> None:
        with ThreadPoolExecutor(threads, thread_name_prefix="shard-fetch") as pool:
            while True:
                with cond:
                    cache = ref()
                    if cache is None or cache._stop or cache._error:
                        return
                    try:
                        if cache.owner or cache._claim():
                            cache._step(pool)
                    except Exception as e:  # noqa: BLE001 - readers must hear of it, not wait forever
                        cache._error = f"shard cache of {cache.url}: {type(e).__name__}: {e}"
                    del cache
                    cond.wait(0.02)

    def _step(self, pool: ThreadPoolExecutor) -> None:
        """Start the fetches the requests and the window call for and room allows (under the lock)."""
        self._reconcile()
        self._suspect = {n for n in self._suspect if not self._evict_files(n)}
        wanted = self._wanted()
        keep = set(wanted)
        asked = set(self._asked)
        for n in wanted:
            if n in self._present or n in self._loading or n in self._suspect:
                continue
            if len(self._loading) >= self.threads:
                break
            # a reader waits for it: room from any folder's shards, this one's read-ahead included
            record = self._reserve(n, asked, others=True) if n in asked else self._reserve(n, keep)
            if record is None:
                break
            self._loading[n] = record
            self._used += self.sizes[n]
            self.peak = max(self.peak, self._used)
            pool.submit(self._fetch, n)

    def _reserve(self, n: int | None, keep: set[int], others: bool = False) -> Record | None:
        """Room for shard n in the node's budget (evicting the least recently used shards of this
        folder, of ownerless ones and with `others` of every folder under the root; none of
        `keep`), or None if it does not fit yet. n=None: evict until the root is within the limit."""
        files = None if n is None else [(name, size) for name, size, _ in self.files[n]]
        record, evicted = self.budget.reserve(self.folder, files, self.limit,
                                              {self.folder: {self.names[k] for k in keep}}, others)
        for folder, name in evicted:
            if folder == self.folder and self.numbers[name] in self._present:
                del self._present[self.numbers[name]]
                self._used -= self.sizes[self.numbers[name]]
            self._counts["evicted"] += 1
        return record

    def _reconcile(self) -> None:
        """Forget the shards another folder's owner evicted (it notes each eviction here)."""
        seen = evictions(self.folder)
        if seen == self._evictions:
            return
        self._evictions = seen
        for n in list(self._present):
            if not all(os.path.exists(os.path.join(self.folder, name)) for name, _, _ in self.files[n]):
                del self._present[n]
                self._used -= self.sizes[n]

    def _evict_files(self, n: int) -> bool:
        """Delete shard n's files unless a reader holds the shard (then nothing is deleted)."""
        return evict(self.folder, [name for name, _, _ in self.files[n]])

    def _fetch(self, n: int) -> None:
        try:
            for name, size, identity in self.files[n]:
                path = os.path.join(self.folder, name)
                sha = identity[len("sha256:"):] if identity and identity.startswith("sha256:") else None
                download_file(join(self.url, name), path, size, sha)
                mark_verified(path, identity)
            _touch(self._lock_path(n))  # just used (never the data file: its marker records its mtime)
        except Exception as e:  # noqa: BLE001 - every failure must reach the readers
            url = join(self.url, self.names[n])
            message = str(e) if isinstance(e, StorageError) else f"fetching {url}: {type(e).__name__}: {e}"
            write_atomic(self.path(n) + ".error", message)
            with self._cond:
                self._error = message
                self._loading.pop(n).close()
                self._used -= self.sizes[n]
                self._cond.notify_all()
            return
        with self._cond:
            self._loading.pop(n).close()  # the files are in place: they count instead of the reservation
            self._present[n] = time.time()
            self._counts["fetched"] += 1
            self._counts["bytes"] += self.sizes[n]
            self._cond.notify_all()


def _touch(path: str) -> None:
    lock = LockFile(path)  # no flock taken, but a descriptor of a lock file is never left to a child
    try:
        os.utime(lock.fd)
    finally:
        lock.close()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


__all__ = ["ShardCache", "Held", "WAIT_TIMEOUT_S"]
