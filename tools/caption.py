"""Synthetic captions: the sidecar the converter joins onto samples.

A sidecar is JSONL (`{"key" | "image" | "image_id": ..., "caption": str | [str, ...]}` per line)
or TSV (`<id>\\t<caption>` per line, optional header naming the id column `key`, `image` or
`image_id`). Several lines for the same id add captions. A source record matches by its
source key, its image id, its image path as the source names it, or that path's file name,
in that order.
"""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

from tools.sources.base import SourceRecord

JOIN_FIELDS = ("key", "image_id", "image")


@dataclass
class CaptionSidecar:
    path: str
    by: dict[str, dict[str, list[str]]] = field(default_factory=lambda: {f: defaultdict(list) for f in JOIN_FIELDS})

    def add(self, field_name: str, ident, captions) -> None:
        if isinstance(captions, str):
            captions = [captions]
        ident = str(ident)
        if field_name == "image":
            ident = ident.replace("\\", "/")
        self.by[field_name][ident].extend(c for c in captions if c and c.strip())

    def lookup(self, record: SourceRecord) -> list[str]:
        name = record.image_name.replace("\\", "/")
        candidates = (("key", record.source_key), ("image_id", record.meta.get("image_id")),
                      ("image", name), ("image", os.path.basename(name)))
        for field_name, ident in candidates:
            if ident is not None and (hit := self.by[field_name].get(str(ident))):
                return list(hit)
        return []


def load_sidecar(path: str) -> CaptionSidecar:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: synthetic-caption sidecar not found; "
                                "pass --synthetic-captions pointing to a JSONL or TSV file")
    sidecar = CaptionSidecar(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith((".tsv", ".txt", ".csv")):
            _read_tsv(f, sidecar)
        else:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                field_name = next((k for k in JOIN_FIELDS if k in row), None)
                if field_name is None or "caption" not in row:
                    raise ValueError(f"{path}:{n}: a sidecar line needs one of {JOIN_FIELDS} "
                                     "and a 'caption' (string or list)")
                sidecar.add(field_name, row[field_name], row["caption"])
    return sidecar


def _read_tsv(f, sidecar: CaptionSidecar) -> None:
    delimiter = "," if sidecar.path.endswith(".csv") else "\t"
    rows = csv.reader(f, delimiter=delimiter)
    fields = JOIN_FIELDS  # without a header the id may be any of them
    for n, row in enumerate(rows):
        if len(row) < 2:
            continue
        if n == 0 and row[0].strip() in JOIN_FIELDS and row[1].strip() == "caption":
            fields = (row[0].strip(),)
            continue
        for field_name in fields:
            sidecar.add(field_name, row[0].strip(), row[1])
