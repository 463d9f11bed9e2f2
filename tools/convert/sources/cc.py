"""Conceptual Captions CC3M / CC12M: one image per row, a caption column and an image column.

Accepted: `.tsv` (and `.csv`) with or without a header row, e.g. CC3M's `Train_GCC-training.tsv`
(`caption<TAB>url`, no header), CC12M's `cc12m.tsv` (`url<TAB>caption`, no header), or
img2dataset-style tables with a header (`url<TAB>caption`, `caption<TAB>image`, ...).
- The first row is a header when it holds a known column name (caption, text, url, image, path,
  filepath); columns beyond the two used go into `meta`. Without a header there must be exactly
  two columns, and the caption column is the one whose first value does not look like a path/URL.
- TSV is read without quote handling: the published TSVs are raw text and their captions contain
  bare `"`. CSV uses the csv module's quoting.
- The image column must hold local files: absolute paths, paths relative to `--images-root`
  (default: the table's folder) or `file://` URLs. Any other URL (http, https, s3, ...) is an error,
  since downloading is img2dataset's job.
- source_key is the image file's stem; a stem seen earlier in the file gets `_<row>` appended
  (row = 0-based data row), so keys are unique and depend only on the file.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import PurePath
from typing import Iterator
from urllib.parse import unquote, urlparse

from tools.convert.sources.base import SourceError, SourceOptions, SourceRecord, resolve_image

_CAPTION_NAMES = ("caption", "text")
_IMAGE_NAMES = ("url", "image", "path", "filepath")
_PATH_LIKE = re.compile(r"^([a-z][a-z0-9+.-]*://|\.{0,2}/)|^\S+\.(jpe?g|png|webp|gif|bmp|tiff?)$",
                        re.IGNORECASE)


def _remote(path: str, row: int, url: str) -> SourceError:
    return SourceError(
        f"{path}: row {row} names a remote image ({url}); downloading is out of scope. "
        f"Download the images with img2dataset (`img2dataset --url_list {path} --input_format tsv "
        "--output_format webdataset ...`, as in its CC3M/CC12M examples) and convert its output "
        "folder with --source img2dataset")


def _columns(path: str, first: list[str]) -> tuple[bool, int, int]:
    """(has_header, caption column, image column) from the first row."""
    names = [c.strip().lower() for c in first]
    if any(n in _CAPTION_NAMES + _IMAGE_NAMES for n in names):
        caption = next((names.index(n) for n in _CAPTION_NAMES if n in names), None)
        image = next((names.index(n) for n in _IMAGE_NAMES if n in names), None)
        if caption is None or image is None:
            raise SourceError(f"{path}: header {first} needs a caption column {_CAPTION_NAMES} "
                              f"and an image column {_IMAGE_NAMES}")
        return True, caption, image
    if len(first) != 2:
        raise SourceError(f"{path}: {len(first)} columns and no header; expected caption and "
                          f"url/path, or a header naming {_CAPTION_NAMES} and {_IMAGE_NAMES}")
    looks_path = [bool(_PATH_LIKE.search(c.strip())) for c in first]
    if looks_path.count(True) != 1:
        raise SourceError(f"{path}: cannot tell the caption column from the image column in the "
                          f"first row {first}; add a header row such as 'caption<TAB>url'")
    image = looks_path.index(True)
    return False, 1 - image, image


def read(path: str, options: SourceOptions) -> Iterator[SourceRecord]:
    if not os.path.isfile(path):
        raise SourceError(f"{path}: not found; pass --input pointing to a CC3M/CC12M .tsv "
                          "(caption and local image path columns)")
    root = options.images_root or os.path.dirname(os.path.abspath(path))
    if path.lower().endswith(".csv"):
        dialect = {"delimiter": ","}
    else:
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    seen: set[str] = set()
    with open(path, newline="", encoding="utf-8") as f:
        rows = (r for r in csv.reader(f, **dialect) if any(c.strip() for c in r))
        first = next(rows, None)
        if first is None:
            return
        has_header, caption_col, image_col = _columns(path, first)
        extra = [(i, c.strip()) for i, c in enumerate(first) if i not in (caption_col, image_col)]
        data = rows if has_header else _prepend(first, rows)
        for n, row in enumerate(data):
            if len(row) <= max(caption_col, image_col):
                raise SourceError(f"{path}: data row {n} has {len(row)} columns: {row}")
            name = row[image_col].strip()
            scheme = urlparse(name).scheme.lower()
            if len(scheme) > 1 and scheme != "file":  # one letter: a Windows drive
                raise _remote(path, n, name)
            image = unquote(urlparse(name).path) if scheme == "file" else name
            key = PurePath(image).stem
            if key in seen:
                key = f"{key}_{n}"
            seen.add(key)
            meta = {"row": n}
            if has_header:
                meta.update({c: row[i] for i, c in extra if i < len(row)})
            caption = row[caption_col].strip()
            yield SourceRecord(key, resolve_image(image, root, root), name,
                               [caption] if caption else [], meta)


def _prepend(first: list[str], rows: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rows
