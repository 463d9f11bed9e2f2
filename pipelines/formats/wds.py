"""WebDataset tar shards: writer, DALI index (v1.2) and reader.

Members per sample, in this order: `{key}.{jpg|png|webp}`, `{key}.txt`, `{key}.syn.txt` (one
synthetic caption per line), `{key}.json` (meta), optional `{key}.tok.npy` (int32 [2, 77]).
That is what `webdataset.WebDataset`, open_clip's loader (jpg + txt) and DALI's
`fn.readers.webdataset` read. The `.idx` file lists, per sample, `<ext> <offset> <size> <name>`
for every member with `offset` pointing at the member's data (after its 512-byte header),
exactly as DALI's own `wds2idx` writes it, so no reader ever scans a tar to index it.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Iterator

import numpy as np

from pipelines.formats.base import ShardWriter
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
        np.save(buf, sample.tokens, allow_pickle=False)
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
    """webdataset's rule: the key ends at the first dot of the base name."""
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
    """Random access to one tar through its DALI index: a sample is a few `pread`s."""

    def __init__(self, tar_path: str, idx_path: str | None):
        self.path = tar_path
        self.index = read_index(idx_path) if idx_path else index_tar(tar_path)
        self.size = os.path.getsize(tar_path)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # file descriptors do not cross process boundaries
        return {**self.__dict__, "_fd": None}

    def get(self, i: int) -> Sample:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        parts = {}
        for ext, offset, size, name in self.index[i]:
            if offset + size > self.size:
                raise ValueError(f"{self.path}: member {name} ends past the end of the file "
                                 "(truncated tar); reconvert or drop this shard")
            parts[ext] = os.pread(self._fd, size, offset)
        return decode_sample(split_name(self.index[i][0][3])[0], parts)
