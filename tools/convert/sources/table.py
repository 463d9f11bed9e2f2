"""A generic table with named image and caption columns (`table`); its reader is shared with `yfcc`.

Formats by suffix: `.csv`, `.tsv`/`.tab` (csv-module quoting, as pandas and the csv module write
them), `.jsonl`, `.json` (a list of objects), `.parquet` (streamed by row group with pyarrow).
`--image-column` names paths relative to `--images-root` (default: the table's folder);
`--caption-column` holds a string or, in JSONL/Parquet, a list of strings. Every other column goes
into `meta`. source_key is a `key` column when there is one, else the image path's stem.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
from pathlib import PurePath
from typing import Iterator

from tools.convert.sources.base import SourceError, SourceOptions, SourceRecord, resolve_image

SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".json", ".parquet")


def _csv_rows(path: str, delimiter: str) -> tuple[list[str], Iterator[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        columns = next(csv.reader(f, delimiter=delimiter), [])

    def rows():
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f, delimiter=delimiter)
    return columns, rows()


def _jsonl_rows(path: str) -> tuple[list[str], Iterator[dict]]:
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    try:
        columns = list(json.loads(first)) if first else []
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: first row is not valid JSON ({e})") from e

    def rows():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SourceError(f"{path}:{n}: not valid JSON ({e})") from e
    return columns, rows()


def open_table(path: str) -> tuple[list[str], Iterator[dict]]:
    """(column names, rows as dicts) of a table file, chosen by its suffix.

    Columns of JSON/JSONL tables are the first object's keys.
    """
    suffix = PurePath(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise SourceError(f"{path}: unknown table suffix {suffix!r}; expected one of {SUFFIXES}")
    if not os.path.isfile(path):
        raise SourceError(f"{path}: not found; pass --input pointing to a table "
                          f"({', '.join(SUFFIXES)})")
    if suffix == ".csv":
        return _csv_rows(path, ",")
    if suffix in (".tsv", ".tab"):
        return _csv_rows(path, "\t")
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise SourceError(f"{path}: a .json table must be a list of objects")
        return (list(data[0]) if data else []), iter(data)
    import pyarrow.parquet as pq  # slow to import, and only Parquet needs it

    parquet = pq.ParquetFile(path)
    batches = parquet.iter_batches(batch_size=8192)
    return parquet.schema_arrow.names, (row for batch in batches for row in batch.to_pylist())


def jsonable(value):
    """`value` as plain JSON: NaN/inf → None, numpy scalars → Python, dates → ISO strings."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str, bytes)):
        value = value.item() if getattr(value, "ndim", 0) == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def caption_list(cell) -> list[str]:
    """Stripped non-empty captions of a cell holding a string, a list of strings, or nothing."""
    cells = [cell] if isinstance(cell, str) else cell if isinstance(cell, (list, tuple)) else []
    return [c.strip() for c in cells if isinstance(c, str) and c.strip()]


def read(path: str, options: SourceOptions) -> Iterator[SourceRecord]:
    if not options.image_column or not options.caption_column:
        raise SourceError(f"{path}: the table source needs the column names: pass "
                          "--image-column NAME --caption-column NAME")
    columns, rows = open_table(path)
    for column in (options.image_column, options.caption_column):
        if column not in columns:
            raise SourceError(f"{path}: no column {column!r}; available columns: {columns}")
    root = options.images_root or os.path.dirname(os.path.abspath(path))
    for n, row in enumerate(rows):
        name = row.get(options.image_column)
        if not isinstance(name, str) or not name.strip():
            raise SourceError(f"{path}: row {n} has no image path in {options.image_column!r}")
        name = name.strip()
        key = jsonable(row.get("key"))
        # Embedded bytes (an image column, say) have no JSON form and do not belong in meta.
        meta = {k: jsonable(v) for k, v in row.items()
                if k not in (options.image_column, options.caption_column)
                and not isinstance(v, (bytes, bytearray))}
        yield SourceRecord(
            source_key=str(key) if key not in (None, "") else PurePath(name).stem,
            image=resolve_image(name, root, root),
            image_name=name,
            captions=caption_list(row.get(options.caption_column)),
            meta=meta,
        )
