"""What every source adapter yields: one `SourceRecord` per image, in a deterministic order.

An adapter only *lists* its dataset (paths, captions, metadata); it never reads image bytes, so
listing stays cheap in the main process and the bytes are read by the conversion workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Protocol


@dataclass(frozen=True)
class TarMember:
    """An image stored inside a tar file (img2dataset's webdataset layout): read at `offset`."""

    tar_path: str
    offset: int
    size: int
    name: str


ImageRef = "str | TarMember"


@dataclass
class SourceRecord:
    """One image of a source dataset with all its raw captions.

    source_key: the image's stable id in its source (file name without folder, COCO image id,
                img2dataset key, ...): what synthetic-caption sidecars join on with "key".
    image:      absolute file path (str) or a TarMember.
    image_name: the image's path as the source names it (relative), joined on with "image".
    captions:   raw captions as published; possibly empty (the converter counts it).
    meta:       JSON-serializable: image_id, url, license, width/height as published, ...
    """

    source_key: str
    image: "str | TarMember"
    image_name: str
    captions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass
class SourceOptions:
    """Adapter options from the command line; each adapter reads the ones it needs."""

    images_root: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    yfcc_caption: str = "title+description"  # title | description | tags | title+description | all
    split: str | None = None  # for multi-split inputs (Karpathy JSON): train | val | test | None=all


class Source(Protocol):
    def __call__(self, path: str, options: SourceOptions) -> Iterator[SourceRecord]: ...


class SourceError(ValueError):
    """Bad input to a source adapter: the message names the file and the fix."""


def resolve_image(path_in_source: str, root: str | None, default_root: str) -> str:
    """Absolute path of an image named relative to `root` (or the input's folder)."""
    if os.path.isabs(path_in_source):
        return path_in_source
    return os.path.abspath(os.path.join(root or default_root, path_in_source))
