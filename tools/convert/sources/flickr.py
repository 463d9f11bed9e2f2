"""Flickr8k / Flickr30k captions, in the three layouts they are published in.

- `captions.txt` / `results.csv`: CSV with a header naming the image and caption columns
  (`image,caption` as in the Kaggle Flickr8k; `image_name| comment_number| comment` as in the Kaggle
  Flickr30k, whose delimiter is `|`). One row per caption, grouped by image in first-appearance
  order.
- Karpathy's `dataset_flickr8k.json` / `dataset_flickr30k.json` (also `dataset_coco.json`):
  `{"images": [{"filename", "split", "sentences": [{"raw"}], "imgid"}]}`; `--split` keeps one split
  (`train` also keeps `restval`, as every Karpathy-split trainer does).
- An ALBEF/BLIP row list (`flickr30k_train.json`), read as `coco-karpathy` reads it.

Images are looked up in `--images-root`, else in the first of `Images/`, `images/`,
`flickr30k-images/`, `flickr30k_images/` beside the file (the published archives' folder names),
else beside the file. source_key is the image file's stem.
"""
from __future__ import annotations

import csv
import os
from pathlib import PurePath
from typing import Iterator

from tools.convert.sources.base import SourceError, SourceOptions, SourceRecord, resolve_image
from tools.convert.sources.coco import albef_records, load_json

_IMAGE_DIRS = ("Images", "images", "flickr30k-images", "flickr30k_images")
_IMAGE_COLUMNS = ("image", "image_name", "filename")
_CAPTION_COLUMNS = ("caption", "comment")


def _default_root(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    for name in _IMAGE_DIRS:
        if os.path.isdir(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return folder


def _read_csv(path: str, root: str) -> Iterator[SourceRecord]:
    grouped: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        header_line = f.readline()
        delimiter = max(",|\t", key=header_line.count)
        header = [c.strip().lower() for c in next(csv.reader([header_line], delimiter=delimiter))]
        image_col = next((header.index(c) for c in _IMAGE_COLUMNS if c in header), None)
        caption_col = next((header.index(c) for c in _CAPTION_COLUMNS if c in header), None)
        if image_col is None or caption_col is None:
            raise SourceError(f"{path}: header {header} names no image column {_IMAGE_COLUMNS} "
                              f"or no caption column {_CAPTION_COLUMNS}; expected 'image,caption'")
        for row in csv.reader(f, delimiter=delimiter):
            if len(row) <= image_col or not row[image_col].strip():
                continue
            caps = grouped.setdefault(row[image_col].strip(), [])
            # A short row (Flickr30k's results.csv has one) still lists its image, without caption.
            if len(row) > caption_col and row[caption_col].strip():
                caps.append(row[caption_col].strip())
    for name, caps in grouped.items():
        yield SourceRecord(PurePath(name).stem, resolve_image(name, root, root), name, caps, {})


def _read_karpathy(path: str, data: dict, root: str, split: str | None) -> Iterator[SourceRecord]:
    if "images" not in data:
        raise SourceError(f"{path}: no 'images' list; expected the layout of Karpathy's "
                          "dataset_flickr8k.json")
    keep = None if split is None else ({"train", "restval"} if split == "train" else {split})
    for img in data["images"]:
        if keep is not None and img.get("split") not in keep:
            continue
        # dataset_coco.json puts the split folder in `filepath`; the Flickr files have none.
        name = "/".join(p for p in (img.get("filepath"), img["filename"]) if p)
        meta = {"image_id": img.get("cocoid", img.get("imgid")), "split": img.get("split")}
        caps = [s.get("raw", "").strip() for s in img.get("sentences", [])]
        yield SourceRecord(PurePath(name).stem, resolve_image(name, root, root), name,
                           [c for c in caps if c], meta)


def read(path: str, options: SourceOptions) -> Iterator[SourceRecord]:
    what = "Flickr captions.txt (CSV), Karpathy dataset_flickr8k.json or an ALBEF flickr30k_*.json"
    if path.lower().endswith(".json"):
        data = load_json(path, what)
        if isinstance(data, list):
            yield from albef_records(path, data, options)
        else:
            yield from _read_karpathy(path, data, options.images_root or _default_root(path),
                                      options.split)
        return
    if not os.path.isfile(path):
        raise SourceError(f"{path}: not found; pass --input pointing to a {what}")
    yield from _read_csv(path, options.images_root or _default_root(path))
