"""Synthetic captions: the sidecar the converter joins onto samples.

A sidecar is JSONL (`{"image" | "key" | "image_id": ..., "caption": str | [str, ...]}` per line)
or TSV (`<id>\\t<caption>` per line, optional header naming the id column `image`, `key` or
`image_id`). Several lines for the same id add captions.

An image matches a line in one of two ways:
1. **By identity**: the line's `image` is the image's identity, its path relative to the images
   root (`tools.convert.sources.base.image_identity`: `a/000000001.jpg`). Unique by construction, always
   trusted; caption-shards writes these lines.
2. **By a looser name**, for sidecars written by hand or by older versions, in this order: `key`
   = the source key (a file stem, a YFCC photo id), `image_id`, `image` = the file name alone.
   Such a line is used only when exactly one image of the whole input answers to it: a line that
   two images answer to (`a/000000001.jpg` and `b/000000001.jpg` share the stem `000000001`) is
   ambiguous and given to neither. Knowing that takes one pass over the input's listing, made
   once, when the first looser match is needed (never for a sidecar of identities alone).
Images left without captions are counted as unmatched or ambiguous, the first few named
(`JoinCounts`).
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from tools.convert.sources.base import SourceRecord, image_identity

JOIN_FIELDS = ("image", "key", "image_id")  # a JSONL line is keyed by the first of these it holds
EXAMPLES = 5  # unmatched and ambiguous images named per run
_AMBIGUOUS = object()

Listing = Callable[[], Iterable[SourceRecord]]  # every record of the input, once more


@dataclass
class CaptionSidecar:
    path: str
    by: dict[str, dict[str, list[str]]] = field(default_factory=lambda: {f: defaultdict(list) for f in JOIN_FIELDS})
    _owner: dict | None = field(default=None, repr=False)  # looser name -> the one identity answering to it

    def add(self, field_name: str, ident, captions) -> None:
        if isinstance(captions, str):
            captions = [captions]
        ident = image_identity(str(ident)) if field_name == "image" else str(ident)
        self.by[field_name][ident].extend(c for c in captions if c and c.strip())

    def loose_names(self, record: SourceRecord) -> list[tuple[str, str]]:
        """The lines `record` answers to other than by identity: (field, id) pairs, in match order."""
        identity = record.identity
        names = (("key", record.source_key), ("image_id", record.meta.get("image_id")),
                 ("image", identity.rsplit("/", 1)[-1]))
        return [(f, str(v)) for f, v in names
                if v not in (None, "") and str(v) in self.by[f] and (f, str(v)) != ("image", identity)]

    def resolve(self, records: Iterable[SourceRecord]) -> None:
        """Find which looser lines exactly one image answers to (one pass over the listing)."""
        owner: dict = {}
        for record in records:
            identity = record.identity
            names = self.loose_names(record)
            if identity in self.by["image"]:  # a line naming this image exactly is its alone
                names.append(("image", identity))
            for name in names:
                if owner.setdefault(name, identity) != identity:
                    owner[name] = _AMBIGUOUS
        self._owner = owner

    def match(self, record: SourceRecord, listing: Listing) -> tuple[list[str] | None, str]:
        """(the captions for `record` or None, how: identity | key | image_id | file_name |
        ambiguous | unmatched). `listing` lists the whole input, for the looser names."""
        hit = self.by["image"].get(record.identity)
        if hit:
            return list(hit), "identity"
        names = self.loose_names(record)
        if not names:
            return None, "unmatched"
        if self._owner is None:
            self.resolve(listing())
        for field_name, ident in names:
            if self._owner.get((field_name, ident)) == record.identity:
                return list(self.by[field_name][ident]), "file_name" if field_name == "image" else field_name
        return None, "ambiguous"


@dataclass
class JoinCounts:
    """How the images (or samples) of a run met the sidecar."""

    path: str
    matched: Counter = field(default_factory=Counter)  # by how
    missed: Counter = field(default_factory=Counter)  # unmatched, ambiguous
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, how: str, identity: str) -> None:
        if how in ("unmatched", "ambiguous"):
            self.missed[how] += 1
            self.add_example(how, identity)
        else:
            self.matched[how] += 1

    def update(self, other: dict) -> None:
        """Add counts kept as `as_dict()` (a shard's record)."""
        self.matched.update(other["matched_by"])
        for how in ("unmatched", "ambiguous"):
            self.missed[how] += other[how]
            for name in other["examples"].get(how, []):
                self.add_example(how, name)

    def add_example(self, how: str, identity: str) -> None:
        names = self.examples.setdefault(how, [])
        if len(names) < EXAMPLES and identity not in names:
            names.append(identity)

    def as_dict(self) -> dict:
        return {"file": self.path, "matched": sum(self.matched.values()),
                "matched_by": dict(sorted(self.matched.items())), "unmatched": self.missed["unmatched"],
                "ambiguous": self.missed["ambiguous"], "examples": dict(sorted(self.examples.items()))}



def join_summary(counts: dict) -> str:
    """`JoinCounts.as_dict()` in words: matched, unmatched and ambiguous, naming some missed."""
    text = f"{counts['matched']} matched, {counts['unmatched']} unmatched, {counts['ambiguous']} ambiguous"
    named = "; ".join(f"{how}: {', '.join(names)}" for how, names in counts["examples"].items())
    return f"{text} ({named})" if named else text


class SidecarJoin:
    """A sidecar joined onto one input: the captions of each record, and how they were found."""

    def __init__(self, sidecar: CaptionSidecar, listing: Listing):
        self.sidecar, self.listing = sidecar, listing
        self.counts = JoinCounts(os.path.abspath(sidecar.path))

    def captions(self, record: SourceRecord) -> list[str] | None:
        """The sidecar's captions for `record`; None when no line is its (counted either way)."""
        found, how = self.sidecar.match(record, self.listing)
        self.counts.add(how, record.identity)
        return found


def stored_line_id(meta: dict, sample_key: str) -> tuple[str, str]:
    """How a sidecar line names the image of a stored sample: ("image", its identity) for what
    make-shards wrote (`meta.image`), else ("key", its source key or shard sample key)."""
    if meta.get("image"):
        return "image", image_identity(str(meta["image"]))
    return "key", str(meta.get("source_key") or sample_key)


def stored_record(meta: dict, sample_key: str) -> SourceRecord:
    """A stored sample as the record it was made from, for `CaptionSidecar.match`. Its shard
    sample key (a 9-digit input position) stands in for a source key only in shards that carry
    neither an image path nor a source key: it says nothing about which image it is."""
    field_name, ident = stored_line_id(meta, sample_key)
    if field_name == "image":
        return SourceRecord(str(meta.get("source_key") or ""), "", str(meta["image"]), meta=meta)
    return SourceRecord(ident, "", "", meta=meta)


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
