"""Files a node downloads once and keeps: where a url's cache folder is (per dataset version, and
per host when `cache_dir` is on a shared filesystem), how a cached file is recognised as the
object it copies (a marker `<name>.ok` with its identity, inode, size and mtime, or its sha256),
and `fetch_once` for the small files every rank of a node needs (the folder index). The bounded
cache of the shards themselves is pipelines/storage/shard_cache.py.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket

from pipelines.storage.cache_locks import LockFile
from pipelines.formats.base import file_digest, write_atomic
from pipelines.storage.remote import download_file


# Filesystems that one mount shows to many hosts: a cache folder there is not a node's own.
NETWORK_FS = {"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "beegfs", "afs",
              "panfs", "wekafs", "ocfs2", "gfs2", "9p", "fuse.glusterfs", "fuse.ceph", "fuse.ceph-fuse",
              "fuse.sshfs", "fuse.juicefs", "fuse.gcsfuse", "fuse.s3fs", "fuse.rclone", "fuse.lustre"}


def fs_type(path: str, mounts: str = "/proc/mounts") -> str:
    """The type of the filesystem `path` (or its nearest existing parent) lies on, from the mount
    table ("" when unknown): statvfs does not tell, the longest mount point above it does."""
    path = os.path.realpath(os.path.expanduser(path))
    best, kind = "", ""
    try:
        with open(mounts) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])  # \040: a space
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, parts[2]
    except OSError:
        return ""
    return kind


def node_root(cache_dir: str) -> str:
    """Where this node's cache folders lie: `cache_dir` itself on a local disk (shared by every
    container of the node that mounts it), `cache_dir/host-<hostname>` on a network filesystem
    (NFS, Lustre, GPFS, ...), where one folder would be one cache for all nodes: each host then
    keeps its own cache and its own `cache_limit`, and no lock has to work across hosts."""
    cache_dir = os.path.expanduser(cache_dir)
    if fs_type(cache_dir) in NETWORK_FS:
        host = re.sub(r"[^A-Za-z0-9._-]+", "_", socket.gethostname()) or "unknown"
        return os.path.join(cache_dir, f"host-{host}")
    return cache_dir


def content_version(*what) -> str:
    """A dataset version's folder name: a digest of what identifies its contents (the manifest,
    which lists every file's sha256, or a listing's sizes and ETags)."""
    return "v-" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_folder(cache_dir: str, url: str, version: str | None = None) -> str:
    """Where `url`'s files are cached on this node: readable, unique per url, and with `version`
    (`content_version`) one subfolder per dataset version, so that no process ever takes a file
    of one version for another's. Every rank of a node that uses the same `cache_dir` shares it."""
    path = url.split("://", 1)[-1]
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", path.strip("/"))[-80:]
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:10]
    folder = os.path.join(node_root(cache_dir), f"{tag}-{digest}")
    return os.path.join(folder, version) if version else folder


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


def is_marked(path: str, identity: str | None) -> bool:
    """Whether the file at `path` is the one its marker names as `identity`: what a reader checks
    before it reads (no hashing; a file without a matching marker is not there yet)."""
    try:
        st = os.stat(path)
        with open(marker(path)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return (m.get("identity"), m.get("size"), m.get("ino"), m.get("mtime_ns")) == \
        (identity, st.st_size, st.st_ino, st.st_mtime_ns)


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
    lock = LockFile(local + ".lock")  # a child forked meanwhile must not keep the other ranks waiting
    try:
        fcntl.flock(lock.fd, fcntl.LOCK_EX)
        if not is_verified(local, identity):
            download_file(url, local, size, sha256)
            mark_verified(local, identity)
    finally:
        lock.close()
    return local
