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

The loader's node-wide cache of shard files is `pipelines/storage/shard_cache.py`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from typing import Callable

from pipelines.errors import StorageError
from pipelines.formats.base import file_digest

log = logging.getLogger("pipelines")

SCHEMES = ("s3",)
ATTEMPTS = 5  # per transfer
BACKOFF_S = 0.5  # first retry delay; doubles per attempt, with jitter
DEFAULT_CACHE_DIR = "~/.cache/lip-pipeline/shards"
DEFAULT_CACHE_LIMIT = "8GiB"  # parse_size gives bytes; text, so that lip-train --print-config shows it as written
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


# Requests this process sent, by kind ("listing", "reading", "downloading", ...): what
# `bench-scale` reports per open. One count per attempt (a retry is another request).
REQUESTS: Counter = Counter()


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
        REQUESTS[what] += 1
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


def list_files(url: str, etags: dict[str, str] | None = None) -> dict[str, int]:
    """Names (relative to `url`) -> bytes of the objects directly under the prefix `url`, and
    `name/` -> 0 for its subfolders. A missing bucket or empty prefix is an error. `etags`, when
    given, receives each object's ETag (what identifies a version of an object without a digest)."""
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
        if etags is not None and e["type"] != "directory" and e.get("ETag"):
            etags[name] = str(e["ETag"]).strip('"')
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


