"""Arrow IPC shards: one uncompressed, memory-mappable file per shard (`NNNNNN.arrow`).

Columns: key string, jpg binary (the image bytes whatever their format; `meta.image_format` names
it when it is not JPEG),
txt string, syn list<string>, meta string (JSON), optional tokens fixed_size_list<int32>[154].
Uncompressed on purpose: JPEG bytes do not compress, and memory-mapped random access by row is
what the DALI external source needs. Readable by pyarrow and Hugging Face `datasets`.
"""
from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipelines.formats.base import ShardWriter
from pipelines.schema import SCHEMA_VERSION, TOKENS_PER_SAMPLE, Sample

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
    return pa.schema(fields, metadata={"schema_version": str(SCHEMA_VERSION)})


class ArrowWriter(ShardWriter):
    format = "arrow"
    suffixes = (".arrow",)

    def __init__(self, folder: str, index: int, with_tokens: bool = False):
        super().__init__(folder, index, with_tokens)
        self.schema = arrow_schema(with_tokens)
        self._sink = pa.OSFile(self.path(".arrow", tmp=True), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
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
            flat = np.stack([s.tokens.reshape(-1) for s, _ in self._rows]).reshape(-1)
            cols["tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), TOKENS_PER_SAMPLE)
        self._writer.write_batch(pa.record_batch(list(cols.values()), schema=self.schema))
        self._rows = []

    def _finish(self) -> None:
        if self._sink.closed:
            return
        self._flush()
        self._writer.close()
        self._sink.close()


def open_table(path: str) -> pa.Table:
    """Memory-map a shard: zero-copy, rows addressable by index."""
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


def row_to_sample(table: pa.Table, i: int) -> Sample:
    row = {name: table.column(name)[i].as_py() for name in table.column_names}
    meta = json.loads(row["meta"])
    return Sample(
        key=row["key"], image=row["jpg"], txt=row["txt"], syn=row["syn"] or [],
        meta=meta, tokens=row.get("tokens"), image_ext=meta.get("image_format", "jpg"),
    )


def iter_samples(path: str) -> Iterator[Sample]:
    table = open_table(path)
    for i in range(table.num_rows):
        yield row_to_sample(table, i)


class ArrowShard:
    """Random access to one memory-mapped IPC file; opened lazily in each worker process."""

    def __init__(self, path: str):
        self.path = path
        with pa.memory_map(path, "r") as source:
            self._len = pa.ipc.open_file(source).read_all().num_rows
        self._table: pa.Table | None = None

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        return {**self.__dict__, "_table": None}

    def get(self, i: int) -> Sample:
        if self._table is None:
            self._table = open_table(self.path)
        return row_to_sample(self._table, i)
