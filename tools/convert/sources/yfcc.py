"""YFCC15M / YFCC100M metadata tables: CSV, TSV, JSONL, JSON or Parquet, read as `table` reads them.

Columns used, by the YFCC100M dump's names: `photoid` or `key` (source_key; else the image stem),
`filepath` or `path` (the downloaded image, relative to `--images-root`, default the table's
folder), `title`, `description`, `usertags` or `tags`, `downloadurl`, `licensename`, `licenseurl`.

The dump URL-encodes its text fields with '+' for spaces (`A+day+at+the+beach`, tags
`new+york,beach`); they are decoded with `unquote_plus`. A value holding a space was already
decoded (the cleaned YFCC15M releases are) and is kept as is, so text such as "C++ code" survives.
`--yfcc-caption` picks the texts: `title`, `description`, `tags` (one caption, tags joined by
", "), `title+description` (default: title and description as two captions, as ALIP and SLIP treat
them) or `all` (title, description, tags). Empty fields give no caption.
"""
from __future__ import annotations

import os
from pathlib import PurePath
from typing import Iterator
from urllib.parse import unquote_plus

from tools.convert.sources.base import SourceError, SourceOptions, SourceRecord, resolve_image
from tools.convert.sources.table import jsonable, open_table

CAPTION_MODES = {
    "title": ("title",),
    "description": ("description",),
    "tags": ("tags",),
    "title+description": ("title", "description"),
    "all": ("title", "description", "tags"),
}
_PATH_COLUMNS = ("filepath", "path", "image", "file")
_META = {"photoid": "photoid", "key": "key", "downloadurl": "url", "licensename": "license",
         "licenseurl": "license_url"}


def _decode(value) -> str:
    if not isinstance(value, str):
        return ""
    return value.strip() if " " in value else unquote_plus(value).strip()


def _tags(value) -> str:
    tags = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    return ", ".join(t for t in (_decode(t) for t in tags) if t)


def read(path: str, options: SourceOptions) -> Iterator[SourceRecord]:
    fields = CAPTION_MODES.get(options.yfcc_caption)
    if fields is None:
        raise SourceError(f"--yfcc-caption {options.yfcc_caption!r}: expected one of "
                          f"{sorted(CAPTION_MODES)}")
    columns, rows = open_table(path)
    path_col = next((c for c in _PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise SourceError(f"{path}: no image path column {_PATH_COLUMNS}; available columns: "
                          f"{columns}. Add the downloaded file's path as a 'filepath' column")
    tags_col = "usertags" if "usertags" in columns else "tags"
    root = options.images_root or os.path.dirname(os.path.abspath(path))
    for n, row in enumerate(rows):
        name = row.get(path_col)
        if not isinstance(name, str) or not name.strip():
            raise SourceError(f"{path}: row {n} has no image path in {path_col!r}")
        name = name.strip()
        texts = {"title": _decode(row.get("title")),
                 "description": _decode(row.get("description")),
                 "tags": _tags(row.get(tags_col))}
        meta = {new: jsonable(row[old]) for old, new in _META.items() if row.get(old) is not None}
        if "license" in meta:
            meta["license"] = _decode(meta["license"])
        key = meta.get("photoid", meta.get("key"))
        yield SourceRecord(
            source_key=str(key) if key not in (None, "") else PurePath(name).stem,
            image=resolve_image(name, root, root),
            image_name=name,
            captions=[texts[f] for f in fields if texts[f]],
            meta=meta,
        )
