"""Source adapters: `--source NAME` → a function listing that dataset as `SourceRecord`s."""
from __future__ import annotations

from tools.convert.sources import cc, coco, flickr, img2dataset, table, yfcc
from tools.convert.sources.base import Source, SourceError, SourceOptions, SourceRecord, TarMember

SOURCES: dict[str, Source] = {
    "coco": coco.read,
    "coco-karpathy": coco.read_karpathy,
    "flickr": flickr.read,
    "cc": cc.read,
    "yfcc": yfcc.read,
    "img2dataset": img2dataset.read,
    "table": table.read,
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; valid sources: {', '.join(SOURCES)}") from None


__all__ = ["SOURCES", "Source", "SourceError", "SourceOptions", "SourceRecord", "TarMember",
           "get_source"]
