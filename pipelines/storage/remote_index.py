"""A remote format folder's manifest and, for one converted before the folder index existed (or
foreign tars), its index built once per node from the per-shard index files (`ShardSet`'s remote
open, pipelines/shardset.py)."""
from __future__ import annotations

import os

from pipelines.errors import ShardError, StorageError
from pipelines.formats.folder_index import COMPANIONS, SUFFIX, IndexLock, pieces
from pipelines.formats.index import INDEX_NAME, FolderIndex, write_index
from pipelines.storage.cached_files import content_version, fetch_once, identity_of
from pipelines.storage.remote import join, list_files, read_json


def remote_manifest(url: str, fmt: str) -> tuple[str, dict | None]:
    """(format folder url, its manifest.json or None). The make-shards --out url itself is found
    through its `fmt/` subfolder, as for a local folder. Which to ask first is a guess that costs
    a 404 when wrong: make-shards names every format folder by its format, so a url ending in
    `/<fmt>` is taken for the format folder and any other for the --out prefix."""
    candidates = (url, join(url, fmt))
    if url.rstrip("/").rsplit("/", 1)[-1] != fmt:
        candidates = candidates[::-1]
    for candidate in candidates:
        try:
            return candidate, read_json(join(candidate, "manifest.json"))
        except StorageError as e:
            if not isinstance(e.__cause__, FileNotFoundError):
                raise
    return url, None


def index_remote_folder(url: str, fmt: str, manifest: dict | None,
                        node: str) -> tuple[FolderIndex, dict, str]:
    """A remote folder without a folder index (converted before it existed, or foreign tars):
    fetch its per-shard index files once per node and index it there. Returns the index, the
    objects' ETags (how its files are recognised without digests) and the cache folder of this
    version of the folder (named by the listing's sizes and ETags)."""
    suffix = SUFFIX[fmt]
    etags: dict[str, str] = {}
    listing = list_files(url, etags)
    if not any(n.endswith(suffix) for n in listing) and f"{fmt}/" in listing:
        url = join(url, fmt)
        listing = list_files(url, etags)
    node = os.path.join(node, content_version(manifest, listing, etags))
    if manifest is not None:
        files = {e["name"]: e for e in manifest["files"]}
    elif fmt == "arrow":
        raise ShardError(f"{url}: no manifest.json; remote arrow shards need it for their sample counts "
                         "(make-shards writes it)")
    else:
        files = {n: {"bytes": b} for n, b in sorted(listing.items())}
    names = [n for n in files if n.endswith(suffix)]
    if not names:
        others = [f for f in SUFFIX if f"{f}/" in listing]
        hint = f" (it holds {', '.join(others)}: set the format to match)" if others else ""
        raise ShardError(f"{url}: no {fmt} shards found{hint}")
    if fmt == "arrow":
        raise ShardError(f"{url}: no {INDEX_NAME} in manifest.json (converted by an older make-shards); rerun "
                         f"make-shards --resume --out {url.rsplit('/', 1)[0]} to write it")
    meta = os.path.join(node, "meta")
    target = os.path.join(node, f"{fmt}.legacy.{INDEX_NAME}")
    small = [n[: -len(suffix)] + ext for n in names for ext in COMPANIONS[fmt]]
    for name in small:  # each once per node, recognised again by its digest or ETag
        if name in listing:
            digest = files.get(name, {}).get("sha256")
            fetch_once(join(url, name), os.path.join(meta, name), listing[name],
                       identity_of(digest, etags.get(name)), digest)
    sizes = {n: int(files[n]["bytes"]) for n in names}

    def with_digests():
        for p in pieces(fmt, meta, names, strict=manifest is not None, sizes=sizes):
            p.sha256 = files[p.name].get("sha256")
            if fmt == "rec":
                text = files.get(p.name[: -len(".rec")] + ".jsonl", {"bytes": listing.get(p.name[:-4] + ".jsonl", 0)})
                p.text_bytes, p.text_sha256 = int(text.get("bytes", 0)), text.get("sha256")
            yield p
    with IndexLock(target):
        write_index(target, fmt, with_digests())
        return FolderIndex(target), etags, node
