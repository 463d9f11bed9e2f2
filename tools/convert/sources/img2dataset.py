"""img2dataset output folders, in its `webdataset` and `files` layouts.

- webdataset: `00000.tar`, `00001.tar`, ... each holding `{key}.jpg` (or .png/.webp), `{key}.txt`
  and `{key}.json`. Images are yielded as `TarMember`s (offset of the member's data, its size), so
  workers read them without opening the tar; captions and meta come from the tar's own .txt/.json.
  `--input` may also name one tar.
- files: subfolders `00000/`, ... holding the same three files per key.
The `.parquet` and `_stats.json` beside them also list failed downloads; only the samples that
made it to disk are read. Order: shards sorted by name; tar order inside a tar, key order inside a
folder. source_key is img2dataset's key. image_name is `<shard>/<key>.<ext>` in both layouts, so a
sidecar made from one layout joins on the other. meta is the sample's JSON less the download status.
"""
from __future__ import annotations

import json
import os
import tarfile
from typing import Iterator

from tools.convert.sources.base import SourceError, SourceOptions, SourceRecord, TarMember

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
# Every saved sample has status "success" and no error: they describe the download, not the image.
_DROP = ("status", "error_message")


def _record(key: str, shard: str, image, ext: str, txt: str | None, meta: dict) -> SourceRecord:
    meta = {k: v for k, v in meta.items() if k not in _DROP}
    caption = (txt or "").strip()
    return SourceRecord(key, image, f"{shard}/{key}{ext}", [caption] if caption else [], meta)


def _split(name: str) -> tuple[str, str]:
    """(key, extension) the webdataset way: the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), dot + ext.lower()


def _read_tar(tar_path: str) -> Iterator[SourceRecord]:
    shard = os.path.basename(tar_path)[: -len(".tar")]
    samples: dict[str, dict] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split(member.name)
            sample = samples.setdefault(key, {})
            if ext in _IMAGE_EXTS:
                sample["image"] = (TarMember(os.path.abspath(tar_path), member.offset_data,
                                             member.size, member.name), ext)
            elif ext in (".txt", ".json"):
                sample[ext] = tar.extractfile(member).read().decode("utf-8")
    for key, sample in samples.items():
        if "image" in sample:
            image, ext = sample["image"]
            meta = json.loads(sample[".json"]) if ".json" in sample else {}
            yield _record(key, shard, image, ext, sample.get(".txt"), meta)


def _read_folder(folder: str) -> Iterator[SourceRecord]:
    shard = os.path.basename(folder)
    for name in sorted(os.listdir(folder)):
        key, ext = _split(name)
        if ext not in _IMAGE_EXTS:
            continue
        base = os.path.join(folder, key)
        txt = meta = None
        if os.path.isfile(base + ".txt"):
            with open(base + ".txt", encoding="utf-8") as f:
                txt = f.read()
        if os.path.isfile(base + ".json"):
            with open(base + ".json", encoding="utf-8") as f:
                meta = json.load(f)
        yield _record(key, shard, os.path.abspath(os.path.join(folder, name)), ext, txt, meta or {})


def read(path: str, options: SourceOptions) -> Iterator[SourceRecord]:
    if path.endswith(".tar") and os.path.isfile(path):
        yield from _read_tar(path)
        return
    if not os.path.isdir(path):
        raise SourceError(f"{path}: not found; pass --input pointing to an img2dataset output "
                          "folder (webdataset or files output_format)")
    names = sorted(os.listdir(path))
    tars = [n for n in names if n.endswith(".tar")]
    folders = [n for n in names if n.isdigit() and os.path.isdir(os.path.join(path, n))]
    if not tars and not folders:
        raise SourceError(f"{path}: no NNNNN.tar shards nor NNNNN/ folders; run img2dataset with "
                          "output_format='webdataset' or 'files' (its parquet layout embeds the "
                          "images and is not supported)")
    for name in tars:
        yield from _read_tar(os.path.join(path, name))
    for name in folders:
        yield from _read_folder(os.path.join(path, name))
