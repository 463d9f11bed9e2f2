"""What a resumable tool's inputs were, by content, so that `--resume` never finishes a run on other
data than it began with (make-shards, caption-shards, attach-captions; the plan that records them:
tools/convert/resumable.py).

A plan used to name its inputs by path only: a table grown from 10 to 16 rows between a killed run
and its `--resume` kept the old short last shard as finished, rows 10–11 were never converted, and
the run exited 0. Now the plan records each input's identity:
- a file (a table, a COCO/Flickr JSON, a CC TSV, a sidecar, a manifest.json): its size, mtime and
  sha256 (hashed once per run; a resume whose file still has the recorded size and mtime is taken
  as unchanged without hashing it again, and one whose mtime alone changed — a copy, a `touch` —
  is hashed and accepted when the content is the same);
- a folder (img2dataset output, a model folder): every file's relative path, size and mtime, as
  one sha256 of that listing. File contents are not hashed: they are the images (or weights), far
  too much to read on every run; a file rewritten in place keeps its name but not its mtime.
Image files that a listing names are not part of it: a picture replaced under the same name and
listing is not seen (convert again with --overwrite).
"""
from __future__ import annotations

import hashlib
import os

from pipelines.formats.base import file_digest


def identity(path: str) -> dict:
    """The identity of the file or folder at `path` (FileNotFoundError when there is none)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        listing, total = hashlib.sha256(), 0
        rows = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in files:
                full = os.path.join(root, name)
                st = os.stat(full)
                rows.append(f"{os.path.relpath(full, path)}\t{st.st_size}\t{st.st_mtime_ns}\n")
                total += st.st_size
        for row in sorted(rows):
            listing.update(row.encode("utf-8", "surrogateescape"))
        return {"path": path, "kind": "folder", "files": len(rows), "bytes": total,
                "listing_sha256": listing.hexdigest()}
    st = os.stat(path)
    return {"path": path, "kind": "file", "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": file_digest(path)}


def identities(inputs: dict[str, str | None]) -> dict[str, dict | None]:
    """`inputs`: what the tool calls each input (`--input`) -> its path, or None when not given."""
    return {name: None if path is None else identity(path) for name, path in inputs.items()}


def _same_file_cheaply(recorded: dict, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return st.st_size == recorded["bytes"] and st.st_mtime_ns == recorded["mtime_ns"]


def compare(recorded: dict[str, dict | None], inputs: dict[str, str | None]) -> tuple[list[str], dict]:
    """(what changed, one phrase per input; the identities to record now). An input whose file
    kept its size and mtime is not hashed again."""
    changed, now = [], {}
    for name, path in inputs.items():
        was = recorded.get(name)
        if was is not None and path is not None and was.get("kind") == "file" \
                and os.path.abspath(path) == was["path"] and _same_file_cheaply(was, path):
            now[name] = was
            continue
        try:
            now[name] = None if path is None else identity(path)
        except FileNotFoundError:
            changed.append(f"{name} {path} is gone")
            continue
        is_ = now[name]
        if was is None or is_ is None:
            if was is not is_:
                changed.append(f"{name} was {'not given' if was is None else was['path']}, "
                               f"now {'not given' if is_ is None else is_['path']}")
        elif was["kind"] != is_["kind"]:
            changed.append(f"{name} {path} was a {was['kind']}, now a {is_['kind']}")
        elif is_["kind"] == "file" and is_["sha256"] != was["sha256"]:
            changed.append(f"{name} {path} changed ({was['bytes']:,} → {is_['bytes']:,} bytes, other content)")
        elif is_["kind"] == "folder" and is_["listing_sha256"] != was["listing_sha256"]:
            changed.append(f"{name} {path} changed ({was['files']:,} files, {was['bytes']:,} bytes → "
                           f"{is_['files']:,} files, {is_['bytes']:,} bytes, or files rewritten)")
    return changed, now

