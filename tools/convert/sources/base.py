"""What every source adapter yields: one `SourceRecord` per image, in a deterministic order.

An adapter only *lists* its dataset (paths, captions, metadata); it never reads image bytes, so
listing stays cheap in the main process and the bytes are read by the conversion workers.
"""
from __future__ import annotations

import os
import posixpath
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

    source_key: the image's id in its source (file name without folder, YFCC photo id,
                img2dataset key, ...), as people name it; not unique in every source (two
                folders may hold the same file name). Sidecar lines with "key" name it.
    image:      absolute file path (str) or a TarMember.
    image_name: the image's path as the source names it (relative to the images root);
                normalised, it is the image's identity (`identity`), unique within the input.
    captions:   raw captions as published; possibly empty (the converter counts it).
    meta:       JSON-serializable: image_id, url, license, width/height as published, ...
    """

    source_key: str
    image: "str | TarMember"
    image_name: str
    captions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def identity(self) -> str:
        return image_identity(self.image_name)


def image_identity(image_name: str) -> str:
    """What names one image everywhere captions are joined (make-shards' sidecar join,
    caption-shards' lines, attach-captions): its path as the source names it, relative to the
    images root, with `/` separators and `.`/`//` folded (`a/000000001.jpg`, never just the stem).
    Shards keep `image_name` in `meta.image`, so the identity of a stored sample is
    `image_identity(meta["image"])`. Two records share it only when they name the same file."""
    name = image_name.replace("\\", "/")
    if not name or "://" in name:  # a file:// URL (cc) is kept as written
        return name
    return posixpath.normpath(name)


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
