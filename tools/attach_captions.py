"""attach-captions: put a caption sidecar onto finished shards without re-encoding their images.

    attach-captions --shards shards/coco --captions captions.jsonl --out shards/coco-syn
    attach-captions --shards shards/coco --captions captions.jsonl --in-place

Every format folder (wds, arrow, rec) is rewritten shard by shard through its own writer: image
bytes are copied as stored (never decoded or re-encoded), `syn` becomes the sidecar's captions
(`--mode replace`, default) or gains those it lacks (`--mode add`), every caption is ftfy-cleaned as
make-shards cleans it, and the tokens are recomputed where the folder stores them (rec always).
manifest.json, stats.json, sizes.json (wds), all.idx (rec) and, in place, make-shards' completion
records are updated, so `verify-shards` passes and `make-shards --resume` sees finished shards.
A sample matches a sidecar line by its `meta.source_key`, image id, image path or file name (as
make-shards joins), then by its shard sample key; samples without a line keep their captions.
`--clip-score CKPT` also stores CLIP image-text cosine similarities in `meta.clip_score`.
Rerunning is safe (replace and add are idempotent): that is how a killed run is finished.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import replace

from tqdm import tqdm

from pipelines.folder_index import index_for_manifest
from pipelines.formats import recordio
from pipelines.formats.registry import DATA_SUFFIX, WRITERS, get_format
from pipelines.schema import Sample
from pipelines.text import TOKENIZER_NAME, clean_text
from tools.caption import CaptionSidecar, load_sidecar
from tools.shard_worker import TOKENIZE_BLOCK, part_path, set_tokens
from tools.sources.base import SourceRecord
from tools.verify_shards import format_folders


class UsageError(Exception):
    """A bad invocation: one line naming the problem and the fix, exit code 2."""


def lookup(sidecar: CaptionSidecar, sample: Sample) -> list[str] | None:
    """The sidecar's captions for `sample` (None: no line names it)."""
    meta = sample.meta
    record = SourceRecord(source_key=str(meta.get("source_key") or sample.key), image="",
                          image_name=str(meta.get("image") or ""), meta=meta)
    hit = sidecar.lookup(record) or sidecar.by["key"].get(sample.key)
    return list(hit) if hit else None


def new_captions(old: list[str], found: list[str] | None, mode: str) -> list[str]:
    if found is None:
        return list(old)
    captions = [] if mode == "replace" else list(old)
    for c in map(clean_text, found):
        if c and c not in captions:
            captions.append(c)
    return captions


def _blocks(samples, size: int):
    block = []
    for s in samples:
        block.append(s)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def rewrite_shard(src: str, fmt: str, out_folder: str, sidecar: CaptionSidecar, mode: str,
                  with_tokens: bool, scorer=None) -> tuple[dict, Counter]:
    """Write the shard `src` again under `out_folder` with the sidecar's captions: (the writer's
    file entries for manifest.json, counts)."""
    stem = os.path.basename(src)[: -len(DATA_SUFFIX[fmt])]
    kwargs = {}
    if fmt == "rec":  # keep the record ids: they are unique across the folder's shards
        index = recordio.read_index(src[: -len(".rec")] + ".idx")
        kwargs["id_base"] = index[0][0] if index else 0
    writer = WRITERS[fmt](out_folder, int(stem), with_tokens=with_tokens, **kwargs)
    counts: Counter = Counter()
    try:
        for block in _blocks(get_format(fmt).iter_samples(src), TOKENIZE_BLOCK):
            block = list(block)
            for i, s in enumerate(block):
                found = lookup(sidecar, s)
                counts["matched" if found is not None else "unmatched"] += 1
                block[i] = replace(s, syn=new_captions(s.syn, found, mode), tokens=None,
                                   meta=dict(s.meta))
                counts["with_syn"] += bool(block[i].syn)
                counts["captions"] += len(block[i].syn)
            if with_tokens:
                set_tokens(block)
            if scorer is not None:
                scorer.annotate(block)
            for s in block:
                if fmt == "rec" and s.tokens is None:
                    raise ValueError(f"{src}: rec shards need tokens")
                writer.write(s)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    counts["samples"] += files.samples
    return {"samples": files.samples, "files": files.files}, counts


def attach_folder(folder: str, sidecar: CaptionSidecar, out_folder: str, mode: str = "replace",
                  scorer=None, progress: bool = True) -> dict:
    """Rewrite one format folder; return its attach counts."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    fmt = manifest["format"]
    with_tokens = fmt == "rec" or bool(manifest.get("tokenizer"))
    if with_tokens and manifest.get("tokenizer") not in (None, TOKENIZER_NAME):
        raise UsageError(f"{folder}/manifest.json: tokenizer {manifest['tokenizer']} is not {TOKENIZER_NAME}; "
                         "reconvert with make-shards --tokenize")
    os.makedirs(out_folder, exist_ok=True)
    data = [e["name"] for e in manifest["files"] if e["name"].endswith(DATA_SUFFIX[fmt])]
    entries, counts = [], Counter()
    in_place = os.path.realpath(out_folder) == os.path.realpath(folder)
    for name in tqdm(data, desc=f"attach-captions {folder}", unit=" shards", disable=not progress):
        files, c = rewrite_shard(os.path.join(folder, name), fmt, out_folder, sidecar, mode, with_tokens, scorer)
        counts.update(c)
        entries += [{"name": n, "samples": files["samples"], **info} for n, info in files["files"].items()]
        if in_place:
            _update_part(folder, name[: -len(DATA_SUFFIX[fmt])], files, c["with_syn"])
    entries.sort(key=lambda e: e["name"])
    summary = {"captions_file": os.path.abspath(sidecar.path), "mode": mode, **dict(sorted(counts.items())),
               "clip_score": scorer.describe() if scorer else None}
    manifest.update(files=entries, tokenizer=TOKENIZER_NAME if with_tokens else None, attach_captions=summary)
    if fmt == "rec":
        rec_names = [e["name"] for e in entries if e["name"].endswith(".rec")]
        manifest["dali_index"] = os.path.basename(recordio.write_combined_index(out_folder, rec_names))
    if fmt == "wds":
        _write_json(os.path.join(out_folder, "sizes.json"),
                    {e["name"]: e["samples"] for e in entries if e["name"].endswith(".tar")})
    stats_path = os.path.join(folder, "stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            stats = json.load(f)
        stats.update(with_synthetic_caption=counts["with_syn"], attach_captions=summary)
        _write_json(os.path.join(out_folder, "stats.json"), stats)
    manifest["index"] = index_for_manifest(out_folder, fmt, entries)  # new captions: new offsets
    _write_json(os.path.join(out_folder, "manifest.json"), manifest)  # last: the folder is complete
    return {"folder": out_folder, "format": fmt, **summary}


def _update_part(folder: str, stem: str, files: dict, with_syn: int) -> None:
    """In place: make-shards' completion record of the shard names the new file sizes, so a
    later `make-shards --resume` keeps the shard instead of converting it again."""
    path = part_path(os.path.dirname(folder), os.path.basename(folder), int(stem))
    if os.path.exists(path):
        with open(path) as f:
            part = json.load(f)
        part.update(files=files["files"], samples=files["samples"], with_syn=with_syn)
        with open(path, "w") as f:
            json.dump(part, f, sort_keys=True)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see attach-captions --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attach-captions", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", required=True, help="a make-shards --out folder or one of its format folders")
    p.add_argument("--captions", required=True, help="JSONL/TSV caption sidecar (caption-shards writes one)")
    p.add_argument("--out", help="write the captioned shards here (one subfolder per format)")
    p.add_argument("--in-place", action="store_true", help="rewrite the shards where they are")
    p.add_argument("--mode", choices=("replace", "add"), default="replace",
                   help="replace a matched sample's synthetic captions or add the new ones to them")
    p.add_argument("--clip-score", metavar="CKPT", help="store CLIP scores of raw text and captions in meta")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name of --clip-score")
    p.add_argument("--device", choices=("gpu", "cpu"), default="cpu", help="where --clip-score runs")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if bool(args.out) == args.in_place:
            raise UsageError("pass exactly one of --out DIR and --in-place")
        if not os.path.isdir(args.shards):
            raise UsageError(f"--shards {args.shards}: no such folder; pass a make-shards --out folder")
        try:
            folders = format_folders(args.shards)
        except Exception as e:  # verify-shards' ShardError: no manifest.json anywhere
            raise UsageError(str(e)) from e
        sidecar = load_sidecar(args.captions)
        scorer = None
        if args.clip_score:
            from tools.clip_score import ClipScorer

            scorer = ClipScorer(args.clip_score, args.clip_model, args.device)
        single = len(folders) == 1 and os.path.realpath(folders[0]) == os.path.realpath(args.shards)
        for folder in folders:
            start = time.perf_counter()
            out = folder if args.in_place else args.out if single else os.path.join(args.out, os.path.basename(folder))
            if not args.in_place and os.path.realpath(out) == os.path.realpath(folder):
                raise UsageError(f"--out {args.out} is the input folder; use --in-place")
            if not args.in_place and os.path.exists(os.path.join(out, "manifest.json")):
                raise UsageError(f"{out} already holds shards; choose another --out")
            r = attach_folder(folder, sidecar, out, args.mode, scorer, progress=not args.quiet)
            print(f"attach-captions: {r['format']}: {r.get('samples', 0)} samples, {r.get('matched', 0)} matched, "
                  f"{r.get('unmatched', 0)} unmatched, {r.get('with_syn', 0)} with synthetic captions "
                  f"({r.get('captions', 0)} captions) → {r['folder']} ({time.perf_counter() - start:.1f} s)")
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"attach-captions: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
