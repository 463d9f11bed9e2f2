"""The folder index (`index.bin`): one file per format folder holding, as compact memory-mapped
arrays, where every sample of every shard lies.

Opening a folder of 100 M samples must not cost 100 M Python objects per rank (the per-shard
`.idx` parsed into tuples cost 1.5 KB a sample), nor one request per shard in object storage. So
the converter writes, beside the shards, one index per folder:

    magic "LIPINDEX" | uint64 header length | JSON header | arrays, each 64-byte aligned

The JSON header holds the format, the shard names, the problems found while indexing (samples or
shards left out, with the reason), where each array lies and the file's length. The arrays:
    shards    [S]  per shard: first row, readable samples, data-file bytes and sha256, and for
                   RecordIO its text sidecar's bytes and sha256 (what a cache needs to fetch it)
    samples   [N]  per sample, in the format's own record layout (`SAMPLE_DTYPES`): byte offsets
                   and sizes of what the loader's hot path reads (absent from an Arrow folder's index
                   written before they were: such a folder is read through its tables)
    key_ends  [N]  uint64: end of each sample's key in `keys`
    keys      [K]  uint8: every key, UTF-8, end to end
    checks    [S]  uint32: per shard, CRC-32 of its rows in samples, key_ends and keys
and last a trailer, "LIPCRC32" | CRC-32 of magic, length and header | CRC-32 of `shards`.
A damaged file (cut short, bytes changed) must never open as another index: the lengths and the
trailer are checked at every open (O(shards): the header and the shards array), a shard's rows the
first time a process reads them (`verified`), so opening stays O(shards) at any sample count.
Rows are the samples a loader can read, shard after shard; samples that cannot be read (no image,
no text, past the end of the file) are left out and named in the header's problems, so a loader
applies its error policy without looking at them again.

The file is mapped without holding a descriptor (`pyarrow.memory_map`, then closed), so the ranks
and workers of a node share its pages through the page cache, a sample costs its bytes in the
arrays (about 50 B) and nothing in Python until a batch reads it, and pickling an index (a spawned
worker) sends only its path. Byte-identical for identical shards: no times, no host names.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipelines.errors import FolderIndexError
from pipelines.formats import base
from pipelines.formats.base import fsync_dir

INDEX_NAME = "index.bin"
MAGIC = b"LIPINDEX"
VERSION = 1
ALIGN = 64
MAX_MESSAGES = 10_000  # problem messages kept verbatim; counts per reason are always exact
TRAILER = b"LIPCRC32"
TRAILER_SIZE = len(TRAILER) + 8

SAMPLE_DTYPES = {
    # start: the sample's first tar header; span: bytes through its last member's padded data.
    # image/syn/tok: member data offsets relative to start (0 with size 0: no such member).
    "wds": np.dtype([("start", "<u8"), ("span", "<u4"), ("image", "<u4"), ("image_size", "<u4"),
                     ("syn", "<u4"), ("syn_size", "<u4"), ("tok", "<u4"), ("tok_size", "<u4")]),
    # start/span: the framed record; text/text_size: its line in the .jsonl sidecar; n_syn:
    # synthetic captions; n_tok: token rows (2 in the record, the rest in the sidecar line).
    "rec": np.dtype([("start", "<u8"), ("span", "<u4"), ("text", "<u8"), ("text_size", "<u4"),
                     ("n_syn", "<u2"), ("n_tok", "<u2")]),
    # image/image_size: the jpg bytes in the file; tok: the sample's 2 token rows (int32 [2, 77]),
    # 0: no tokens column; extra/n_extra: its rows beyond two (extra_tokens); n_syn: synthetic
    # captions. direct: 1 where every buffer lies in the file as stored (an uncompressed IPC stream,
    # what make-shards writes); 0 (a compressed foreign file): read through the table instead.
    "arrow": np.dtype([("image", "<u8"), ("image_size", "<u4"), ("tok", "<u8"), ("extra", "<u8"),
                       ("n_extra", "<u2"), ("n_syn", "<u2"), ("direct", "u1")]),
}
SHARD_DTYPE = np.dtype([("row0", "<u8"), ("count", "<u8"), ("bytes", "<u8"), ("sha256", "u1", 32),
                        ("text_bytes", "<u8"), ("text_sha256", "u1", 32), ("mtime_ns", "<i8")])


@dataclass
class Piece:
    """One shard's part of a folder index, as a format module's `index_piece` builds it."""

    name: str
    bytes: int
    samples: np.ndarray | None  # the format's SAMPLE_DTYPES record per readable sample (None: arrow)
    keys: list[str]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (reason, message), samples or the shard
    sha256: str | None = None
    text_bytes: int = 0
    text_sha256: str | None = None
    mtime_ns: int = 0  # 0 unless the index is a loader's cache of a folder it did not write

    def __post_init__(self):
        n = len(self.keys)
        if self.samples is not None and len(self.samples) != n:
            raise ValueError(f"{self.name}: {len(self.samples)} sample records for {n} keys")


def _descr(dtype: np.dtype):
    """A dtype as JSON: its type string, or for a record its fields [name, type, shape?]."""
    if dtype.names is None:
        return dtype.str
    return [[name, dtype.fields[name][0].base.str, list(dtype.fields[name][0].shape)] for name in dtype.names]


def _dtype(spec) -> np.dtype:
    if isinstance(spec, str):
        return np.dtype(spec)
    return np.dtype([(name, base, tuple(shape)) if shape else (name, base) for name, base, shape in spec])


def _digest(hexdigest: str | None) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hexdigest), np.uint8) if hexdigest else np.zeros(32, np.uint8)


def _hex(row) -> str | None:
    raw = bytes(row)
    return raw.hex() if any(raw) else None


class IndexWriter:
    """Streams pieces into an index file: per-sample sections go to temporary files as pieces
    arrive (memory stays one shard's worth whatever N), `close` writes header and sections."""

    def __init__(self, path: str, fmt: str):
        self.path, self.format = path, fmt
        self.dtype = SAMPLE_DTYPES[fmt]
        # Sections wait in files beside the target, named as every temporary file of the tools
        # (`<name>.tmp-<pid>-<n>`): a converter killed mid-write leaves nothing its next run does not
        # recognise and clear.
        self._tmp = {name: f"{path}.tmp-{os.getpid()}-{i}" for i, name in enumerate(("out", "samples", "key_ends", "keys"))}
        self._files = {name: open(self._tmp[name], "wb") for name in ("samples", "key_ends", "keys")}
        self.names: list[str] = []
        self.shards: list[tuple] = []
        self.problems: list[list] = []
        self.checks: list[int] = []
        self.reasons: Counter = Counter()
        self.rows = self.key_bytes = 0

    def add(self, piece: Piece) -> None:
        encoded = [k.encode("utf-8") for k in piece.keys]
        lengths = np.fromiter((len(k) for k in encoded), np.uint64, len(encoded))
        ends = self.key_bytes + np.cumsum(lengths, dtype=np.uint64)
        rows = np.ascontiguousarray(piece.samples, self.dtype).tobytes() if self.dtype is not None else b""
        ends, keys = ends.astype("<u8").tobytes(), b"".join(encoded)
        self._files["key_ends"].write(ends)
        self._files["keys"].write(keys)
        self._files["samples"].write(rows)
        self.checks.append(zlib.crc32(keys, zlib.crc32(ends, zlib.crc32(rows))))
        self.key_bytes += int(lengths.sum())
        s = len(self.names)
        self.names.append(piece.name)
        self.shards.append((self.rows, len(encoded), piece.bytes, _digest(piece.sha256), piece.text_bytes,
                            _digest(piece.text_sha256), piece.mtime_ns))
        for reason, message in piece.problems:
            self.reasons[reason] += 1
            if len(self.problems) < MAX_MESSAGES:
                self.problems.append([s, reason, message])
        self.rows += len(encoded)

    def close(self) -> str:
        """Write the index (temporary name, fsync, rename) and return its path."""
        for f in self._files.values():
            f.close()
        try:
            shards = np.array(self.shards, SHARD_DTYPE) if self.shards else np.zeros(0, SHARD_DTYPE)
            sections = [("shards", SHARD_DTYPE, len(shards), shards.tobytes()),
                        ("samples", self.dtype, self.rows if self.dtype is not None else 0, "samples"),
                        ("key_ends", np.dtype("<u8"), self.rows, "key_ends"),
                        ("keys", np.dtype("u1"), self.key_bytes, "keys"),
                        ("checks", np.dtype("<u4"), len(self.checks), np.array(self.checks, "<u4").tobytes())]
            header = {"format": self.format, "version": VERSION, "samples": self.rows, "names": self.names,
                      "problems": self.problems, "problem_counts": dict(sorted(self.reasons.items())),
                      "arrays": {}}
            # Offsets depend on the header's own length: lay the arrays out after a generous guess,
            # then grow the guess until the header fits before the first array.
            room = ALIGN
            while True:
                offset = room
                for name, dtype, count, _ in sections:
                    if dtype is None:
                        continue
                    header["arrays"][name] = {"offset": offset, "dtype": _descr(dtype), "count": count}
                    end = offset + count * dtype.itemsize
                    offset = -(-end // ALIGN) * ALIGN
                header["bytes"] = end + TRAILER_SIZE
                blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
                if len(MAGIC) + 8 + len(blob) <= room:
                    break
                room = -(-(len(MAGIC) + 8 + len(blob)) // ALIGN) * ALIGN
            tmp = self._tmp["out"]
            head = MAGIC + struct.pack("<Q", len(blob)) + blob
            with open(tmp, "wb") as out:
                out.write(head)
                for name, dtype, count, data in sections:
                    if dtype is None:
                        continue
                    out.write(b"\0" * (header["arrays"][name]["offset"] - out.tell()))
                    if isinstance(data, bytes):
                        out.write(data)
                    else:
                        with open(self._tmp[data], "rb") as src:
                            shutil.copyfileobj(src, out, 1 << 22)
                out.write(TRAILER + struct.pack("<II", zlib.crc32(head), zlib.crc32(sections[0][3])))
                out.flush()
                os.fsync(out.fileno())
            if base.atomic_write_hook is not None:  # the tools' kill-anywhere test hook, as write_atomic's
                base.atomic_write_hook("write", self.path)
            os.replace(tmp, self.path)
            if base.atomic_write_hook is not None:
                base.atomic_write_hook("wrote", self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        finally:
            self._clear()
        return self.path

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        self._clear()

    def _clear(self) -> None:
        for path in self._tmp.values():
            if os.path.exists(path):
                os.remove(path)


def write_index(path: str, fmt: str, pieces) -> str:
    """Write the index of `pieces` (an iterable of `Piece`, in shard order) to `path`."""
    writer = IndexWriter(path, fmt)
    try:
        for piece in pieces:
            writer.add(piece)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class FolderIndex:
    """A folder index mapped read-only. Arrays are numpy views into the mapping; pickling keeps
    the path only and the receiving process maps the file itself (the page cache is shared).
    That process (a spawned loader worker: DALI on the GPU) must map the very file its sender
    mapped, not one written at the same path since (a re-index, a new dataset version): the
    pickle carries the file's identity (device, inode, size, mtime) and another one is an error,
    never samples read at another version's offsets. Forked workers inherit the mapping itself."""

    def __init__(self, path: str):
        self.path = path
        self._load()

    def _load(self) -> None:
        try:
            mm = pa.memory_map(self.path, "r")
        except (OSError, pa.ArrowException) as e:
            raise FolderIndexError(f"{self.path}: cannot map the folder index ({e})") from None
        try:
            st = os.fstat(mm.fileno())  # of the file mapped, whatever the path names by now
            self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            buf = mm.read_buffer()
        finally:
            mm.close()  # the mapping lives while `buf` (and views of it) do; no descriptor stays open
        raw = np.frombuffer(buf, np.uint8)
        if len(raw) < len(MAGIC) + 8 or bytes(raw[:len(MAGIC)]) != MAGIC:
            raise FolderIndexError(f"{self.path}: not a folder index; delete it (a loader then indexes the "
                                   "folder into its cache) or rerun make-shards --resume to write it")
        header, arrays = self._parse(raw, buf)
        self.header = header
        self.format: str = header["format"]
        self.names: list[str] = header["names"]
        self.shards: np.ndarray = arrays["shards"]
        self.samples: np.ndarray | None = arrays.get("samples")
        self.key_ends: np.ndarray = arrays["key_ends"]
        self.key_blob: np.ndarray = arrays["keys"]
        self._checks = arrays.get("checks")  # None: written before checksums (lengths checked only)
        self._verified = np.zeros(len(self.names), np.int8)  # per shard: 0 unchecked, 1 good, -1 damaged
        self._pid = os.getpid()

    def _parse(self, raw: np.ndarray, buf) -> tuple[dict, dict[str, np.ndarray]]:
        """Header and arrays, or FolderIndexError for any damage the lengths and the trailer show."""
        damaged = f"{self.path}: damaged folder index (%s)"  # the caller says what it does instead
        (length,) = struct.unpack("<Q", bytes(raw[len(MAGIC):len(MAGIC) + 8]))
        head_end = len(MAGIC) + 8 + length
        if head_end > len(raw):
            raise FolderIndexError(damaged % f"cut short: {len(raw)} bytes, its header alone needs {head_end}")
        try:
            header = json.loads(bytes(raw[len(MAGIC) + 8:head_end]))
            if header.get("version") != VERSION:
                raise FolderIndexError(f"{self.path}: folder index version {header.get('version')}, this loader "
                                       f"reads {VERSION}; rerun make-shards --resume to write it again, or "
                                       "delete it (a loader then indexes the folder into its cache)")
            arrays = {}
            for name, spec in header["arrays"].items():
                dtype = _dtype(spec["dtype"])
                offset, count = int(spec["offset"]), int(spec["count"])
                if offset < head_end or offset + count * dtype.itemsize > len(raw):
                    raise FolderIndexError(damaged % f"its {name} array lies past its end or in its header")
                arrays[name] = np.frombuffer(buf, dtype, count, offset)
            if len(header["names"]) != len(arrays["shards"]) or not {"key_ends", "keys"} <= set(arrays):
                raise FolderIndexError(damaged % "its header does not match its arrays")
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            if isinstance(e, FolderIndexError):
                raise
            raise FolderIndexError(damaged % f"unreadable header: {e}") from None
        if "bytes" in header:  # written with a trailer (older indexes: the checks above only)
            if len(raw) != header["bytes"]:
                raise FolderIndexError(damaged % f"{len(raw)} bytes, written as {header['bytes']}")
            trailer = bytes(raw[len(raw) - TRAILER_SIZE:])
            crcs = struct.unpack("<II", trailer[len(TRAILER):]) if trailer.startswith(TRAILER) else None
            if crcs != (zlib.crc32(raw[:head_end]), zlib.crc32(arrays["shards"])):
                raise FolderIndexError(damaged % "its header or shard table fails its checksum")
            if "checks" not in arrays or len(arrays["checks"]) != len(arrays["shards"]):
                raise FolderIndexError(damaged % "its shard checksums are missing")
        return header, arrays

    @property
    def has_checksums(self) -> bool:
        """False for an index written before checksums (its lengths are all an open can check)."""
        return self._checks is not None

    def same_rows(self, other: "FolderIndex") -> bool:
        """Whether two indexes hold the same shards, samples, keys and problems, whatever their
        layout (one written before checksums, the other after)."""
        mine = {k: v for k, v in self.header.items() if k not in ("arrays", "bytes")}
        theirs = {k: v for k, v in other.header.items() if k not in ("arrays", "bytes")}
        pairs = [(self.shards, other.shards), (self.key_ends, other.key_ends), (self.key_blob, other.key_blob)]
        if self.samples is not None or other.samples is not None:
            pairs.append((self.samples, other.samples))
        return mine == theirs and all(a is not None and b is not None and a.dtype == b.dtype
                                      and np.array_equal(a, b) for a, b in pairs)

    def verified(self, s: int) -> bool:
        """Whether shard `s`'s rows (sample records, key ends, keys) are as written: checked against
        their CRC-32 the first time this process asks, then remembered. An index written before
        checksums has none to check (True)."""
        state = self._verified[s]
        if state == 0:
            state = 1 if self._checks is None or self._crc(s) == int(self._checks[s]) else -1
            self._verified[s] = state
        return state == 1

    def unverified(self, shards: np.ndarray) -> np.ndarray:
        """The shard numbers among `shards` not yet found good in this process (cheap per batch)."""
        return shards[self._verified[shards] != 1]

    def _crc(self, s: int) -> int:
        lo, n = int(self.shards[s]["row0"]), int(self.shards[s]["count"])
        crc = 0
        if self.samples is not None:
            crc = zlib.crc32(self.samples[lo:lo + n].view(np.uint8) if n else b"")
        ends = self.key_ends[lo:lo + n]
        crc = zlib.crc32(ends.view(np.uint8) if n else b"", crc)
        start = int(self.key_ends[lo - 1]) if lo else 0
        stop = int(ends[-1]) if n else start
        if not 0 <= start <= stop <= len(self.key_blob):
            return -1  # key ends that point outside the keys: damaged whatever the CRC says
        return zlib.crc32(self.key_blob[start:stop], crc)

    def __getstate__(self):
        return {"path": self.path, "identity": self._identity}

    def __setstate__(self, state):
        self.path = state["path"]
        self._load()
        if state.get("identity", self._identity) != self._identity:
            raise FolderIndexError(f"{self.path}: the folder index was replaced after the loader opened it "
                                   "(re-indexed, or another version of the data written in its place); a worker "
                                   "cannot read the samples its loader planned from another index: restart the run")

    def __len__(self) -> int:
        return len(self.key_ends)

    @property
    def problems(self) -> list[tuple[int, str, str]]:
        """(shard number, reason, message) of what indexing left out (the first MAX_MESSAGES)."""
        return [tuple(p) for p in self.header["problems"]]

    @property
    def problem_counts(self) -> dict[str, int]:
        return dict(self.header["problem_counts"])

    def key(self, row: int) -> str:
        end = int(self.key_ends[row])
        start = int(self.key_ends[row - 1]) if row else 0
        return self.key_blob[start:end].tobytes().decode("utf-8")

    def keys(self, rows) -> list[str]:
        rows = np.asarray(rows, np.int64)
        ends = self.key_ends[rows].astype(np.int64)
        starts = np.where(rows > 0, self.key_ends[np.maximum(rows - 1, 0)].astype(np.int64), 0)
        blob = self.key_blob
        return [blob[a:b].tobytes().decode("utf-8") for a, b in zip(starts.tolist(), ends.tolist())]

    def shard_info(self, s: int) -> dict:
        """bytes, sha256 (hex or None), text_bytes, text_sha256, mtime_ns of shard number `s`."""
        row = self.shards[s]
        return {"bytes": int(row["bytes"]), "sha256": _hex(row["sha256"]), "text_bytes": int(row["text_bytes"]),
                "text_sha256": _hex(row["text_sha256"]), "mtime_ns": int(row["mtime_ns"])}

    def piece(self, s: int) -> Piece:
        """Shard `s` as a Piece again (to write an index that keeps it while others change)."""
        row = self.shards[s]
        lo, n = int(row["row0"]), int(row["count"])
        info = self.shard_info(s)
        return Piece(name=self.names[s], bytes=info["bytes"], keys=self.keys(np.arange(lo, lo + n)) if n else [],
                     samples=None if self.samples is None else np.array(self.samples[lo:lo + n]),
                     problems=[(r, m) for k, r, m in self.problems if k == s], sha256=info["sha256"],
                     text_bytes=info["text_bytes"], text_sha256=info["text_sha256"], mtime_ns=info["mtime_ns"])
