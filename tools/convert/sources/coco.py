"""COCO captions: the official layout (`coco`) and the ALBEF/BLIP Karpathy layout (`coco-karpathy`).

Official: `annotations/captions_<split>.json` holding `images`, `annotations` (one caption each,
grouped here by `image_id` in file order) and `licenses`. Images are looked up in
`<json folder>/../<split>/` as the COCO download unpacks them, else in the JSON's folder;
`--images-root` overrides both.

Karpathy/ALBEF: a JSON list; train rows `{image, caption, image_id}` (one row per caption, grouped
by image in order of first appearance), test/val rows `{image, caption: [...]}`. `image` is relative
to the COCO root; ALBEF keeps these files in `<root>/annotation/`, so the root defaults to the JSON
folder's parent, or to the JSON's folder when only that one holds the first image.

source_key is the image file's stem (`000000493652`), as in COCO's own file names.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import PurePath
from typing import Iterator

from tools.convert.sources.base import SourceError, SourceOptions, SourceRecord, resolve_image


def load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise SourceError(f"{path}: not found; pass --input pointing to {what}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: not valid JSON ({e}); expected {what}") from e


def _official_root(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    split = re.fullmatch(r"captions_(.+)\.json", os.path.basename(path))
    if split:
        guess = os.path.join(os.path.dirname(folder), split.group(1))
        if os.path.isdir(guess):
            return guess
    return folder


def read(path: str, options: SourceOptions) -> Iterator[SourceRecord]:
    """Official COCO captions JSON → one record per entry of `images`, in file order."""
    data = load_json(path, "a COCO captions JSON such as annotations/captions_train2017.json")
    if isinstance(data, list):
        raise SourceError(f"{path}: a list of rows, not the official COCO layout; "
                          "use --source coco-karpathy for ALBEF/BLIP Karpathy files")
    missing = [k for k in ("images", "annotations") if k not in data]
    if missing:
        raise SourceError(f"{path}: no {missing} in the JSON; expected the official COCO captions "
                          "layout (images, annotations, licenses)")
    licenses = {lic.get("id"): lic for lic in data.get("licenses", [])}
    captions: dict[object, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann.get("caption") or "")
    root = options.images_root or _official_root(path)
    for img in data["images"]:
        name = img["file_name"]
        meta = {"image_id": img["id"], "width": img.get("width"), "height": img.get("height")}
        lic = licenses.get(img.get("license"))
        if lic is not None:
            meta["license"] = lic.get("name")
            meta["license_url"] = lic.get("url")
        meta.update({k: img[k] for k in ("coco_url", "flickr_url") if img.get(k)})
        yield SourceRecord(
            source_key=PurePath(name).stem,
            image=resolve_image(name, root, root),
            image_name=name,
            captions=[c.strip() for c in captions.get(img["id"], []) if c.strip()],
            meta=meta,
        )


def _albef_root(path: str, first_image: str | None) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    parent = os.path.dirname(folder)
    if first_image and not os.path.exists(os.path.join(parent, first_image)) \
            and os.path.exists(os.path.join(folder, first_image)):
        return folder
    return parent


def albef_records(path: str, rows: list, options: SourceOptions) -> Iterator[SourceRecord]:
    """Records from an ALBEF/BLIP row list (COCO or Flickr30k Karpathy splits)."""
    grouped: dict[str, tuple[list, dict]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            raise SourceError(f"{path}: row {i} is not an object with 'image' and 'caption'; "
                              "expected the ALBEF/BLIP layout")
        caps, meta = grouped.setdefault(row["image"], ([], {}))
        caps.extend([row["caption"]] if isinstance(row["caption"], str) else row["caption"])
        if "image_id" in row:
            meta.setdefault("image_id", row["image_id"])
    root = options.images_root or _albef_root(path, next(iter(grouped), None))
    for name, (caps, meta) in grouped.items():
        yield SourceRecord(
            source_key=PurePath(name).stem,
            image=resolve_image(name, root, root),
            image_name=name,
            captions=[c.strip() for c in caps if isinstance(c, str) and c.strip()],
            meta=meta,
        )


def read_karpathy(path: str, options: SourceOptions) -> Iterator[SourceRecord]:
    """ALBEF/BLIP Karpathy JSON list → one record per distinct `image`, first-appearance order."""
    rows = load_json(path, "an ALBEF/BLIP Karpathy JSON such as coco_karpathy_train.json")
    if not isinstance(rows, list):
        raise SourceError(f"{path}: a JSON object, not a list of rows; use --source coco for the "
                          "official COCO layout or --source flickr for dataset_*.json")
    yield from albef_records(path, rows, options)
