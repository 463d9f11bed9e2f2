"""Object storage (`s3://bucket/prefix`) for shards: url helpers, transfers with retries, and the
loader's bounded local cache of shard files.

Endpoint and credentials come from the standard AWS environment: `AWS_ENDPOINT_URL_S3` (or
`AWS_ENDPOINT_URL`) for an S3-compatible server, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
`AWS_SESSION_TOKEN` or `AWS_PROFILE`, `AWS_REGION` / `AWS_DEFAULT_REGION`. botocore reads all of
them itself; the endpoint is also passed explicitly so that an s3fs that builds its client with
its own `endpoint_url=None` cannot shadow the variable.

Transfers retry transient errors (dropped connections, timeouts, 5xx, a short read) with
exponential backoff and a bounded number of attempts; a missing object, a missing bucket, a
refused credential fail at once. Local writes are atomic (a temporary name, then a rename), so a
killed download never leaves a file under its final name.

The cache (`ShardCache`): the epoch plan is a deterministic function of (seed, epoch), so the
loader knows every shard it will read and in which order. One process, the loader's main process,
owns the cache directory: a background thread fetches shards in order of first future use, as far
ahead as `limit` bytes allow, and evicts a shard only when room is needed and only one outside that
window (next use farthest away, or never: Belady's rule). Readers — the main process or any worker
process (DataLoader, DALI) — only wait until a shard's final file exists. Why one owner instead of
lock files: only the main process sees how far the trainer has consumed the plan, so only it can
tell which shard is no longer needed; with one owner the byte accounting is exact, and nothing
(no stale lock of a killed worker) can wedge the directory.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from pipelines.formats.base import file_digest

log = logging.getLogger("pipelines")

SCHEMES = ("s3",)
ATTEMPTS = 5  # per transfer
BACKOFF_S = 0.5  # first retry delay; doubles per attempt, with jitter
WAIT_TIMEOUT_S = 900.0  # a reader waiting longer for a shard gives up (the owner must be gone)
DEFAULT_CACHE_DIR = "~/.cache/lip-pipeline/shards"
DEFAULT_CACHE_LIMIT = 8 << 30
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


class StorageError(RuntimeError):
    """A transfer or listing that failed for good: names the url and what to check."""


class _ShortRead(OSError):
    """A transfer that delivered fewer bytes than listed (a dropped connection): transient."""


def is_remote(url: str) -> bool:
    return isinstance(url, str) and re.match(r"^[a-z][a-z0-9+.-]*://", url) is not None \
        and not url.startswith("file://")


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as "8GiB", "500MB", "1e9"."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"size {value!r}: expected bytes or a number with a unit (KB, MB, GB, KiB, MiB, GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


_FILESYSTEMS: dict[tuple, object] = {}


def filesystem(url: str):
    """The fsspec filesystem for `url`, one per process (s3fs's event loop does not survive a
    fork, so a forked process builds its own)."""
    scheme = url.split("://", 1)[0]
    if scheme not in SCHEMES:
        raise StorageError(f"{url}: unsupported storage scheme {scheme}://; use a local folder or s3://bucket/prefix")
    try:
        import s3fs
    except ImportError:
        raise StorageError(f"{url}: reading s3:// needs s3fs; install it with pip install '.[s3]'") from None
    key = (os.getpid(), endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    if key not in _FILESYSTEMS:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        kwargs = {"client_kwargs": {"region_name": region}} if region else {}
        _FILESYSTEMS[key] = s3fs.S3FileSystem(endpoint_url=endpoint(), skip_instance_cache=True, **kwargs)
    return _FILESYSTEMS[key]


def _transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, StorageError)):
        return False
    name, module = type(e).__name__, type(e).__module__
    if module.startswith("botocore"):  # credentials and parameters are not going to fix themselves
        return not re.search(r"Credential|Param|Validation|NoRegion|UnknownService", name)
    if module.startswith(("aiohttp", "urllib3", "http.client", "asyncio")):
        return True
    return isinstance(e, (OSError, TimeoutError))  # s3fs: 5xx and unknown codes arrive as OSError


def _explain(e: BaseException, url: str) -> str:
    if isinstance(e, FileNotFoundError):
        return (f"{url}: not found (no such bucket, prefix or object); check the url and the endpoint "
                f"({endpoint() or 'AWS'})")
    if isinstance(e, PermissionError) or "Credential" in type(e).__name__:
        return (f"{url}: access refused ({e}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE) for this bucket")
    return f"{url}: {type(e).__name__}: {e}"


def retrying(what: str, url: str, fn: Callable[[], object], attempts: int = ATTEMPTS):
    """`fn()` with retries on transient errors: exponential backoff with jitter, at most `attempts`
    tries; the final error names the url and what to check."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below, re-raised as StorageError
            if not _transient(e):
                if isinstance(e, StorageError):
                    raise
                raise StorageError(f"{what} failed: {_explain(e, url)}") from e
            if attempt == attempts:
                raise StorageError(f"{what} {url} failed after {attempts} attempts ({type(e).__name__}: {e}); "
                                   f"check the network and the endpoint ({endpoint() or 'AWS'})") from e
            delay = BACKOFF_S * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s %s: %s; retrying in %.1f s (attempt %d of %d)", what, url, e, delay, attempt + 1, attempts)
            time.sleep(delay)


def _path(url: str) -> str:
    return url.split("://", 1)[1]


def list_files(url: str) -> dict[str, int]:
    """Names (relative to `url`) -> bytes of the objects directly under the prefix `url`, and
    `name/` -> 0 for its subfolders. A missing bucket or empty prefix is an error."""
    fs = filesystem(url)

    def ls():
        fs.invalidate_cache(_path(url))
        return fs.ls(_path(url), detail=True)
    try:
        entries = retrying("listing", url, ls)
    except StorageError as e:
        if not isinstance(e.__cause__, FileNotFoundError):
            raise
        bucket = _path(url).split("/", 1)[0]
        if not retrying("checking", url, lambda: fs.exists(bucket)):
            raise StorageError(f"{url}: bucket {bucket} does not exist at {endpoint() or 'AWS'}; check the url "
                               "and AWS_ENDPOINT_URL") from None
        entries = []
    out = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        out[name + "/" if e["type"] == "directory" else name] = 0 if e["type"] == "directory" else int(e["size"])
    if not out:
        raise StorageError(f"{url}: no objects under this prefix; check the url (make-shards --out writes here)")
    return out


def exists(url: str) -> bool:
    fs = filesystem(url)
    return bool(retrying("checking", url, lambda: fs.exists(_path(url))))


def read_bytes(url: str) -> bytes:
    fs = filesystem(url)
    return retrying("reading", url, lambda: fs.cat_file(_path(url)))


def read_json(url: str):
    try:
        return json.loads(read_bytes(url))
    except ValueError as e:
        raise StorageError(f"{url}: not valid JSON ({e}); rewrite it with make-shards") from None


def write_bytes(url: str, data: bytes) -> None:
    fs = filesystem(url)
    retrying("writing", url, lambda: fs.pipe_file(_path(url), data))


def upload_file(local: str, url: str) -> None:
    """Put a local file at `url` (S3 objects appear whole or not at all), with retries."""
    fs = filesystem(url)
    retrying("uploading", url, lambda: fs.put_file(local, _path(url)))


def download_file(url: str, local: str, size: int | None = None, sha256: str | None = None) -> None:
    """Fetch `url` to `local` atomically (temporary name, then rename), with retries. `size` and
    `sha256` (from the listing or manifest.json) are checked before the file gets its name."""
    fs = filesystem(url)
    tmp = f"{local}.tmp-{os.getpid()}-{threading.get_ident()}"

    def once():
        try:
            fs.get_file(_path(url), tmp)
            got = os.path.getsize(tmp)
            if size is not None and got != size:
                raise _ShortRead(errno.EIO, f"received {got} of {size} bytes")
            if sha256 and file_digest(tmp) != sha256:
                raise _ShortRead(errno.EIO, "sha256 differs from manifest.json (corrupt transfer, or the "
                                            "object is not the one the manifest lists: re-upload the folder)")
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    retrying("downloading", url, once)


# --- the loader's shard cache --------------------------------------------------------------------

def cache_folder(cache_dir: str, url: str, rank: int) -> str:
    """Where the shards of `url` are cached for one rank: readable, and unique per url."""
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", _path(url).strip("/"))[-80:]
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser(cache_dir), f"{tag}-{digest}", f"rank{rank}")


class ShardCache:
    """A bounded local copy of the shard files `names` (under the folder `url`), fetched ahead of
    a schedule of future use. See the module docstring for the policy.

    The owner (the process that built the cache) runs the fetch thread; every process, workers
    included, reads through `acquire(n)`, which returns the local path of shard n once present.
    `schedule(future)` gives the order of use from the reader's current position: `future()`
    yields arrays of shard numbers in order of use. `stats()` reports peak bytes, fetches and
    evictions. A failed fetch leaves `<name>.error` beside the shards so waiting workers raise it.
    """

    def __init__(self, url: str, names: list[str], sizes: list[int], digests: list[str | None],
                 folder: str, limit: int, threads: int = 8):
        self.url, self.names, self.sizes, self.digests = url, names, sizes, digests
        self.folder, self.limit, self.threads = folder, limit, threads
        self.owner = os.getpid()
        self.in_use = len(names)  # how many distinct shards a schedule can name (bad ones are left out)
        self.numbers = {name: n for n, name in enumerate(names)}  # file name -> shard number
        big = max(range(len(sizes)), key=sizes.__getitem__)
        if sizes[big] > limit:
            raise ValueError(f"{join(url, names[big])} is {human(sizes[big])}, larger than cache_limit "
                             f"{human(limit)}; raise cache_limit")
        os.makedirs(folder, exist_ok=True)
        self._lock_fd: int | None = None
        self._claim()
        self._cond = threading.Condition()
        self._present: dict[int, float] = {}  # shard -> when fetched (eviction tie-break: oldest first)
        self._loading: set[int] = set()
        self._used = self.peak = 0
        self._counts = {"fetched": 0, "evicted": 0, "reused": 0, "bytes": 0}
        self._future: Callable[[], Iterator] | None = None
        self._window: list[int] | None = None
        self._error: str | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._scan()

    def _scan(self) -> None:
        """Adopt complete shards a previous run left (size must match), drop everything else."""
        for entry in os.listdir(self.folder):
            path = os.path.join(self.folder, entry)
            n = self.numbers.get(entry)
            if n is not None and os.path.getsize(path) == self.sizes[n] and self._used + self.sizes[n] <= self.limit:
                self._present[n] = os.path.getmtime(path)
                self._used += self.sizes[n]
                self._counts["reused"] += 1
            elif ".tmp-" in entry or entry.endswith((".want", ".error")) or n is not None:
                os.remove(path)
        self.peak = self._used

    def path(self, n: int) -> str:
        return os.path.join(self.folder, self.names[n])

    def __getstate__(self):  # what a spawned worker needs to read: never the owner's thread
        return {**self.__dict__, "_cond": None, "_thread": None, "_lock_fd": None, "_future": None, "_window": None}

    # --- readers (any process) ---

    def acquire(self, n: int) -> tuple[str, os.stat_result]:
        """(local path, its stat) of shard n, waiting until it is present. A reader that waits
        leaves a `.want` file, so the owner fetches a shard its schedule did not foresee."""
        path, waited, delay, asked = self.path(n), 0.0, 0.001, False
        while True:
            try:
                return path, os.stat(path)
            except FileNotFoundError:
                pass
            if os.getpid() == self.owner:
                self.check()
                self._start()
            if os.path.exists(path + ".error"):
                with open(path + ".error") as f:
                    raise StorageError(f.read())
            # A worker asks after a moment (the schedule usually has it coming); the owner asks at
            # once when it follows no schedule (a ShardSet read directly, not through a Loader).
            if not asked and (waited > 0.2 or (os.getpid() == self.owner and self._future is None)):
                open(path + ".want", "a").close()
                asked = True
                if os.getpid() == self.owner:
                    with self._cond:
                        self._cond.notify_all()
            if waited > WAIT_TIMEOUT_S:
                raise StorageError(f"waited {waited:.0f} s for {join(self.url, self.names[n])} to reach the cache "
                                   f"{self.folder}; is the loader's main process still running?")
            time.sleep(delay)
            waited += delay
            delay = min(2 * delay, 0.05)

    # --- the owner ---

    def schedule(self, future: Callable[[], Iterable]) -> None:
        """Follow a new position: `future()` yields arrays of shard numbers in order of use."""
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
            return {"peak_bytes": self.peak, "used_bytes": self._used, "limit": self.limit, **self._counts}

    def close(self) -> None:
        """Stop fetching and free the directory for another loader (reuse claims it again)."""
        if os.getpid() != self.owner or self._cond is None:
            return
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self):
        if getattr(self, "_lock_fd", None) is not None and os.getpid() == self.owner:
            os.close(self._lock_fd)

    def _claim(self) -> None:
        """Own the folder: one loader per cache folder, or the byte accounting would be wrong."""
        import fcntl

        fd = os.open(os.path.join(self.folder, ".owner"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"{self.folder}: cache in use by another loader of {self.url}; give each "
                               "run its own cache_dir") from None
        self._lock_fd = fd

    def _start(self) -> None:
        if self._thread is None:
            if self._lock_fd is None:
                self._claim()
            self._stop = False
            # The thread holds the cache only weakly, so a loader dropped without close() stops it.
            self._thread = threading.Thread(target=ShardCache._run, args=(weakref.ref(self), self._cond, self.threads),
                                            name="shard-cache", daemon=True)
            self._thread.start()

    def _wanted(self) -> list[int]:
        """Shards asked for by waiting readers, then the schedule's shards in order of first use,
        as many as fit in the limit together."""
        asked = [self.numbers[e[:-5]] for e in os.listdir(self.folder)
                 if e.endswith(".want") and e[:-5] in self.numbers]
        if self._window is None:
            self._window, total = [], 0
            seen: set[int] = set()
            for chunk in (self._future() if self._future else ()):
                for n in chunk:
                    n = int(n)
                    if n in seen:
                        continue
                    if total + self.sizes[n] > self.limit:
                        break
                    seen.add(n)
                    total += self.sizes[n]
                    self._window.append(n)
                    if len(seen) == self.in_use:  # every shard already: the rest cannot change the window
                        break
                else:
                    continue
                break
        out, total = [], 0
        for n in asked + self._window:
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
                        cache._step(pool)
                    except Exception as e:  # noqa: BLE001 - readers must hear of it, not wait forever
                        cache._error = f"shard cache of {cache.url}: {type(e).__name__}: {e}"
                    del cache
                    cond.wait(0.05)

    def _step(self, pool: ThreadPoolExecutor) -> None:
        """Start the fetches the window calls for and room allows (under the lock)."""
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
        """Evict shards outside `keep` (oldest first) until `need` more bytes fit."""
        victims = sorted((t, n) for n, t in self._present.items() if n not in keep)
        while self._used + need > self.limit and victims:
            _, n = victims.pop(0)
            try:
                os.remove(self.path(n))
            except FileNotFoundError:
                pass
            del self._present[n]
            self._used -= self.sizes[n]
            self._counts["evicted"] += 1
        return self._used + need <= self.limit

    def _fetch(self, n: int) -> None:
        url = join(self.url, self.names[n])
        try:
            download_file(url, self.path(n), self.sizes[n], self.digests[n])
        except Exception as e:  # noqa: BLE001 - every failure must reach the readers
            message = str(e) if isinstance(e, StorageError) else f"fetching {url}: {type(e).__name__}: {e}"
            with open(self.path(n) + ".error", "w") as f:
                f.write(message)
            with self._cond:
                self._error = message
                self._loading.discard(n)
                self._used -= self.sizes[n]
                self._cond.notify_all()
            return
        want = self.path(n) + ".want"
        if os.path.exists(want):
            os.remove(want)
        with self._cond:
            self._loading.discard(n)
            self._present[n] = time.time()
            self._counts["fetched"] += 1
            self._counts["bytes"] += self.sizes[n]
            self._cond.notify_all()
