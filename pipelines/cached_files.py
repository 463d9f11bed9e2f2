"""Files a node downloads once and keeps: where a url's cache folder is, how a cached file is
recognised as the object it copies (a marker `<name>.ok` with its identity, inode, size and mtime,
or its sha256), and `fetch_once` for the small files every rank of a node needs (manifests, the
folder index). The bounded cache of the shards themselves is pipelines/shard_cache.py."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re

from pipelines.formats.base import file_digest, write_atomic
from pipelines.storage import download_file


def cache_folder(cache_dir: str, url: str) -> str:
    """Where the shards of `url` are cached on this node: readable, and unique per url. Every rank
    of a node that uses the same `cache_dir` shares it."""
    path = url.split("://", 1)[-1]
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", path.strip("/"))[-80:]
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser(cache_dir), f"{tag}-{digest}")


def marker(path: str) -> str:
    """The file beside `path` that records which object it is."""
    return path + ".ok"


def mark_verified(path: str, identity: str | None) -> None:
    """Remember that the file at `path` is the object `identity` names (sha256 or etag)."""
    st = os.stat(path)
    write_atomic(marker(path), json.dumps({"identity": identity, "size": st.st_size, "ino": st.st_ino,
                                            "mtime_ns": st.st_mtime_ns}))


def is_verified(path: str, identity: str | None) -> bool:
    """Whether the file at `path` is known to be `identity`: its marker says so for this very file,
    or (no marker, a sha256 identity) its digest matches, which is then remembered."""
    if identity is None:
        return False
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    try:
        with open(marker(path)) as f:
            m = json.load(f)
        if (m.get("identity"), m.get("size"), m.get("ino"), m.get("mtime_ns")) == \
                (identity, st.st_size, st.st_ino, st.st_mtime_ns):
            return True
    except (OSError, ValueError):
        pass
    if identity.startswith("sha256:") and file_digest(path) == identity[len("sha256:"):]:
        mark_verified(path, identity)
        return True
    return False


def identity_of(sha256: str | None, etag: str | None = None) -> str | None:
    """How a cached file is recognised: its sha256 when the manifest or index gives one, else the
    store's ETag, else nothing (then nothing is adopted from an earlier run)."""
    if sha256:
        return f"sha256:{sha256}"
    return f"etag:{etag}" if etag else None


def fetch_once(url: str, local: str, size: int | None, identity: str | None, sha256: str | None = None) -> str:
    """`url` at `local`, downloaded at most once per node: the ranks of a node that ask at the same
    time wait for the first one (a lock file), and a copy whose marker shows the expected
    `identity` (`identity_of`) is used as it is. `sha256` is checked on download. Returns `local`."""
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fd = os.open(local + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not is_verified(local, identity):
            download_file(url, local, size, sha256)
            mark_verified(local, identity)
    finally:
        os.close(fd)
    return local
