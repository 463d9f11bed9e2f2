"""WebDataset tar shards: writer, DALI index (v1.2) and reader.

Members per sample, in this order: `{key}.{jpg|png|webp}`, `{key}.txt`, `{key}.syn.txt` (one
synthetic caption per line), `{key}.json` (meta), optional `{key}.tok.npy` (int32 [R, 77],
`Sample.tokens`: raw text, then every synthetic caption; R = 2 with at most one caption, so the
`.npy` header is the same for every sample with the same R).
That is what `webdataset.WebDataset`, open_clip's loader (jpg + txt) and DALI's
`fn.readers.webdataset` read. The `.idx` file lists, per sample, `<ext> <offset> <size> <name>`
for every member with `offset` pointing at the member's data (after its 512-byte header),
exactly as DALI's own `wds2idx` writes it, so no reader ever scans a tar to index it.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import tarfile
from typing import Iterator

import numpy as np

from pipelines.formats.base import ProcessLocal, ShardWriter, map_file
from pipelines.schema import Sample

INDEX_VERSION = "v1.2"
_BLOCK = tarfile.BLOCKSIZE


def encode_members(sample: Sample, with_tokens: bool) -> list[tuple[str, bytes]]:
    """(extension, payload) pairs of one sample, in member order."""
    members = [
        (sample.image_ext, sample.image),
        ("txt", sample.txt.encode("utf-8")),
        ("syn.txt", "\n".join(c.replace("\n", " ") for c in sample.syn).encode("utf-8")),
        ("json", json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode("utf-8")),
    ]
    if with_tokens:
        buf = io.BytesIO()
        np.save(buf, sample.tokens.astype("<i4", copy=False), allow_pickle=False)
        members.append(("tok.npy", buf.getvalue()))
    return members


class WdsWriter(ShardWriter):
    format = "wds"
    suffixes = (".tar", ".idx")

    def __init__(self, folder: str, index: int, with_tokens: bool = False):
        super().__init__(folder, index, with_tokens)
        # GNU format without pax headers keeps every header a single 512-byte block.
        self._tar = tarfile.open(self.path(".tar", tmp=True), "w", format=tarfile.GNU_FORMAT)
        self._index_lines: list[str] = []

    def _write(self, sample: Sample) -> None:
        parts = []
        for ext, payload in encode_members(sample, self.with_tokens):
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(payload))
            padded = -(-len(payload) // _BLOCK) * _BLOCK
            parts.append(f"{ext} {self._tar.offset - padded} {len(payload)} {info.name}")
        self._index_lines.append(" ".join(parts))

    def _finish(self) -> None:
        if not self._tar.closed:
            self._tar.close()
        with open(self.path(".idx", tmp=True), "w") as f:
            f.write(f"{INDEX_VERSION} {len(self._index_lines)}\n")
            f.writelines(line + "\n" for line in self._index_lines)


def read_index(idx_path: str) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI v1.2 index: per sample, a list of (ext, data offset, size, member name)."""
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a DALI {INDEX_VERSION} index (header {header}); "
                             "rebuild it with make-shards or DALI's wds2idx")
        samples = []
        for line in f:
            fields = line.split()
            if len(fields) % 4:
                raise ValueError(f"{idx_path}: malformed line {len(samples) + 2}")
            samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                            for i in range(0, len(fields), 4)])
    if len(samples) != int(header[1]):
        raise ValueError(f"{idx_path}: header says {header[1]} samples, found {len(samples)}")
    return samples


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key ends at the first dot of the base name. A leading `./` (what
    `tar -C dir -cf x.tar .` writes) is not part of the key."""
    while name.startswith("./"):
        name = name[2:]
    base = os.path.basename(name)
    dot = base.find(".")
    prefix = name[: len(name) - len(base)]
    return prefix + base[:dot], base[dot + 1:]


def decode_sample(key: str, parts: dict[str, bytes]) -> Sample:
    """Build a Sample from one key's members (extension -> bytes)."""
    image_ext = next((e for e in ("jpg", "png", "webp", "jpeg") if e in parts), None)
    if image_ext is None:
        raise ValueError(f"sample {key} has no image member (found {sorted(parts)})")
    syn = parts.get("syn.txt", b"").decode("utf-8")
    tokens = np.load(io.BytesIO(parts["tok.npy"]), allow_pickle=False) if "tok.npy" in parts else None
    return Sample(
        key=key,
        image=parts[image_ext],
        txt=parts.get("txt", b"").decode("utf-8"),
        syn=syn.split("\n") if syn else [],
        meta=json.loads(parts["json"]) if "json" in parts else {},
        tokens=tokens,
        image_ext="jpg" if image_ext == "jpeg" else image_ext,
    )


def iter_samples(tar_path: str) -> Iterator[Sample]:
    """Read a tar written by WdsWriter (or any jpg+txt webdataset tar) in member order."""
    key, parts = None, {}
    with tarfile.open(tar_path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_name(member.name)
            if k != key and parts:
                yield decode_sample(key, parts)
                parts = {}
            key = k
            parts[ext] = tar.extractfile(member).read()
    if parts:
        yield decode_sample(key, parts)


def index_tar(tar_path: str) -> list[list[tuple[str, int, int, str]]]:
    """Index a tar that came without `.idx` (img2dataset, open_clip-style): one full scan."""
    samples: list[list[tuple[str, int, int, str]]] = []
    key = None
    with tarfile.open(tar_path, "r") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, ext = split_name(m.name)
            if k != key:
                samples.append([])
                key = k
            samples[-1].append((ext, m.offset_data, m.size, m.name))
    return samples


class WdsShard:
    """Random access to one tar through its DALI index: a sample is a few `pread`s. The file is
    opened lazily in each process that reads it (`ProcessLocal`)."""

    def __init__(self, tar_path: str, idx_path: str | None):
        self.path = tar_path
        self.index = read_index(idx_path) if idx_path else index_tar(tar_path)
        self.size = os.path.getsize(tar_path)
        self._fd = ProcessLocal(functools.partial(os.open, tar_path, os.O_RDONLY), os.close)
        self._map = ProcessLocal(functools.partial(map_file, tar_path))
        self._spans: list | None = None

    def __len__(self) -> int:
        return len(self.index)

    def get(self, i: int) -> Sample:
        fd = self._fd.get()
        parts = {}
        for ext, offset, size, name in self.index[i]:
            if offset + size > self.size:
                raise ValueError(f"{self.path}: member {name} ends past the end of the file "
                                 "(truncated tar); reconvert or drop this shard")
            parts[ext] = os.pread(fd, size, offset)
        return decode_sample(split_name(self.index[i][0][3])[0], parts)

    def key(self, i: int) -> str:
        return split_name(self.index[i][0][3])[0]

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """The loader's hot path: (image bytes as a uint8 view, tokens int32 [R, 77] or None,
        number of synthetic captions): views of the memory-mapped tar, nothing copied."""
        if self._spans is None:
            self._spans = [member_spans(parts) for parts in self.index]
        if self._spans[i] is None:
            raise ValueError(f"{self.path}: sample {self.key(i)} has no image member")
        img_off, img_size, tok_off, tok_size, syn_off, syn_size, start, length = self._spans[i]
        buf = self._map.get()
        if start + length > len(buf):
            raise ValueError(f"{self.path}: sample {self.key(i)} ends past the end of the file "
                             "(truncated tar); reconvert or drop this shard")
        image = np.frombuffer(buf, np.uint8, img_size, img_off)
        tokens = None if tok_off < 0 else npy_view(buf, tok_off, tok_size)
        n_syn = buf[syn_off:syn_off + syn_size].count(b"\n") + 1 if syn_size else 0
        return image, tokens, n_syn


def member_spans(parts: list[tuple[str, int, int, str]]) -> tuple[int, ...] | None:
    """(offset, size) of the image, tokens (-1, 0 if none) and synthetic captions (0, 0 if none),
    then the first byte and byte count covering them: what `WdsShard.read` fetches in one read."""
    exts = {ext: (off, size) for ext, off, size, _ in parts}
    image = next((exts[e] for e in ("jpg", "png", "webp", "jpeg") if e in exts), None)
    if image is None:
        return None  # ShardSet leaves such samples out; reading one is an error below
    tokens = exts.get("tok.npy", (-1, 0))
    syn = exts.get("syn.txt", (0, 0))
    used = [image] + [m for m in (tokens, syn) if m[1] > 0]
    start = min(off for off, _ in used)
    end = max(off + size for off, size in used)
    return (*image, *tokens, *syn, start, end - start)


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype, int]] = {}


def npy_view(buf: bytes, offset: int, size: int) -> np.ndarray:
    """A `.npy` member as an array view into `buf`: its header parsed once per distinct header
    (all token members of a shard share one), instead of `np.load` per sample."""
    if buf[offset:offset + 6] != b"\x93NUMPY" or buf[offset + 6] != 1:
        return np.load(io.BytesIO(buf[offset:offset + size]), allow_pickle=False)
    end = offset + 10 + int.from_bytes(buf[offset + 8:offset + 10], "little")
    header = buf[offset:end]
    spec = _NPY_HEADERS.get(header)
    if spec is None:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(header[8:]))
        if fortran:
            return np.load(io.BytesIO(buf[offset:offset + size]), allow_pickle=False)
        spec = _NPY_HEADERS[header] = (shape, dtype, math.prod(shape))
    shape, dtype, count = spec
    return np.frombuffer(buf, dtype, count, end).reshape(shape)
