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
from pipelines.formats.index import Piece
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
    source = pa.memory_map(path, "r")
    try:
        if source.read(len(_FILE_MAGIC)) == _FILE_MAGIC:
            return pa.ipc.open_file(source).read_all()
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()
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
    """Shard `path`'s part of the folder index: its row count and keys (rows are read through
    the table itself, so no per-sample offsets are stored)."""
    keys = open_table(path).column("key").to_pylist()
    return Piece(name or os.path.basename(path), os.path.getsize(path), None, keys)


class ColumnViews:
    """numpy views of a memory-mapped table's jpg, syn and tokens buffers, per record batch: the
    loader's open handle on an Arrow shard."""

    def __init__(self, path: str):
        table = open_table(path)
        self.path, self.table = path, table
        self.starts = np.cumsum([0] + [b.num_rows for b in table.to_batches()])
        self.chunks = []
        for batch in table.to_batches():
            jpg = batch.column(batch.schema.get_field_index("jpg"))
            syn = batch.column(batch.schema.get_field_index("syn"))
            _, jpg_off, jpg_data = jpg.buffers()
            offsets = np.frombuffer(jpg_off, np.int32)[jpg.offset:jpg.offset + len(jpg) + 1]
            data = np.frombuffer(jpg_data, np.uint8)
            syn_off = np.frombuffer(syn.buffers()[1], np.int32)[syn.offset:syn.offset + len(syn) + 1]
            tokens = None
            if "tokens" in batch.schema.names:
                tok = batch.column(batch.schema.get_field_index("tokens"))
                tokens = tok.flatten().to_numpy(zero_copy_only=True).reshape(len(tok), -1, 77)
            extra = None
            if "extra_tokens" in batch.schema.names:  # rows 2.. of Sample.tokens
                ext = batch.column(batch.schema.get_field_index("extra_tokens"))
                ext_off = np.frombuffer(ext.buffers()[1], np.int32)[ext.offset:ext.offset + len(ext) + 1]
                rows = ext.values.flatten().to_numpy(zero_copy_only=True).reshape(-1, CONTEXT_LENGTH)
                extra = (ext_off, rows)
            self.chunks.append((offsets, data, np.diff(syn_off), tokens, extra))

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
