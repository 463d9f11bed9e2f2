"""The node cache's liveness records, each a file held under an `flock` by the process it speaks
for: a reader's hold on a shard (`<shard>.lock`, shared), a reader's request for a missing shard
(`<shard>.want.<token>`, exclusive) and an owner's reservation for a download in flight
(`<shard>.loading`, exclusive). Another process asks whether such a record is live with a
non-blocking flock, never by pid: a pid means nothing across PID namespaces (one container per
rank sharing a node-local cache folder) and may belong to another process once its own has died.
A lock goes with the last descriptor of its holder, so a record of a process that died is stale
at once, whatever killed it. The cache itself is pipelines/storage/shard_cache.py.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref

WANT = ".want."
STALE_TEMP_S = 60.0  # a request still under its temporary name this long was left by a killed reader

# Lock descriptors a forked child must not keep: an flock belongs to the open file, which fork
# shares, so a loader worker forked from the owner would hold the folder (no other rank could take
# it over after the owner closed), a worker forked during a read would pin that shard, one forked
# during a reservation would hold the node's budget lock for as long as it lives (DALI forks its
# workers while the cache thread runs: seen), and one forked while a request waits would keep the
# request alive after its reader died. Every such descriptor is registered as it is opened, under
# a guard that fork waits for: os.open lets go of the GIL, so without it a fork could fall between
# the open and the registration.
_LOCKS_OF_PARENT: "weakref.WeakSet" = weakref.WeakSet()
_FORK_GUARD = threading.RLock()


def _before_fork() -> None:
    _FORK_GUARD.acquire()


def _after_fork_in_parent() -> None:
    _FORK_GUARD.release()


def _after_fork_in_child() -> None:
    global _FORK_GUARD
    _FORK_GUARD = threading.RLock()  # the parent's is held by the forking thread
    for obj in list(_LOCKS_OF_PARENT):
        try:
            obj._drop_locks()
        except OSError:  # one bad descriptor must not leave the others open
            pass


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def forget_in_child(obj) -> None:
    """`obj._drop_locks()` runs in every child forked while `obj` lives."""
    _LOCKS_OF_PARENT.add(obj)


class LockFile:
    """A descriptor on `path` (created if missing) that no forked child keeps: lock it with flock
    on `fd`; `close()` lets the lock go."""

    def __init__(self, path: str):
        with _FORK_GUARD:
            self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            forget_in_child(self)

    def _drop_locks(self) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


class Held:
    """One shard's files, held (its lock file locked shared: no owner can evict them) until `close()`."""

    def __init__(self, paths: list[str], locks: list[LockFile]):
        self.paths, self.locks = paths, locks  # each lock drops itself in a forked child

    @property
    def path(self) -> str:
        return self.paths[0]

    def close(self) -> None:
        locks, self.locks = self.locks, []
        for lock in locks:
            lock.close()  # releases the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Record:
    """A file at `path` that lives as long as this object holds it under an exclusive flock. It
    appears under its name already locked (written and locked under a temporary name, then
    renamed), so no one can take it for stale in between."""

    def __init__(self, path: str, text: str = ""):
        self.path = path
        tmp = f"{path}.tmp-{os.getpid()}"
        with _FORK_GUARD:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fd: int | None = fd
            forget_in_child(self)
        try:
            os.write(fd, text.encode())  # before the lock: a locked record is a whole one
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.replace(tmp, path)
        except BaseException:
            self.close()
            _remove(tmp)
            raise

    def _drop_locks(self) -> None:  # in a forked child: the record stays its parent's
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        """Withdraw the record: the name goes first, so no one sees it unlocked."""
        if self.fd is not None:
            _remove(self.path)
            fd, self.fd = self.fd, None
            os.close(fd)

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def want_token() -> str:
    """A request's name suffix: unique, and meaning nothing about liveness (the pid is there to
    help a person reading the folder)."""
    return f"{os.getpid()}-{os.urandom(4).hex()}"


def live_text(path: str) -> str | None:
    """The contents of the record at `path` if a process still holds it, else None (and a stale
    record is removed: its process died, or it was never locked)."""
    with _FORK_GUARD:  # a child must not keep even this brief shared lock
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: its process lives, in whatever PID namespace
                return os.pread(fd, 4096, 0).decode(errors="replace")
            if ".tmp-" in path and time.time() - os.fstat(fd).st_mtime < STALE_TEMP_S:
                return None  # a record being created right now: not stale, not yet a request
            _remove(path)
            return None
        finally:
            os.close(fd)


def try_lock(path: str, exclusive: bool) -> LockFile | None:
    """`path` (created if missing) held under flock, or None if another holds it."""
    lock = LockFile(path)
    try:
        fcntl.flock(lock.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


__all__ = ["Held", "LockFile", "Record", "forget_in_child", "live_text", "try_lock", "want_token", "WANT"]
