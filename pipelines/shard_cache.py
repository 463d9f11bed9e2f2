"""A node's bounded local cache of the shard files of one object-storage folder.

The epoch plan is a deterministic function of (seed, epoch), so a loader knows every shard it will
read and in which order. One process per node owns the cache folder (the first loader of the node
to open it: it holds the folder's `.owner` lock): a background thread fetches shards in order of
first future use, as far ahead as `limit` bytes allow. Every process of the node — that loader's
workers, and the other ranks' loaders and workers — reads through the same folder, so a node
fetches each shard once, whatever its number of ranks. When the owner closes, the next loader of
the node to need a shard takes over.

Guarantees, and how:
- **Bounded disk.** Fetched plus downloading bytes never exceed `limit`, and a file is deleted only
  when no process uses it: a reader holds a shared `flock` on the shard's lock file
  (`<name>.lock`) before it opens any of its files and until it has closed them, the owner
  deletes them only under an exclusive one, and remote readers copy what they read before they
  let go (`ShardSet`), so no descriptor or mapping of an evicted file outlives its lock.
- **No reader waits forever.** A reader that finds its shard missing leaves a request
  (`<name>.want.<pid>`, holding the position in the plan of what it reads). Requests come first,
  earliest position first, and a requested shard is never evicted until its reader has locked it
  and withdrawn the request (then its lock protects it). A reader locks one shard at a time and
  holds nothing while it waits, so the earliest request always gets room: reads finish whatever
  the ratio of shard size to limit, as long as one shard fits. Requests of processes that died are
  dropped.
- **Never stale data.** A file enters the folder only by an atomic rename after its download was
  checked against the shard's identity (the sha256 the folder index or manifest lists, else the
  store's ETag), and a marker (`<name>.ok`) records that identity with the file's inode, size and
  mtime. A new owner adopts a file it finds only when its marker matches the identity it expects
  (or, without a marker, once the file's sha256 does: checked once, then remembered). A re-converted
  dataset at the same url is fetched anew.
- **Errors reach the readers.** A fetch that failed for good leaves `<name>.error`, which waiting
  readers raise (a `StorageError` naming the object), never mistaken for an undecodable image.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from pipelines.cached_files import is_verified, mark_verified, marker
from pipelines.formats.base import write_atomic
from pipelines.storage import StorageError, download_file, human, join

WAIT_TIMEOUT_S = 900.0  # a reader waiting longer for a shard gives up (no owner can fetch it)
TAKEOVER_S = 0.5  # how often a waiting loader tries to become the owner of an ownerless folder
ASK_AFTER_S = 0.05  # a reader asks for a shard it has waited this long for (the schedule usually has it)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Lock descriptors a forked child must not keep: an flock belongs to the open file, which fork
# shares, so a loader worker forked from the owner would hold the folder (no other rank could take
# it over after the owner closed) and a worker forked during a read would pin that shard.
_LOCKS_OF_PARENT: "weakref.WeakSet" = weakref.WeakSet()


def _drop_parent_locks() -> None:
    for obj in list(_LOCKS_OF_PARENT):
        obj._drop_locks()


os.register_at_fork(after_in_child=_drop_parent_locks)


class Held:
    """One shard's files, held (its lock file locked shared: no owner can evict them) until `close()`."""

    def __init__(self, paths: list[str], fds: list[int]):
        self.paths, self.fds = paths, fds
        _LOCKS_OF_PARENT.add(self)

    def _drop_locks(self) -> None:  # in a forked child: close our copies, the parent's lock stays
        self.close()

    @property
    def path(self) -> str:
        return self.paths[0]

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)  # releases the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardCache:
    """The cache of `url`'s shards in `folder`. `files[n]` lists shard n's files as (name, bytes,
    identity), the data file first (RecordIO adds its text sidecar). See the module docstring."""

    def __init__(self, url: str, files: list[list[tuple[str, int, str | None]]], folder: str, limit: int,
                 threads: int = 8):
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
        self.creator = os.getpid()
        self._parent: int | None = None  # set in a pickled copy: the process that sent it
        self._owner_fd: int | None = None
        self._cond = threading.Condition()
        self._present: dict[int, float] = {}  # shard -> when fetched (eviction order: oldest first)
        self._loading: set[int] = set()
        self._used = self.peak = 0
        self._counts = {"fetched": 0, "evicted": 0, "reused": 0, "bytes": 0}
        self._future: Callable[[], Iterable] | None = None
        self._window: list[int] | None = None
        self._error: str | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_claim = 0.0
        self._try_own()

    def path(self, n: int) -> str:
        return os.path.join(self.folder, self.names[n])

    def __getstate__(self):  # what a spawned worker needs to read: never the owner's state
        return {**self.__dict__, "_cond": None, "_thread": None, "_owner_fd": None, "_future": None,
                "_window": None, "creator": None, "_parent": os.getpid()}

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
                    want = f"{self.path(n)}.want.{os.getpid()}"
                    with open(want, "w") as f:  # ephemeral: no need to survive a crash (empty reads as 0)
                        f.write(str(int(position)))
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
                try:
                    os.remove(want)
                except FileNotFoundError:
                    pass

    def _lock_path(self, n: int) -> str:
        return self.path(n) + ".lock"

    def _try_lock(self, n: int) -> Held | None:
        """Shard n held against eviction if all its files are present, else None. The lock is on a
        lock file of its own, taken before any data file is opened: a reader never holds a file
        the owner has deleted, not even for the moment between an open and a lock."""
        fd = os.open(self._lock_path(n), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # the owner is evicting it
            os.close(fd)
            return None
        paths = [os.path.join(self.folder, name) for name, _, _ in self.files[n]]
        if not all(os.path.exists(p) for p in paths):
            os.close(fd)
            return None
        return Held(paths, [fd])

    # --- the owner ---

    def _try_own(self) -> bool:
        """Become the folder's owner if no other loader of the node is (flock: a dead owner's lock
        goes with it). A new owner adopts the verified files it finds."""
        if self._owner_fd is not None:
            return True
        fd = os.open(os.path.join(self.folder, ".owner"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._owner_fd = fd
        _LOCKS_OF_PARENT.add(self)
        self._scan()
        return True

    def _drop_locks(self) -> None:  # in a forked child (see _LOCKS_OF_PARENT)
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

    def _scan(self) -> None:
        """Adopt the complete, verified shards found in the folder; drop the rest (what a dead
        owner was downloading, files of another version of the data, errors of an earlier run)."""
        with self._cond:
            self._present, self._used = {}, 0
            entries = set(os.listdir(self.folder))
            for entry in entries:  # only the cache's own: index files beside them belong to others
                stem = entry.split(".tmp-")[0] if ".tmp-" in entry else entry[:-6] if entry.endswith(".error") else None
                if stem in self.numbers:
                    _remove(os.path.join(self.folder, entry))
            for n, files in enumerate(self.files):
                paths = [os.path.join(self.folder, name) for name, _, _ in files]
                if not any(name in entries for name, _, _ in files):
                    continue
                ok = all(is_verified(p, ident) for p, (_, _, ident) in zip(paths, files))
                if ok and self._used + self.sizes[n] <= self.limit:
                    self._present[n] = max(os.path.getmtime(p) for p in paths)
                    self._used += self.sizes[n]
                    self._counts["reused"] += 1
                elif not self._evict_files(n):  # in use by a reader: counted until it can go
                    self._present[n] = 0.0
                    self._used += self.sizes[n]
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
        with self._cond:
            return {"peak_bytes": self.peak, "used_bytes": self._used, "limit": self.limit, "owner": self.owner,
                    **self._counts}

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
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

    def __del__(self):
        if getattr(self, "_owner_fd", None) is not None and os.getpid() == self.creator:
            os.close(self._owner_fd)

    def _start(self) -> None:
        if self._thread is None and os.getpid() == self.creator:
            self._stop = False
            # The thread holds the cache only weakly, so a loader dropped without close() stops it.
            self._thread = threading.Thread(target=ShardCache._run, args=(weakref.ref(self), self._cond, self.threads),
                                            name="shard-cache", daemon=True)
            self._thread.start()

    def _requests(self) -> list[int]:
        """Shards readers wait for, earliest position first; requests of dead processes dropped."""
        asked = []
        for entry in os.listdir(self.folder):
            name, _, pid = entry.rpartition(".want.")
            if not name or name not in self.numbers or not pid.isdigit():
                continue
            path = os.path.join(self.folder, entry)
            if not _alive(int(pid)):
                _remove(path)
                continue
            try:
                with open(path) as f:
                    asked.append((int(f.read() or 0), self.numbers[name]))
            except (OSError, ValueError):
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
        for n in self._requests() + self._window:
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
        wanted = self._wanted()
        keep = set(wanted)
        for n in wanted:
            if n in self._present or n in self._loading:
                continue
            if len(self._loading) >= self.threads or not self._make_room(self.sizes[n], keep):
                break
            self._loading.add(n)
            self._used += self.sizes[n]
            self.peak = max(self.peak, self._used)
            pool.submit(self._fetch, n)

    def _make_room(self, need: int, keep: set[int]) -> bool:
        """Evict shards outside `keep` that no reader holds (oldest first) until `need` more bytes fit."""
        for _, n in sorted((t, n) for n, t in self._present.items() if n not in keep):
            if self._used + need <= self.limit:
                break
            if self._evict_files(n):
                del self._present[n]
                self._used -= self.sizes[n]
                self._counts["evicted"] += 1
        return self._used + need <= self.limit

    def _evict_files(self, n: int) -> bool:
        """Delete shard n's files unless a reader holds the shard (then nothing is deleted)."""
        fd = os.open(self._lock_path(n), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            for name, _, _ in self.files[n]:
                path = os.path.join(self.folder, name)
                _remove(path)
                _remove(marker(path))
        finally:
            os.close(fd)
        return True

    def _fetch(self, n: int) -> None:
        try:
            for name, size, identity in self.files[n]:
                path = os.path.join(self.folder, name)
                sha = identity[len("sha256:"):] if identity and identity.startswith("sha256:") else None
                download_file(join(self.url, name), path, size, sha)
                mark_verified(path, identity)
        except Exception as e:  # noqa: BLE001 - every failure must reach the readers
            url = join(self.url, self.names[n])
            message = str(e) if isinstance(e, StorageError) else f"fetching {url}: {type(e).__name__}: {e}"
            write_atomic(self.path(n) + ".error", message)
            with self._cond:
                self._error = message
                self._loading.discard(n)
                self._used -= self.sizes[n]
                self._cond.notify_all()
            return
        with self._cond:
            self._loading.discard(n)
            self._present[n] = time.time()
            self._counts["fetched"] += 1
            self._counts["bytes"] += self.sizes[n]
            self._cond.notify_all()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


__all__ = ["ShardCache", "Held", "WAIT_TIMEOUT_S"]
