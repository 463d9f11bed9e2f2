"""Convert one shard's slice of the input: read, check, transform, write every requested format.

Runs in a worker process. A shard is a fixed slice of the input items, so its content depends
only on the input and the arguments, never on the worker count or on which shards ran before:
that is what makes conversion deterministic and resumable.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipelines.formats.folder_index import PIECE_SUFFIX, shard_piece, write_piece
from pipelines.formats.base import shard_stem, write_json_atomic
from pipelines.formats.registry import DATA_SUFFIX, WRITERS
from pipelines.schema import Sample
from pipelines.text import tokenize
from tools.fault_hooks import FAULT_DIR_ENV, shard_fault  # noqa: F401 - FAULT_DIR_ENV: the tests' name for it
from tools.convert.image_policy import ImagePolicy, SkipSample, process_image
from tools.convert.remote_out import publish_shard
from tools.convert.sources.base import SourceRecord, TarMember

TOKENIZE_BLOCK = 256  # samples tokenized per call: batching amortizes the tokenizer's overhead
PARTS_DIR = ".parts"  # per format folder: per-shard completion records that --resume trusts


@dataclass
class WorkItem:
    """One sample-to-be: a record with the raw caption chosen for it (None: the image has none)."""

    index: int
    record: SourceRecord
    txt: str | None
    syn: list[str] = field(default_factory=list)
    other_captions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShardJob:
    out: str
    formats: tuple[str, ...]
    policy: ImagePolicy
    tokenize: bool  # tokens in wds/arrow; rec always carries them (ALIP's label)
    keep_uncaptioned: bool
    source: str
    remote: str | None = None  # --out s3://...: `out` is the staging folder, shards are published here


def init_worker() -> None:
    """Start of a forked worker: the tokenizer builds its output with torch, and a torch op that
    enters an OpenMP region the parent had started deadlocks in the child (libgomp is not
    fork-safe; seen with `make demo`). One thread keeps every op inline, as DataLoader workers do."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def read_image_bytes(ref) -> bytes:
    if isinstance(ref, TarMember):
        with open(ref.tar_path, "rb") as f:
            f.seek(ref.offset)
            return f.read(ref.size)
    try:
        with open(ref, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise SkipSample("missing_file", str(ref)) from e
    except OSError as e:
        raise SkipSample("read_error", f"{ref}: {e}") from e


def part_path(out: str, fmt: str, shard: int) -> str:
    return os.path.join(out, fmt, PARTS_DIR, shard_stem(shard) + ".json")


def _sample(item: WorkItem, job: ShardJob) -> Sample:
    if item.txt is None and not job.keep_uncaptioned:
        raise SkipSample("no_caption")
    image = process_image(read_image_bytes(item.record.image), job.policy)
    meta = dict(item.record.meta)
    meta.update(source=job.source, source_key=item.record.source_key, image=item.record.image_name,
                original_width=image.original_width, original_height=image.original_height,
                width=image.width, height=image.height, image_format=image.ext)
    if item.other_captions:
        meta["other_captions"] = item.other_captions
    return Sample(key=f"{item.index:09d}", image=image.data, txt=item.txt or "",
                  syn=item.syn, meta=meta, image_ext=image.ext)


def set_tokens(samples: list[Sample]) -> None:
    """Tokenize every caption of `samples` in one call: `Sample.tokens` int32 [1 + max(1, S), 77]
    = raw text, then each of the S synthetic captions (the raw text again when S = 0)."""
    tokens = tokenize([t for s in samples for t in (s.txt, *s.syn)])
    start = 0
    for s in samples:
        rows = tokens[start:start + 1 + len(s.syn)]
        start += len(rows)
        s.tokens = rows if s.syn else np.repeat(rows, 2, axis=0)


def convert_shard(shard: int, items: list[WorkItem], job: ShardJob) -> dict:
    """Write shard `shard` in every format and its completion record; return that record."""
    shard_fault(shard_stem(shard))  # test hooks (tools/fault_hooks.py); inert otherwise
    need_tokens = job.tokenize or "rec" in job.formats
    writers = {}
    for fmt in job.formats:
        os.makedirs(os.path.join(job.out, fmt), exist_ok=True)  # a Ray node's own staging folder
        kwargs = {"id_base": items[0].index} if fmt == "rec" else {}
        writers[fmt] = WRITERS[fmt](os.path.join(job.out, fmt), shard,
                                    with_tokens=need_tokens if fmt == "rec" else job.tokenize, **kwargs)
    skipped: Counter = Counter()
    first_skip: dict[str, str] = {}
    with_syn = 0
    try:
        for block in range(0, len(items), TOKENIZE_BLOCK):
            samples = []
            for item in items[block:block + TOKENIZE_BLOCK]:
                try:
                    samples.append(_sample(item, job))
                except SkipSample as e:
                    skipped[e.reason] += 1
                    first_skip.setdefault(e.reason, f"{item.record.image_name}: {e}")
            if need_tokens and samples:
                set_tokens(samples)
            for sample in samples:
                with_syn += bool(sample.syn)
                for w in writers.values():
                    w.write(sample)
        files = {fmt: w.close() for fmt, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    written = next(iter(files.values())).samples
    counts = {
        "shard": shard_stem(shard), "first_index": items[0].index, "read": len(items),
        "written": written, "skipped": dict(sorted(skipped.items())), "examples": first_skip,
        "with_syn": with_syn,
    }
    # Each format folder gets its own record, so folders stay self-contained and resumable alone.
    for fmt, f in files.items():
        path = part_path(job.out, fmt, shard)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if f.samples:  # the shard's piece of the folder index, while its data file is at hand
            write_piece(path[: -len(".json")] + PIECE_SUFFIX, fmt,
                        shard_piece(os.path.join(job.out, fmt), fmt, shard_stem(shard) + DATA_SUFFIX[fmt], f.files))
        write_record(path, {**counts, "samples": f.samples, "files": f.files})
        if job.remote:
            publish_shard(job.remote, job.out, fmt, f.files, path)
    return {**counts, "files": {fmt: {"samples": f.samples, "files": f.files} for fmt, f in files.items()}}


def write_record(path: str, record: dict) -> None:
    """A shard's completion record (make-shards writes it; attach-captions --in-place updates it)."""
    write_json_atomic(path, record, indent=None)


def shard_is_complete(out: str, formats: tuple[str, ...], shard: int,
                      remote_sizes: dict[str, dict[str, int]] | None = None) -> dict | None:
    """The shard's record if every format has it and every file it names is on disk at its size
    (with `remote_sizes`, {format: {name: bytes}} of an object store: there)."""
    record = None
    for fmt in formats:
        path = part_path(out, fmt, shard)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            part = json.load(f)
        for name, info in part["files"].items():
            if remote_sizes is not None:
                if remote_sizes[fmt].get(name) != info["bytes"]:
                    return None
                continue
            p = os.path.join(out, fmt, name)
            if not os.path.exists(p) or os.path.getsize(p) != info["bytes"]:
                return None
        if record is None:
            record = {k: v for k, v in part.items() if k not in ("samples", "files")} | {"files": {}}
        record["files"][fmt] = {"samples": part["samples"], "files": part["files"]}
    return record
