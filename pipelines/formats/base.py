"""The writer base class every shard format shares.

A writer owns one shard: it writes under temporary names and only `close()` renames the files to
their final names, so a killed conversion never leaves a half-written shard that looks finished.
Byte-identical output for identical input is part of the contract (the converter's determinism
and resume tests compare files), so writers must not embed times, hostnames or random ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipelines.schema import Sample

TMP_SUFFIX = ".tmp"
_ATOMIC_TMP = re.compile(r"\.tmp-\d+-\d+$")  # write_atomic's temporary names
# Test hook (tools/fault_hooks.py installs one): called as hook("write", path) once the temporary
# file is complete, just before the rename, and hook("wrote", path) just after it, so a test can
# kill a process at exactly those instants.
atomic_write_hook: Callable[[str, str], None] | None = None


def shard_stem(index: int) -> str:
    return f"{index:06d}"


@dataclass
class ShardFiles:
    """What one closed shard left on disk: file name -> (bytes, sha256)."""

    stem: str
    samples: int
    files: dict[str, dict] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


DEFAULT_OPEN_SHARDS = 64  # shard files one process keeps mapped (OpenShards)


class MappedFile:
    """A whole file mapped read-only, as a numpy uint8 array, holding no descriptor: the
    loader's hot path takes views of it, so image bytes are copied once (into DALI's shared
    memory), not twice as with `pread`. The mapping goes when `close()` has dropped it and no
    view of it is left."""

    def __init__(self, path: str):
        self.path = path
        mm = pa.memory_map(path, "r")
        try:
            self.buf = np.frombuffer(mm.read_buffer(), np.uint8)
        finally:
            mm.close()

    copies = False  # `read` gives views into the map: a caller that holds them copies them

    def read(self, offset: int, size: int) -> np.ndarray:
        """uint8 [≤ size]: a view of the bytes at `offset` (fewer where the file ends first)."""
        return self.buf[offset:offset + size]

    def close(self) -> None:
        self.buf = None


class ShardFile:
    """A shard read by offset: one `pread` per sample (Arrow: per column) into memory this process
    owns, no mapping. What a shard a batch reads a few samples of gets (`shardset.MAP_FROM`; under a
    global shuffle over more shards than `OpenShards` keeps, most reads: at 1,000 shards and 64 kept,
    ~94 % of them miss the kept set). Mapping a shard cost about 30 µs (the map, its page faults, the
    unmap when it left the set); a `pread`, one call and a copy of the sample's bytes. The descriptor
    lives until `close()`, which the reader calls once the batch's samples from this shard are read."""

    copies = True  # `read` gives bytes of this process's own: nothing to copy, nothing held open

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def read(self, offset: int, size: int) -> np.ndarray:
        """uint8 [≤ size]: the bytes at `offset` (fewer where the file ends first)."""
        return np.frombuffer(os.pread(self.fd, size, offset), np.uint8)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class OpenShards:
    """The shard files one process has open (mapped), at most `capacity` of them: the least
    recently used is closed when another opens, and `close()` closes them all. A forked process
    starts with none of its parent's (it maps what it reads itself); pickling sends none."""

    def __init__(self, capacity: int = DEFAULT_OPEN_SHARDS):
        if capacity < 1:
            raise ValueError(f"at least one shard must stay open, not {capacity}")
        self.capacity = capacity
        self._open: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def get(self, key, opener: Callable[[], Any]):
        if self._pid != os.getpid():  # a forked child: the parent's handles are not ours to use
            self._open, self._pid = OrderedDict(), os.getpid()
        handle = self._open.get(key)
        if handle is not None:
            self._open.move_to_end(key)
            return handle
        handle = self._open[key] = opener()
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        return handle

    def holds(self, key) -> bool:
        """Whether `key` is open in this process (its place in the order unchanged)."""
        return self._pid == os.getpid() and key in self._open

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in self._open.values():
                handle.close()
        self._open.clear()

    def __len__(self) -> int:
        return len(self._open) if self._pid == os.getpid() else 0

    def __getstate__(self):
        return {"capacity": self.capacity, "_open": OrderedDict(), "_pid": None}


def write_atomic(path: str, data: bytes | str) -> None:
    """Write a whole file so that no reader ever sees it partial, even after a SIGKILL or a power
    cut: a temporary file beside it (unique per process and thread), flushed and fsynced, renamed
    over `path`, then the folder fsynced so the rename itself is durable. A kill leaves either the
    old file or the new one, plus at worst a `*.tmp-*` file the tools clear on their next run."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if atomic_write_hook is not None:
            atomic_write_hook("write", path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if atomic_write_hook is not None:
        atomic_write_hook("wrote", path)
    fsync_dir(folder)


def write_json_atomic(path: str, obj, **dumps) -> None:
    """`write_atomic` of `json.dumps(obj, **dumps)` plus a final newline (defaults: indent 1,
    sorted keys: the metadata files' layout)."""
    dumps = {"indent": 1, "sort_keys": True, **dumps}
    write_atomic(path, json.dumps(obj, **dumps) + "\n")


def is_partial_write(name: str) -> bool:
    """A file a killed writer left behind: a shard file under `*.tmp` or a `write_atomic`
    temporary file (`*.tmp-<pid>-<thread>`)."""
    return name.endswith(TMP_SUFFIX) or bool(_ATOMIC_TMP.search(name))


def remove_partial_writes(folder: str, prefix: str = "") -> list[str]:
    """Delete what killed writers left in `folder` (only names starting with `prefix`); the
    tools call it before they write there again. Returns the names removed."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    removed = [n for n in sorted(names) if n.startswith(prefix) and is_partial_write(n)]
    for name in removed:
        os.remove(os.path.join(folder, name))
    return removed


def holds_only_partial_writes(folder: str) -> bool:
    """True when nothing under `folder` but what killed writers leave (and empty folders): a run
    killed before its first complete write, which its rerun may take over."""
    return all(is_partial_write(name) for _, _, names in os.walk(folder) for name in names)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str) -> None:
    """Make renames and new names in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter(ABC):
    """Write the samples of one shard. Subclasses set `suffixes` (first = the data file)."""

    format: str = ""
    suffixes: tuple[str, ...] = ()

    def __init__(self, folder: str, index: int, with_tokens: bool = False):
        self.folder = folder
        self.stem = shard_stem(index)
        self.with_tokens = with_tokens
        self.count = 0
        os.makedirs(folder, exist_ok=True)

    def path(self, suffix: str, tmp: bool = False) -> str:
        return os.path.join(self.folder, f"{self.stem}{suffix}" + (TMP_SUFFIX if tmp else ""))

    def write(self, sample: Sample) -> None:
        if self.with_tokens and sample.tokens is None:
            raise ValueError(f"{self.path(self.suffixes[0])}: sample {sample.key} has no tokens "
                             "but the shard was opened with tokens")
        self._write(sample)
        self.count += 1

    @abstractmethod
    def _write(self, sample: Sample) -> None: ...

    @abstractmethod
    def _finish(self) -> None:
        """Flush and close the temporary files."""

    def close(self) -> ShardFiles:
        """Finish the shard and move it to its final names. An empty shard leaves no files."""
        self._finish()
        out = ShardFiles(self.stem, self.count)
        for suffix in self.suffixes:
            tmp = self.path(suffix, tmp=True)
            if self.count == 0:
                os.remove(tmp)
                continue
            # Data file last: a reader that sees the data file also finds its index.
            final = self.path(suffix)
            out.files[os.path.basename(final)] = {"bytes": os.path.getsize(tmp), "sha256": file_digest(tmp)}
            # On disk before the completion record that names it is (that one is fsynced too).
            fsync_file(tmp)
        if self.count:
            for suffix in self.suffixes[1:] + self.suffixes[:1]:
                os.replace(self.path(suffix, tmp=True), self.path(suffix))
            fsync_dir(self.folder)
        return out

    def abort(self) -> None:
        try:
            self._finish()
        except Exception:  # noqa: BLE001 - aborting after an error; the original error matters
            pass
        for suffix in self.suffixes:
            if os.path.exists(self.path(suffix, tmp=True)):
                os.remove(self.path(suffix, tmp=True))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
