"""Arrow IPC shards: one uncompressed, memory-mappable IPC stream per shard (`NNNNNN.arrow`).

Columns: key string, jpg binary (the image bytes whatever their format; `meta.image_format` names
it when it is not JPEG),
txt string, syn list<string>, meta string (JSON), and with tokens
tokens fixed_size_list<int32>[154] (`Sample.tokens` rows 0-1: raw text, first synthetic caption)
plus extra_tokens list<fixed_size_list<int32>[77]> (rows 2..: the other synthetic captions,
empty for most samples).
Uncompressed on purpose: JPEG bytes do not compress, and memory-mapped random access by row is
what the DALI external source needs. The IPC *stream* format (not the file format) because that
is what Hugging Face `datasets.Dataset.from_file` reads; `pyarrow.ipc.open_stream` reads it from
a memory map just as zero-copy. Shards written in the file format still read (`open_table`).
The `jpg` column stays plain binary, not an HF `Image` feature: that feature's storage is a
struct<bytes, path>, which would change the column every other reader sees.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipelines.formats.base import ShardWriter
from pipelines.formats.index import SAMPLE_DTYPES, Piece
from pipelines.schema import CONTEXT_LENGTH, SCHEMA_VERSION, TOKENS_PER_SAMPLE, Sample

# Small record batches bound the writer's memory; readers index rows, not batches.
ROWS_PER_BATCH = 256


def arrow_schema(with_tokens: bool) -> pa.Schema:
    fields = [
        pa.field("key", pa.string()),
        pa.field("jpg", pa.binary()),
        pa.field("txt", pa.string()),
        pa.field("syn", pa.list_(pa.string())),
        pa.field("meta", pa.string()),
    ]
    if with_tokens:
        fields.append(pa.field("tokens", pa.list_(pa.int32(), TOKENS_PER_SAMPLE)))
        fields.append(pa.field("extra_tokens", pa.list_(pa.list_(pa.int32(), CONTEXT_LENGTH))))
    return pa.schema(fields, metadata={"schema_version": str(SCHEMA_VERSION)})


class ArrowWriter(ShardWriter):
    format = "arrow"
    suffixes = (".arrow",)

    def __init__(self, folder: str, index: int, with_tokens: bool = False):
        super().__init__(folder, index, with_tokens)
        self.schema = arrow_schema(with_tokens)
        self._sink = pa.OSFile(self.path(".arrow", tmp=True), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._rows: list[tuple[Sample, str]] = []

    def _write(self, sample: Sample) -> None:
        self._rows.append((sample, json.dumps(sample.meta, sort_keys=True, ensure_ascii=False)))
        if len(self._rows) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        cols = {
            "key": [s.key for s, _ in self._rows],
            "jpg": [s.image for s, _ in self._rows],
            "txt": [s.txt for s, _ in self._rows],
            "syn": [list(s.syn) for s, _ in self._rows],
            "meta": [m for _, m in self._rows],
        }
        if self.with_tokens:
            flat = np.stack([s.tokens[:2].reshape(-1) for s, _ in self._rows]).reshape(-1)
            cols["tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), TOKENS_PER_SAMPLE)
            extra = [s.tokens[2:] for s, _ in self._rows]
            offsets = np.concatenate([[0], np.cumsum([len(e) for e in extra])]).astype(np.int32)
            rows = pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate(extra).reshape(-1), pa.int32()), CONTEXT_LENGTH)
            cols["extra_tokens"] = pa.ListArray.from_arrays(pa.array(offsets), rows)
        self._writer.write_batch(pa.record_batch(list(cols.values()), schema=self.schema))
        self._rows = []

    def _finish(self) -> None:
        if self._sink.closed:
            return
        self._flush()
        self._writer.close()
        self._sink.close()


_FILE_MAGIC = b"ARROW1"


def open_table(path: str) -> pa.Table:
    """Memory-map a shard: zero-copy, rows addressable by index. Reads the IPC stream format
    and, for shards written before it, the IPC file format. No descriptor stays open: the
    mapping lives as long as the table (or a view of its buffers) does."""
    return _mapped_table(path)[0]


def _mapped_table(path: str) -> tuple[pa.Table, int, int]:
    """(table, address of the file's mapping, file bytes): a buffer of the table at address a lies
    at byte a - base of the file, when it lies in the mapping at all (not decompressed elsewhere)."""
    source = pa.memory_map(path, "r")
    try:
        size = source.size()
        base = source.read_buffer(size).address if size else 0  # zero-copy: the mapping itself
        source.seek(0)
        if source.read(len(_FILE_MAGIC)) == _FILE_MAGIC:
            return pa.ipc.open_file(source).read_all(), base, size
        source.seek(0)
        return pa.ipc.open_stream(source).read_all(), base, size
    finally:
        source.close()


def row_to_sample(table: pa.Table, i: int) -> Sample:
    row = {name: table.column(name)[i].as_py() for name in table.column_names}
    meta = json.loads(row["meta"])
    tokens = row.get("tokens")
    if tokens is not None and row.get("extra_tokens"):
        tokens = np.concatenate([np.asarray(tokens, np.int32).reshape(2, CONTEXT_LENGTH),
                                 np.asarray(row["extra_tokens"], np.int32)])
    return Sample(
        key=row["key"], image=row["jpg"], txt=row["txt"], syn=row["syn"] or [],
        meta=meta, tokens=tokens, image_ext=meta.get("image_format", "jpg"),
    )


def iter_samples(path: str) -> Iterator[Sample]:
    table = open_table(path)
    for i in range(table.num_rows):
        yield row_to_sample(table, i)


def index_piece(path: str, name: str | None = None) -> Piece:
    """Shard `path`'s part of the folder index: its keys and, per row, where its image bytes, token
    rows and extra token rows lie in the file (`SAMPLE_DTYPES["arrow"]`), so the hot path reads a
    sample as it reads a tar's, from a map or by offset, without parsing the IPC stream: opening a
    table cost ~110 µs, which a global shuffle over many shards paid for almost every sample."""
    table, base, size = _mapped_table(path)
    keys = table.column("key").to_pylist()
    rows = np.zeros(len(keys), SAMPLE_DTYPES["arrow"])
    r0 = 0
    for batch in table.to_batches():
        out = rows[r0:r0 + batch.num_rows]
        r0 += batch.num_rows
        offsets, data, out["n_syn"], tokens, extra = ColumnViews.batch_views(batch)
        places = [_place(data, base, size)]
        out["image"] = places[0] + offsets[:-1]
        out["image_size"] = np.diff(offsets)
        if tokens is not None:
            places.append(_place(tokens, base, size))
            out["tok"] = places[-1] + np.arange(len(out)) * tokens[0].nbytes if len(out) else 0
        if extra is not None:
            ext_off, ext_rows = extra
            places.append(_place(ext_rows, base, size))
            out["extra"] = places[-1] + ext_off[:-1].astype(np.int64) * CONTEXT_LENGTH * 4
            out["n_extra"] = np.diff(ext_off)
        out["direct"] = all(p >= 0 for p in places)
    return Piece(name or os.path.basename(path), size, rows, keys)


def _place(array: np.ndarray, base: int, size: int) -> int:
    """Where `array`'s first byte lies in the mapped file, or -1 where it does not lie in it (0 for
    an empty one: nothing of it is ever read)."""
    if not array.nbytes:
        return 0
    at = array.__array_interface__["data"][0] - base
    return at if 0 <= at and at + array.nbytes <= size else -1


def read_sample(read, rec: tuple, path: str, key: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The hot path for one row by its index record (`SAMPLE_DTYPES["arrow"]`'s fields in order, a
    `direct` one): image bytes (uint8), tokens int32 [R, 77] or None, number of synthetic captions.
    `read(offset, size)`: the file's bytes there, from its map or by `pread` (fewer past its end)."""
    image, image_size, tok, extra, n_extra, n_syn, _ = rec
    wants = [(image, image_size)] + [(tok, TOKENS_PER_SAMPLE * 4)] * bool(tok) + \
        [(extra, n_extra * CONTEXT_LENGTH * 4)] * bool(n_extra)
    parts = [read(at, size) for at, size in wants]
    if any(len(part) < size for part, (_, size) in zip(parts, wants)):
        raise ValueError(f"{path}: sample {key} lies past the end of the file (truncated); "
                         "reconvert or drop this shard")
    tokens = None
    if tok:
        tokens = np.concatenate(parts[1:]).view("<i4") if n_extra else parts[1].view("<i4")
        tokens = tokens.reshape(-1, CONTEXT_LENGTH)
    return parts[0], tokens, n_syn


class ColumnViews:
    """numpy views of a memory-mapped table's jpg, syn and tokens buffers, per record batch: the
    loader's open handle on an Arrow shard."""

    def __init__(self, path: str):
        table = open_table(path)
        self.path, self.table = path, table
        self.starts = np.cumsum([0] + [b.num_rows for b in table.to_batches()])
        self.chunks = [self.batch_views(batch) for batch in table.to_batches()]

    @staticmethod
    def batch_views(batch: pa.RecordBatch) -> tuple:
        """(jpg offsets int32 [n + 1], jpg data uint8, n_syn [n], tokens int32 [n, 2, 77] or None,
        (extra offsets int32 [n + 1], extra rows int32 [m, 77]) or None), views of the batch's buffers."""
        jpg = batch.column(batch.schema.get_field_index("jpg"))
        syn = batch.column(batch.schema.get_field_index("syn"))
        _, jpg_off, jpg_data = jpg.buffers()
        offsets = np.frombuffer(jpg_off, np.int32)[jpg.offset:jpg.offset + len(jpg) + 1]
        data = np.frombuffer(jpg_data, np.uint8)
        syn_off = np.frombuffer(syn.buffers()[1], np.int32)[syn.offset:syn.offset + len(syn) + 1]
        tokens = None
        if "tokens" in batch.schema.names:
            tok = batch.column(batch.schema.get_field_index("tokens"))
            tokens = tok.flatten().to_numpy(zero_copy_only=True).reshape(len(tok), -1, CONTEXT_LENGTH)
        extra = None
        if "extra_tokens" in batch.schema.names:  # rows 2.. of Sample.tokens
            ext = batch.column(batch.schema.get_field_index("extra_tokens"))
            ext_off = np.frombuffer(ext.buffers()[1], np.int32)[ext.offset:ext.offset + len(ext) + 1]
            rows = ext.values.flatten().to_numpy(zero_copy_only=True).reshape(-1, CONTEXT_LENGTH)
            extra = (ext_off, rows)
        return offsets, data, np.diff(syn_off), tokens, extra

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        c = int(np.searchsorted(self.starts, i, side="right")) - 1
        offsets, data, n_syn, tokens, extra = self.chunks[c]
        r = i - int(self.starts[c])
        row_tokens = None if tokens is None else tokens[r]
        if extra is not None and extra[0][r + 1] > extra[0][r]:
            row_tokens = np.concatenate([row_tokens, extra[1][extra[0][r]:extra[0][r + 1]]])
        return data[offsets[r]:offsets[r + 1]], row_tokens, int(n_syn[r])

    def get(self, i: int) -> Sample:
        return row_to_sample(self.table, i)

    def close(self) -> None:
        """Let go of the table: the mapping goes once no view of it is left."""
        self.table, self.chunks = None, []
