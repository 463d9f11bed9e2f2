"""verify-shards: read a shard folder back and check it against its manifest.

    verify-shards shards/demo          # every format folder below it
    verify-shards shards/demo/wds      # one format folder

Checks: every file the manifest lists exists with its size and sha256; every sample reads back
and its image decodes; per-shard and total counts match the manifest, `stats.json` and (wds)
`sizes.json`; index files match the data (wds: each `.idx` entry is the tar member's data offset
and size; rec: each `.idx` offset holds a record with that id); stored tokens are the manifest
tokenizer's ids of the raw text and of every synthetic caption (`Sample.tokens`: [1 + max(1, S),
77], or [2, 77] from before every caption was stored). Exits 1 naming the first bad shard and
sample (a `ShardError` of pipelines/errors.py, the loader's word for a shard folder that cannot be
used as it is).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
from collections import defaultdict

import numpy as np

from PIL import Image
from tqdm import tqdm

from pipelines.errors import ShardError
from pipelines.formats.folder_index import write_folder_index
from pipelines.formats import recordio, wds
from pipelines.formats.index import INDEX_NAME, FolderIndex
from pipelines.formats.base import file_digest
from pipelines.formats.registry import DATA_SUFFIX, get_format
from pipelines.text import TOKENIZER_NAME, tokenize

Image.MAX_IMAGE_PIXELS = None


def _check_files(folder: str, manifest: dict) -> dict[str, dict]:
    per_stem: dict[str, dict] = defaultdict(dict)
    for entry in manifest["files"]:
        path = os.path.join(folder, entry["name"])
        if not os.path.exists(path):
            raise ShardError(f"{path}: listed in manifest.json but missing")
        if os.path.getsize(path) != entry["bytes"]:
            raise ShardError(f"{path}: {os.path.getsize(path)} bytes, manifest says {entry['bytes']}")
        if file_digest(path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 differs from manifest.json (file changed or corrupt)")
        per_stem[entry["name"].split(".")[0]][entry["name"]] = entry
    return per_stem


def _check_wds_index(tar_path: str) -> None:
    idx_path = tar_path[: -len(".tar")] + ".idx"
    if not os.path.exists(idx_path):
        raise ShardError(f"{tar_path}: index {idx_path} missing; rerun make-shards")
    with tarfile.open(tar_path) as tar:
        members = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    indexed = [(name, off, size) for sample in wds.read_index(idx_path) for _, off, size, name in sample]
    for want, got in zip(members, indexed):
        if want != got:
            raise ShardError(f"{idx_path}: entry {got} does not match tar member {want}")
    if len(members) != len(indexed):
        raise ShardError(f"{idx_path}: {len(indexed)} entries for {len(members)} tar members")


def _check_rec_index(rec_path: str) -> None:
    with open(rec_path, "rb") as f:
        for record_id, offset in recordio.read_index(rec_path[: -len(".rec")] + ".idx"):
            try:
                rid, _, _ = recordio.unpack_payload(recordio.read_record(f, offset))
            except ValueError as e:
                raise ShardError(str(e)) from e
            if rid != record_id:
                raise ShardError(f"{rec_path}: .idx says id {record_id} at offset {offset}, record has {rid}")


def _check_tokens(path: str, samples: list[tuple[str, np.ndarray, list[str]]]) -> None:
    """`samples`: (key, stored tokens, the texts its rows must encode), tokenized in one call."""
    if not samples:
        return
    want = tokenize([t for _, _, texts in samples for t in texts])
    start = 0
    for key, tokens, texts in samples:
        if not np.array_equal(tokens, want[start:start + len(texts)]):
            raise ShardError(f"{path}: sample {key!r}: stored tokens are not the {TOKENIZER_NAME} ids "
                             "of its raw text and synthetic captions")
        start += len(texts)


def verify_folder(folder: str, decode: bool = True, progress: bool = True) -> dict:
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.exists(manifest_path):
        raise ShardError(f"{folder}: no manifest.json; is this a make-shards format folder?")
    with open(manifest_path) as f:
        manifest = json.load(f)
    fmt = manifest["format"]
    module = get_format(fmt)
    per_stem = _check_files(folder, manifest)
    data_suffix = DATA_SUFFIX[fmt]
    tokenizer = manifest.get("tokenizer")
    total = 0
    for stem in tqdm(sorted(per_stem), desc=f"verify {folder}", unit=" shards", disable=not progress):
        entry = per_stem[stem][stem + data_suffix]
        path = os.path.join(folder, entry["name"])
        if fmt == "wds":
            _check_wds_index(path)
        elif fmt == "rec":
            _check_rec_index(path)
        count, key, tokenized = 0, None, []
        try:
            for sample in module.iter_samples(path):
                key = sample.key
                if decode:
                    Image.open(io.BytesIO(sample.image)).load()
                if sample.tokens is not None:
                    # Rows: raw text, then each synthetic caption (the raw text when none); two rows
                    # with several captions is the layout that stored the first caption only.
                    texts = [sample.txt, *(sample.syn or [sample.txt])][:len(sample.tokens)]
                    tokenized.append((key, sample.tokens, texts))
                elif tokenizer:
                    raise ShardError(f"{path}: sample {key!r} has no tokens; manifest.json says "
                                     f"{tokenizer}")
                count += 1
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001 - report whatever broke, with where it broke
            raise ShardError(f"{path}: sample after {key!r} (#{count}) does not read back: {e}") from e
        if tokenized and tokenizer == TOKENIZER_NAME:
            _check_tokens(path, tokenized)
        if count != entry["samples"]:
            raise ShardError(f"{path}: {count} samples, manifest says {entry['samples']}")
        total += count
    if total != manifest["samples"]:
        raise ShardError(f"{folder}: {total} samples in shards, manifest says {manifest['samples']}")
    stats_path = os.path.join(folder, "stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            stats = json.load(f)
        if stats["written"] != total or stats["read"] != stats["written"] + stats["skipped"]:
            raise ShardError(f"{stats_path}: counts disagree with the shards ({total} samples)")
    if fmt == "rec":
        rec_names = [e["name"] for e in manifest["files"] if e["name"].endswith(".rec")]
        combined = os.path.join(folder, manifest.get("dali_index", recordio.COMBINED_INDEX))
        if not os.path.exists(combined):
            raise ShardError(f"{combined}: DALI's combined index is missing; rerun make-shards --resume")
        with open(combined) as f:
            if f.readlines() != recordio.combined_index_lines(folder, rec_names):
                raise ShardError(f"{combined}: does not match the shards' .idx files and sizes")
    _check_folder_index(folder, fmt, manifest)
    if fmt == "wds":
        with open(os.path.join(folder, "sizes.json")) as f:
            sizes = json.load(f)
        expected = {stem + ".tar": per_stem[stem][stem + ".tar"]["samples"] for stem in per_stem}
        if sizes != expected:
            raise ShardError(f"{folder}/sizes.json does not match the shards")
    return {"folder": folder, "format": fmt, "shards": len(per_stem), "samples": total,
            "bytes": sum(e["bytes"] for e in manifest["files"])}


def _check_folder_index(folder: str, fmt: str, manifest: dict) -> None:
    """index.bin (what loaders map) is the one manifest.json names, and equals an index built
    afresh from the shards' own index files."""
    info = manifest.get("index")
    if info is None:
        raise ShardError(f"{folder}/manifest.json names no folder index; rerun make-shards --resume to write "
                         f"{INDEX_NAME}")
    path = os.path.join(folder, info["name"])
    if not os.path.exists(path) or os.path.getsize(path) != info["bytes"] or file_digest(path) != info["sha256"]:
        raise ShardError(f"{path}: missing, or not the folder index manifest.json names; rerun make-shards --resume")
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_folder_index(folder, fmt, {e["name"]: e for e in manifest["files"]},
                                   target=os.path.join(tmp, INDEX_NAME))
        with open(fresh, "rb") as a, open(path, "rb") as b:
            same = a.read() == b.read()
        if not same:
            stored = FolderIndex(path)  # written before index checksums: its rows must match
            if stored.has_checksums or not stored.same_rows(FolderIndex(fresh)):
                raise ShardError(f"{path}: does not match the shards (a shard changed after indexing); "
                                 "rerun make-shards --resume")


def format_folders(path: str) -> list[str]:
    if os.path.exists(os.path.join(path, "manifest.json")):
        return [path]
    found = sorted(os.path.join(path, d) for d in os.listdir(path)
                   if os.path.exists(os.path.join(path, d, "manifest.json")))
    if not found:
        raise ShardError(f"{path}: no manifest.json here or in its subfolders; pass a make-shards --out folder")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="verify-shards", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a make-shards --out folder or one of its format folders")
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not os.path.isdir(args.path):
        print(f"verify-shards: error: {args.path} is not a folder", file=sys.stderr)
        return 2
    try:
        for folder in format_folders(args.path):
            r = verify_folder(folder, decode=not args.no_decode, progress=not args.quiet)
            print(f"verify-shards: OK {r['folder']}: {r['format']}, {r['shards']} shards, "
                  f"{r['samples']} samples, {r['bytes']} bytes")
    except ShardError as e:
        print(f"verify-shards: FAILED {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
