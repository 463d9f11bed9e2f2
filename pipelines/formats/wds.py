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

import io
import json
import math
import os
import tarfile
from typing import Iterator

import numpy as np

from pipelines.formats.base import ShardWriter
from pipelines.formats.index import SAMPLE_DTYPES, Piece
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


def index_piece(tar_path: str, idx_path: str | None, name: str | None = None, size: int | None = None) -> Piece:
    """Shard `tar_path`'s part of the folder index, from its DALI index (`idx_path`) or, for a tar
    that came without one, from a scan. Samples without an image or text member, or with a
    member past the end of the file, are left out and named in the piece's problems. `size`:
    the tar's bytes when the tar itself is not at hand (in object storage)."""
    size = os.path.getsize(tar_path) if size is None else size
    parts_list = read_index(idx_path) if idx_path else index_tar(tar_path)
    rows, keys, problems = [], [], []
    prev_end = 0  # a sample's headers begin where the previous sample's last member ends
    for parts in parts_list:
        key = split_name(parts[0][3])[0]
        start = prev_end
        end = max(off + -(-sz // _BLOCK) * _BLOCK for _, off, sz, _ in parts)
        prev_end = max(prev_end, end)
        exts = {ext: (off, sz) for ext, off, sz, _ in parts}
        image = next((exts[e] for e in ("jpg", "png", "webp", "jpeg") if e in exts), None)
        if image is None:
            problems.append(("missing_image", f"{tar_path}: sample {key} has no image member"))
        elif "txt" not in exts:
            problems.append(("missing_text", f"{tar_path}: sample {key} has no txt member"))
        elif any(off + sz > size for _, off, sz, _ in parts):
            problems.append(("truncated", f"{tar_path}: sample {key} lies past the end of the file (truncated tar)"))
        else:
            syn, tok = exts.get("syn.txt", (start, 0)), exts.get("tok.npy", (start, 0))
            rows.append((start, min(end, size) - start, image[0] - start, image[1], syn[0] - start, syn[1],
                         tok[0] - start, tok[1]))
            keys.append(key)
    samples = np.array(rows, SAMPLE_DTYPES["wds"]) if rows else np.zeros(0, SAMPLE_DTYPES["wds"])
    return Piece(name or os.path.basename(tar_path), size, samples, keys, problems)


def _header_name(block: bytes) -> tuple[str, int, bytes]:
    """(name, data size, type flag) of one 512-byte tar header (GNU, ustar or v7)."""
    info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    return info.name, info.size, info.type


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<name>\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def read_members(buf, start: int, span: int) -> dict[str, bytes]:
    """The members of the sample whose headers span `buf[start:start + span]`, extension ->
    bytes: what `decode_sample` takes. Walks the tar headers (GNU long names and pax paths
    included; directories and global headers skipped), so foreign tars read as ours do."""
    parts, pos, end, long_name = {}, start, start + span, None
    while pos + _BLOCK <= end:
        block = bytes(buf[pos:pos + _BLOCK])
        if not block.strip(b"\0"):
            break
        name, size, kind = _header_name(block)
        data = pos + _BLOCK
        pos = data + -(-size // _BLOCK) * _BLOCK
        if kind == tarfile.GNUTYPE_LONGNAME:
            long_name = bytes(buf[data:data + size]).rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == tarfile.XHDTYPE:
            long_name = _pax_path(bytes(buf[data:data + size])) or long_name
        elif kind in tarfile.REGULAR_TYPES:
            parts[split_name(long_name or name)[1]] = bytes(buf[data:data + size])
            long_name = None
        else:  # directories, links, global pax headers: not sample members
            long_name = None
    return parts


def read_sample(buf: np.ndarray, rec: tuple, path: str, key: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The loader's hot path for one sample of a mapped tar (`rec`: its index record as a tuple,
    `SAMPLE_DTYPES["wds"]`'s fields in order: one `tolist()` per batch, not eight field reads a
    sample): image bytes as a uint8 view, tokens int32 [R, 77] (view) or None, number of
    synthetic captions."""
    start, span, image, image_size, syn, syn_size, tok, tok_size = rec
    if start + span > len(buf):
        raise ValueError(f"{path}: sample {key} ends past the end of the file (truncated tar); "
                         "reconvert or drop this shard")
    image = buf[start + image:start + image + image_size]
    tokens = npy_view(buf, start + tok, tok_size) if tok_size else None
    # one caption a line: bytes.count is a tenth of numpy's compare-and-count on ~100 bytes
    n_syn = buf[start + syn:start + syn + syn_size].tobytes().count(b"\n") + 1 if syn_size else 0
    return image, tokens, n_syn


def get_sample(buf: np.ndarray, rec: tuple, path: str, key: str) -> Sample:
    """One whole sample (every member) of a mapped tar, copied out of the mapping."""
    start, span = rec[:2]
    if start + span > len(buf):
        raise ValueError(f"{path}: sample {key} ends past the end of the file (truncated tar); "
                         "reconvert or drop this shard")
    return decode_sample(key, read_members(buf, start, span))


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype, int]] = {}


def npy_view(buf: np.ndarray, offset: int, size: int) -> np.ndarray:
    """A `.npy` member as an array view into `buf` (uint8): its header parsed once per distinct
    header (all token members of a shard share one), instead of `np.load` per sample."""
    head = buf[offset:offset + 128].tobytes()  # one read: numpy pads v1 headers to 64 bytes (ours: 128)
    if head[:6] != b"\x93NUMPY" or head[6] != 1:
        return np.load(io.BytesIO(buf[offset:offset + size].tobytes()), allow_pickle=False)
    length = 10 + int.from_bytes(head[8:10], "little")
    header = head[:length] if length <= len(head) else buf[offset:offset + length].tobytes()
    end = offset + length
    spec = _NPY_HEADERS.get(header)
    if spec is None:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(header[8:]))
        if fortran:
            return np.load(io.BytesIO(buf[offset:offset + size].tobytes()), allow_pickle=False)
        spec = _NPY_HEADERS[header] = (shape, dtype, math.prod(shape))
    shape, dtype, count = spec
    return np.frombuffer(buf, dtype, count, end).reshape(shape)
