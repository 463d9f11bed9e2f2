"""MXNet RecordIO shards (`NNNNNN.rec` + `NNNNNN.idx`) in ALIP's layout, plus a JSONL text sidecar.

Byte-compatible with `mxnet.recordio.MXIndexedRecordIO` and DALI's `fn.readers.mxnet`:
record  = magic 0xced7230a (uint32 LE) | lrecord (uint32: upper 3 bits continuation flag,
          lower 29 bits payload length) | payload | zero padding to a multiple of 4 bytes
payload = IRHeader struct('IfQQ') (flag = label count, label, id, id2) | float32[flag] | image
ALIP stores 154 token ids (77 raw + 77 synthetic) as the float32 label; ids < 2^24 are exact.
Token rows beyond those two (the second and later synthetic captions, `Sample.tokens[2:]`) go to
the sidecar row as `"extra_tokens": [[77 ints], ...]`, only when there are any, so the record
stays exactly what DALI and ALIP read.
The per-shard `.idx` has one `id\\toffset` line per record (what MXIndexedRecordIO reads);
`all.idx` indexes every shard at once for DALI (see `combined_index_lines`). Strings the label
cannot hold (key, raw text, synthetic captions, meta) go to `NNNNNN.jsonl`, one line per record,
keyed by the same id.
mxnet itself is retired (it pins numpy<1.24), so the format is written here.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from typing import Iterator

import numpy as np

from pipelines.formats.base import MappedFile, ShardFile, ShardWriter, write_atomic
from pipelines.formats.index import SAMPLE_DTYPES, Piece
from pipelines.schema import CONTEXT_LENGTH, TOKENS_PER_SAMPLE, Sample

MAGIC = 0xCED7230A
_IR_HEADER = struct.Struct("IfQQ")
_LENGTH_MASK = (1 << 29) - 1
_FLOAT_EXACT = 1 << 24


def pack_record(record_id: int, tokens: np.ndarray, image: bytes) -> bytes:
    """One framed record: header, 154 float32 token ids (`tokens`: int [2, 77] or [154]), image
    bytes, padding."""
    label = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if label.size != TOKENS_PER_SAMPLE or label.min() < 0 or label.max() >= _FLOAT_EXACT:
        raise ValueError(f"record {record_id}: expected {TOKENS_PER_SAMPLE} token ids in [0, 2^24)")
    payload = _IR_HEADER.pack(label.size, 0.0, record_id, 0) + label.astype("<f4").tobytes() + image
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"record {record_id}: {len(payload)} bytes exceeds RecordIO's 2^29 limit")
    pad = -len(payload) % 4
    return struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * pad


def unpack_payload(payload: bytes) -> tuple[int, np.ndarray, bytes]:
    """(id, label float32 array, image bytes) of one record payload."""
    flag, label, record_id, _ = _IR_HEADER.unpack_from(payload)
    start = _IR_HEADER.size
    if flag == 0:
        return record_id, np.array([label], np.float32), payload[start:]
    end = start + 4 * flag
    return record_id, np.frombuffer(payload[start:end], "<f4"), payload[end:]


class RecordIOWriter(ShardWriter):
    format = "rec"
    suffixes = (".rec", ".idx", ".jsonl")

    def __init__(self, folder: str, index: int, with_tokens: bool = True, id_base: int = 0):
        """`id_base`: first record id of this shard, so ids stay unique across a dataset's shards."""
        if not with_tokens:
            raise ValueError("RecordIO shards carry token ids as their label: tokenize to write them")
        super().__init__(folder, index, with_tokens)
        self.id_base = id_base
        self._rec = open(self.path(".rec", tmp=True), "wb")
        self._idx = open(self.path(".idx", tmp=True), "w")
        self._txt = open(self.path(".jsonl", tmp=True), "w", encoding="utf-8")

    def _write(self, sample: Sample) -> None:
        record_id = self.id_base + self.count
        self._idx.write(f"{record_id}\t{self._rec.tell()}\n")
        self._rec.write(pack_record(record_id, sample.tokens[:2], sample.image))
        row = {"id": record_id, "key": sample.key, "txt": sample.txt, "syn": sample.syn, "meta": sample.meta}
        if len(sample.tokens) > 2:
            row["extra_tokens"] = sample.tokens[2:].tolist()
        self._txt.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")

    def _finish(self) -> None:
        for f in (self._rec, self._idx, self._txt):
            f.close()


def read_index(idx_path: str) -> list[tuple[int, int]]:
    """(id, offset) per record, in file order."""
    with open(idx_path) as f:
        return [(int(a), int(b)) for a, b in (line.split("\t") for line in f if line.strip())]


def label_tokens(label: np.ndarray, extra) -> np.ndarray:
    """int32 [R, 77] `Sample.tokens` from a record's 154-float label and its sidecar row's
    `extra_tokens` (None, a list of 77-int lists, or an int32 [R - 2, 77] array)."""
    tokens = label.astype(np.int32).reshape(2, CONTEXT_LENGTH)
    if extra is None or len(extra) == 0:
        return tokens
    return np.concatenate([tokens, np.asarray(extra, np.int32).reshape(-1, CONTEXT_LENGTH)])


def read_record(f, offset: int) -> bytes:
    """The payload of the record at `offset` of an open .rec file."""
    f.seek(offset)
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{f.name}: record at offset {offset} is truncated")
    magic, lrecord = struct.unpack("<II", head)
    if magic != MAGIC:
        raise ValueError(f"{f.name}: bad RecordIO magic at offset {offset}")
    if lrecord >> 29:
        raise ValueError(f"{f.name}: multi-part record at offset {offset} is not supported")
    payload = f.read(lrecord & _LENGTH_MASK)
    if len(payload) != lrecord & _LENGTH_MASK:
        raise ValueError(f"{f.name}: record at offset {offset} is truncated")
    return payload


def iter_samples(rec_path: str) -> Iterator[Sample]:
    """Read a shard back through its index and text sidecar (paths derived from `rec_path`)."""
    stem = rec_path[: -len(".rec")]
    index = read_index(stem + ".idx")
    with open(stem + ".jsonl", encoding="utf-8") as f:
        texts = {row["id"]: row for row in map(json.loads, f)}
    with open(rec_path, "rb") as f:
        for record_id, offset in index:
            rid, label, image = unpack_payload(read_record(f, offset))
            if rid != record_id:
                raise ValueError(f"{rec_path}: index says id {record_id} at {offset}, record says {rid}")
            row = texts[rid]
            yield Sample(
                key=row["key"], image=image, txt=row["txt"], syn=row["syn"], meta=row["meta"],
                tokens=label_tokens(label, row.get("extra_tokens")),
                image_ext=row["meta"].get("image_format", "jpg"),
            )


COMBINED_INDEX = "all.idx"


def combined_index_lines(folder: str, rec_names: list[str], sizes: dict[str, int] | None = None) -> list[str]:
    """Index over the concatenation of `rec_names`: DALI's `fn.readers.mxnet` takes many .rec
    files but one index whose offsets run across all of them, in the order given. `sizes` (name ->
    bytes) stands in for .rec files that are not local (already uploaded to object storage)."""
    lines, base = [], 0
    for name in rec_names:
        path = f"{folder}/{name}"
        lines += [f"{rid}\t{base + off}\n" for rid, off in read_index(path[: -len('.rec')] + ".idx")]
        base += sizes[name] if sizes else os.path.getsize(path)
    return lines


def write_combined_index(folder: str, rec_names: list[str], sizes: dict[str, int] | None = None) -> str:
    path = f"{folder}/{COMBINED_INDEX}"
    write_atomic(path, "".join(combined_index_lines(folder, rec_names, sizes)))
    return path


def index_piece(rec_path: str, name: str | None = None, size: int | None = None) -> Piece:
    """Shard `rec_path`'s part of the folder index from its `.idx`, its `.jsonl` sidecar and the
    record headers. A record past the end of the file is left out (problem "truncated"); a
    record without its text line, or an unreadable sidecar, leaves the whole shard out. `size`:
    the .rec's bytes when it is not at hand (in object storage): records are then taken to run
    from their offset to the next one, and the loader checks each header when it reads it."""
    stem = rec_path[: -len(".rec")]
    local = size is None
    size = os.path.getsize(rec_path) if local else size
    index = read_index(stem + ".idx")
    lines: dict[int, tuple[int, int, str, int, int]] = {}  # id -> (offset, length, key, n_syn, n_tok)
    with open(stem + ".jsonl", "rb") as f:
        offset = 0
        for line in f:
            row = json.loads(line)
            lines[row["id"]] = (offset, len(line), row["key"], len(row["syn"]), 2 + len(row.get("extra_tokens") or ()))
            offset += len(line)
    missing = [rid for rid, _ in index if rid not in lines]
    if missing:
        raise ValueError(f"{stem}.jsonl: no text for record ids {missing[:5]}; reconvert this shard")
    rows, keys, problems = [], [], []
    ends = [off for _, off in index[1:]] + [size]
    with open(rec_path, "rb") if local else contextlib.nullcontext() as f:
        for (rid, start), end in zip(index, ends):
            text_off, text_len, key, n_syn, n_tok = lines[rid]
            if local:
                head = os.pread(f.fileno(), 8, start)
                magic, lrecord = struct.unpack("<II", head) if len(head) == 8 else (None, 0)
                span = 8 + (lrecord & _LENGTH_MASK)
            else:
                magic, lrecord, span = MAGIC, 0, end - start  # padding included: checked on read
            if magic != MAGIC or lrecord >> 29 or start + span > size:
                problems.append(("truncated", f"{rec_path}: bad or truncated record {rid} at offset {start} "
                                              f"(sample {key})"))
                continue
            rows.append((start, span, text_off, text_len, n_syn, n_tok))
            keys.append(key)
    samples = np.array(rows, SAMPLE_DTYPES["rec"]) if rows else np.zeros(0, SAMPLE_DTYPES["rec"])
    return Piece(name or os.path.basename(rec_path), size, samples, keys, problems)


def _text_row(text: np.ndarray, rec: tuple) -> dict:
    start, size = rec[2:4]
    return json.loads(text[start:start + size].tobytes())


def read_sample(buf: np.ndarray, text: np.ndarray, rec: tuple, path: str, key: str,
                at: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """The loader's hot path for one record of a mapped .rec (`rec`: its index record as a tuple,
    `SAMPLE_DTYPES["rec"]`'s fields in order; `text`: its mapped .jsonl, read only for token rows
    beyond the two in the record): image bytes as a uint8 view, tokens int32 [R, 77], number of
    synthetic captions. `at`: where `buf` starts in the file (a record read by offset: `buf` holds
    it alone and `rec` starts at 0), for the error message."""
    offset, span, _, _, n_syn, n_tok = rec
    magic, lrecord = struct.unpack_from("<II", buf, offset) if offset + 8 <= len(buf) else (None, 0)
    length = lrecord & _LENGTH_MASK
    if magic != MAGIC or lrecord >> 29 or offset + 8 + length > len(buf) or not 0 <= span - 8 - length < 4:
        raise ValueError(f"{path}: bad or truncated record at offset {at + offset} (sample {key}); "
                         "reconvert this shard")
    start = offset + 8 + _IR_HEADER.size
    flag = _IR_HEADER.unpack_from(buf, offset + 8)[0]
    extra = _text_row(text, rec).get("extra_tokens") if n_tok > 2 else None
    tokens = label_tokens(np.frombuffer(buf, "<f4", flag, start), extra)
    image = buf[start + 4 * flag:offset + 8 + length]
    return image, tokens, n_syn


def get_sample(buf: np.ndarray, text: np.ndarray, rec: tuple, path: str, key: str, at: int = 0) -> Sample:
    """One whole sample: the record's image and tokens, its sidecar line's strings (copied)."""
    image, tokens, _ = read_sample(buf, text, rec, path, key, at)
    row = _text_row(text, rec)
    return Sample(key=row["key"], image=image.tobytes(), txt=row["txt"], syn=row["syn"], meta=row["meta"],
                  tokens=np.array(tokens), image_ext=row["meta"].get("image_format", "jpg"))


class RecFiles:
    """The loader's open handle on a RecordIO shard: the .rec mapped, or read by offset (a
    `ShardFile`, with `mapped=False`), read as either is (`read`, `copies`), and its .jsonl sidecar,
    opened the same way when first needed: the hot path reads it only for token rows beyond the
    record's two (`n_tok > 2`)."""

    def __init__(self, rec_path: str, mapped: bool = True):
        self.path = rec_path
        self.file = MappedFile(rec_path) if mapped else ShardFile(rec_path)
        self.read, self.copies = self.file.read, self.file.copies
        self._text = None  # the sidecar's handle, of the .rec's kind

    def text_of(self, rec: tuple) -> tuple[np.ndarray, tuple]:
        """(sidecar bytes holding `rec`'s line, `rec` addressing its line in them): the mapped
        sidecar and `rec` itself, or (read by offset) the line alone and `rec` with its text at 0."""
        if self._text is None:
            self._text = type(self.file)(self.path[: -len(".rec")] + ".jsonl")
        if isinstance(self._text, MappedFile):
            return self._text.buf, rec
        return self._text.read(rec[2], rec[3]), (*rec[:2], 0, *rec[3:])

    def close(self) -> None:
        for handle in (self.file, self._text):
            if handle is not None:
                handle.close()
        self._text = None
