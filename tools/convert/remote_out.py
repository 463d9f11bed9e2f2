"""`make-shards --out s3://bucket/prefix`: convert into a local staging folder, publish shard by shard.

The conversion itself is the local one (same writers, same bytes); only where finished files go
differs. Each shard is uploaded by the worker that wrote it (a pool worker or a Ray task on any
node), data files first and the shard's completion record last, so a store holding a record holds
the whole shard. The worker then deletes the shard's data files (.tar/.arrow/.rec) from staging:
a conversion larger than the local disk needs room for a few shards only. The small files
(records, .idx, .jsonl) stay in staging; the driver pulls any it lacks from the store (a Ray
worker on another node wrote them, or this is a resume on another machine), writes the manifests
from them as for a local folder, and uploads `manifest.json` last: a reader never sees a manifest
naming a shard that is not there.
The store is the truth: before a resume, staging's records of shards the store holds no record of
(an upload that failed, a run killed between two uploads) are dropped, so those shards are
converted and uploaded again; the manifest is uploaded only once the store holds every record.
"""
from __future__ import annotations

import hashlib
import os
import re

from pipelines.storage import remote as storage
from pipelines.errors import StorageError
from tools.fault_hooks import point

DATA_SUFFIXES = (".tar", ".arrow", ".rec")
PARTS_DIR = ".parts"
FINAL_FILES = ("all.idx", "index.bin", "sizes.json", "stats.json", "manifest.json")  # manifest last


def default_staging(url: str) -> str:
    """One staging folder per output url, so two conversions never share one."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1]).strip("_")[:80]
    digest = hashlib.sha256(url.encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser("~/.cache/lip-pipeline/staging"), f"{name}-{digest}")


def listing(url: str) -> dict[str, int]:
    """Objects directly under `url` (name -> bytes); {} when the prefix holds nothing yet."""
    try:
        return storage.list_files(url)
    except StorageError as e:
        if "no objects under this prefix" in str(e):
            return {}
        raise


def check_target(url: str, formats: tuple[str, ...], overwrite: bool) -> None:
    """Refuse a prefix holding files make-shards did not write (as for a local --out); clear it
    under --overwrite."""
    fs = storage.filesystem(url)
    for fmt in formats:
        target = storage.join(url, fmt)
        held = listing(target)
        if not held:
            continue
        if overwrite:
            storage.retrying("deleting", target, lambda: fs.rm(target.split("://", 1)[1], recursive=True))
        elif PARTS_DIR + "/" not in held:
            raise ValueError(f"{target} already holds objects that make-shards did not write; "
                             "choose another --out or pass --overwrite")


RECORD = re.compile(r"^\d+\.json$")  # a shard's completion record in .parts/


def pull_small_files(url: str, staging: str, formats: tuple[str, ...]) -> None:
    """Make staging's records and indexes the store's: drop records the store does not hold,
    download what staging lacks or holds at another size (never the data files)."""
    for fmt in formats:
        for sub in ("", PARTS_DIR):
            remote = storage.join(url, fmt, sub) if sub else storage.join(url, fmt)
            local = os.path.join(staging, fmt, sub)
            held = listing(remote)
            if sub == PARTS_DIR and os.path.isdir(local):
                for name in os.listdir(local):
                    if RECORD.match(name) and held.get(name) != os.path.getsize(os.path.join(local, name)):
                        os.remove(os.path.join(local, name))
            for name, size in held.items():
                if name.endswith("/") or name.endswith(DATA_SUFFIXES) or name in FINAL_FILES:
                    continue
                path = os.path.join(local, name)
                if not (os.path.exists(path) and os.path.getsize(path) == size):
                    os.makedirs(local, exist_ok=True)
                    storage.download_file(storage.join(remote, name), path, size=size)


def remote_sizes(url: str, formats: tuple[str, ...]) -> dict[str, dict[str, int]]:
    return {fmt: listing(storage.join(url, fmt)) for fmt in formats}


def upload(path: str, target: str) -> None:
    point(f"upload {target}")  # test hooks (tools/fault_hooks.py)
    storage.upload_file(path, target)
    point(f"uploaded {target}")


def publish_shard(url: str, staging: str, fmt: str, files: dict, record_path: str) -> None:
    """Upload one format's files of a finished shard, its piece of the folder index, then its
    record; drop the data files."""
    for name in sorted(files):
        upload(os.path.join(staging, fmt, name), storage.join(url, fmt, name))
    piece = record_path[: -len(".json")] + ".piece"
    if os.path.exists(piece):
        upload(piece, storage.join(url, fmt, PARTS_DIR, os.path.basename(piece)))
    upload(record_path, storage.join(url, fmt, PARTS_DIR, os.path.basename(record_path)))
    for name in files:
        if name.endswith(DATA_SUFFIXES):
            os.remove(os.path.join(staging, fmt, name))


def publish_plan(url: str, staging: str, formats: tuple[str, ...], plan_file: str) -> None:
    """Upload the plan before any shard: a prefix holding part of a conversion names it, so a
    resume from any machine (a fresh staging folder) recognises it instead of refusing it."""
    for fmt in formats:
        upload(os.path.join(staging, fmt, PARTS_DIR, plan_file), storage.join(url, fmt, PARTS_DIR, plan_file))


def publish_final(url: str, staging: str, formats: tuple[str, ...]) -> None:
    """Upload the folder files, manifest last, once the store holds every record staging holds
    (else a later resume from a fresh staging folder would convert those shards again)."""
    for fmt in formats:
        parts = os.path.join(staging, fmt, PARTS_DIR)
        held = listing(storage.join(url, fmt, PARTS_DIR))
        missing = sorted(n for n in os.listdir(parts)
                         if RECORD.match(n) and held.get(n) != os.path.getsize(os.path.join(parts, n)))
        if missing:
            raise StorageError(f"{storage.join(url, fmt)}: the store lacks the records of shards "
                                       f"{', '.join(missing[:5])}; rerun with --resume to convert them again")
        for name in FINAL_FILES:
            path = os.path.join(staging, fmt, name)
            if os.path.exists(path):
                upload(path, storage.join(url, fmt, name))
