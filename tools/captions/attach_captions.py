"""attach-captions: put a caption sidecar onto finished shards without re-encoding their images.

    attach-captions --shards shards/coco --captions captions.jsonl --out shards/coco-syn
    attach-captions --shards shards/coco --captions captions.jsonl --in-place

Every format folder (wds, arrow, rec) is rewritten shard by shard through its own writer: image
bytes are copied as stored (never decoded or re-encoded), `syn` becomes the sidecar's captions
(`--mode replace`, default) or gains those it lacks (`--mode add`), every caption is ftfy-cleaned as
make-shards cleans it, and the tokens are recomputed where the folder stores them (rec always).
manifest.json, stats.json, sizes.json (wds), all.idx (rec) and, in place, make-shards' completion
records are updated, so `verify-shards` passes and `make-shards --resume` sees finished shards.
A sample matches a sidecar line as make-shards joins (tools/convert/caption.py): by its image's identity
(`meta.image`), else by a looser name (source key, image id, file name) that no other image of the
folder answers to; samples without a line keep their captions, and unmatched and ambiguous ones
are counted and named. `--clip-score CKPT` also stores CLIP image-text cosine similarities in
`meta.clip_score`.
Each output format folder holds this attach's plan and one record per finished shard
(`.attach/`), written atomically after the shard: running the same command again finishes a killed
run, redoing only the shards without a record, and gives the files an uninterrupted run gives.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import replace

from tqdm import tqdm

from pipelines.errors import ShardError
from pipelines.formats.folder_index import PIECE_SUFFIX, index_for_manifest, shard_piece, write_piece
from pipelines.formats import recordio
from pipelines.formats.base import file_digest, holds_only_partial_writes, write_json_atomic
from pipelines.formats.registry import DATA_SUFFIX, WRITERS, get_format
from pipelines.text import TOKENIZER_NAME, clean_text
from tools.convert import input_identity
from tools.convert.caption import CaptionSidecar, JoinCounts, join_summary, load_sidecar, stored_record
from tools.convert.resumable import (PLAN_FILE, UsageError, add_run_options, check_same_plan, clear_leftovers,
                                     error_exit, read_plan, tool_parser, write_plan)
from tools.fault_hooks import point
from tools.convert.shard_worker import PARTS_DIR, TOKENIZE_BLOCK, part_path, set_tokens, write_record
from tools.convert.verify_shards import format_folders

ATTACH_DIR = ".attach"  # per output format folder: this attach's plan and its per-shard records


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


def rewrite_shard(src: str, fmt: str, out_folder: str, sidecar: CaptionSidecar, listing, mode: str,
                  with_tokens: bool, scorer=None) -> dict:
    """Write the shard `src` again under `out_folder` with the sidecar's captions: its record
    (the writer's file entries for manifest.json, counts, how its samples met the sidecar)."""
    stem = os.path.basename(src)[: -len(DATA_SUFFIX[fmt])]
    kwargs = {}
    if fmt == "rec":  # keep the record ids: they are unique across the folder's shards
        index = recordio.read_index(src[: -len(".rec")] + ".idx")
        kwargs["id_base"] = index[0][0] if index else 0
    writer = WRITERS[fmt](out_folder, int(stem), with_tokens=with_tokens, **kwargs)
    counts: Counter = Counter()
    join = JoinCounts(os.path.abspath(sidecar.path))
    try:
        for block in _blocks(get_format(fmt).iter_samples(src), TOKENIZE_BLOCK):
            block = list(block)
            for i, s in enumerate(block):
                record = stored_record(s.meta, s.key)
                found, how = sidecar.match(record, listing)
                join.add(how, record.identity or s.key)
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
    return {"shard": os.path.basename(src), "samples": files.samples, "files": files.files,
            "counts": dict(sorted(counts.items())), "join": join.as_dict()}


def attach_plan(folder: str, in_place: bool, sidecar: CaptionSidecar, mode: str, scorer=None) -> dict:
    """What decides an attach's output: a rerun with another plan is another attach. In place the
    shards are the output itself, so the plan does not name the folder (it may be moved)."""
    plan = {"shards": "in place" if in_place else os.path.realpath(folder),
            "captions": os.path.abspath(sidecar.path), "captions_sha256": file_digest(sidecar.path),
            "mode": mode, "clip_score": None}
    if scorer is not None:
        plan["clip_score"] = {**scorer.describe(), "checkpoint_bytes": os.path.getsize(scorer.checkpoint)}
    return plan


def prepare_output(out_folder: str, plan: dict, in_place: bool, source: str | None = None) -> str:
    """Check `out_folder` against this attach's plan and clear what a killed run left; return
    the records' folder. --out: a folder holding another attach or foreign files is refused, and
    so is one begun from shards that changed since (`source`: their manifest.json, recorded by
    content, tools/convert/input_identity.py). In place: records of another attach are dropped
    (their shards are this folder's now)."""
    records = os.path.join(out_folder, ATTACH_DIR)
    plan_path = os.path.join(records, PLAN_FILE)
    inputs = None
    paths = {} if in_place or source is None else {"--shards": source}
    previous, recorded = read_plan(plan_path)
    if in_place:
        if previous is not None and previous != plan:
            shutil.rmtree(records)
    elif os.path.isdir(out_folder) and not holds_only_partial_writes(out_folder):
        if previous is None:
            raise UsageError(f"{out_folder} already holds files that attach-captions did not write; "
                             "choose another --out")
        check_same_plan(plan, previous, where=out_folder, other="another attach",
                        fix="choose another --out, or rerun that attach's own command to finish it")
        if paths and recorded is None:
            print(f"attach-captions: warning: {plan_path} was written before attach-captions recorded its "
                  f"shards' identity: finishing it without checking that {source} is unchanged since (if the "
                  "shards were converted again, delete the --out folder first)", file=sys.stderr)
        elif paths:
            changed, inputs = input_identity.compare(recorded, paths)
            if changed:
                raise UsageError(f"{out_folder}: {'; '.join(changed)} since this attach began, so its finished "
                                 f"shards hold the old shards' samples; delete {out_folder} or choose another --out")
    clear_leftovers(records, out_folder, os.path.join(out_folder, PARTS_DIR))
    write_plan(plan_path, plan, (inputs or input_identity.identities(paths)) if paths else None)
    return records


def finished(records: str, out_folder: str, stem: str) -> dict | None:
    """The shard's record if a run finished it: every file it names is there at its size."""
    path = os.path.join(records, stem + ".json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    for name, info in record["files"].items():
        p = os.path.join(out_folder, name)
        if not os.path.exists(p) or os.path.getsize(p) != info["bytes"]:
            return None
    return record


def attach_folder(folder: str, sidecar: CaptionSidecar, out_folder: str, mode: str = "replace",
                  scorer=None, progress: bool = True) -> dict:
    """Rewrite one format folder (the shards that no finished record covers); return its counts."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    fmt = manifest["format"]
    with_tokens = fmt == "rec" or bool(manifest.get("tokenizer"))
    if with_tokens and manifest.get("tokenizer") not in (None, TOKENIZER_NAME):
        raise UsageError(f"{folder}/manifest.json: tokenizer {manifest['tokenizer']} is not {TOKENIZER_NAME}; "
                         "reconvert with make-shards --tokenize")
    in_place = os.path.realpath(out_folder) == os.path.realpath(folder)
    records = prepare_output(out_folder, attach_plan(folder, in_place, sidecar, mode, scorer), in_place,
                             os.path.join(folder, "manifest.json"))
    data = [e["name"] for e in manifest["files"] if e["name"].endswith(DATA_SUFFIX[fmt])]

    def listing():  # every stored sample as its record: for the sidecar's looser names
        for name in data:
            for s in get_format(fmt).iter_samples(os.path.join(folder, name)):
                yield stored_record(s.meta, s.key)

    entries, counts, join, reused = [], Counter(), JoinCounts(os.path.abspath(sidecar.path)), 0
    for name in tqdm(data, desc=f"attach-captions {folder}", unit=" shards", disable=not progress):
        stem = name[: -len(DATA_SUFFIX[fmt])]
        record = finished(records, out_folder, stem)
        reused += record is not None
        if record is None:
            point(f"attach {os.path.join(folder, name)}")  # a test hook (tools/fault_hooks.py)
            record = rewrite_shard(os.path.join(folder, name), fmt, out_folder, sidecar, listing, mode,
                                   with_tokens, scorer)
            if in_place:
                _update_part(folder, fmt, stem, record)
            write_json_atomic(os.path.join(records, stem + ".json"), record)  # last: the shard is done
        counts.update(record["counts"])
        join.update(record["join"])
        entries += [{"name": n, "samples": record["samples"], **info} for n, info in record["files"].items()]
    entries.sort(key=lambda e: e["name"])
    summary = {"captions_file": os.path.abspath(sidecar.path), "mode": mode, **dict(sorted(counts.items())),
               **{k: v for k, v in join.as_dict().items() if k != "file"},
               "clip_score": scorer.describe() if scorer else None}
    manifest.update(files=entries, tokenizer=TOKENIZER_NAME if with_tokens else None, attach_captions=summary)
    if fmt == "rec":
        rec_names = [e["name"] for e in entries if e["name"].endswith(".rec")]
        manifest["dali_index"] = os.path.basename(recordio.write_combined_index(out_folder, rec_names))
    if fmt == "wds":
        write_json_atomic(os.path.join(out_folder, "sizes.json"),
                          {e["name"]: e["samples"] for e in entries if e["name"].endswith(".tar")})
    stats_path = os.path.join(folder, "stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            stats = json.load(f)
        stats.update(with_synthetic_caption=counts["with_syn"], attach_captions=summary)
        write_json_atomic(os.path.join(out_folder, "stats.json"), stats)
    manifest["index"] = index_for_manifest(out_folder, fmt, entries)  # new captions: new offsets
    write_json_atomic(os.path.join(out_folder, "manifest.json"), manifest)  # last: the folder is complete
    return {"folder": out_folder, "format": fmt, "shards_reused": reused, **summary}


def _update_part(folder: str, fmt: str, stem: str, record: dict) -> None:
    """In place: make-shards' completion record of the shard names the new file sizes, so a
    later `make-shards --resume` keeps the shard instead of converting it again."""
    path = part_path(os.path.dirname(folder), os.path.basename(folder), int(stem))
    if os.path.exists(path):
        with open(path) as f:
            part = json.load(f)
        part.update(files=record["files"], samples=record["samples"], with_syn=record["counts"]["with_syn"])
        # The shard's piece of the folder index first: its offsets moved with the new captions.
        write_piece(path[: -len(".json")] + PIECE_SUFFIX, fmt,
                    shard_piece(folder, fmt, stem + DATA_SUFFIX[fmt], record["files"]))
        write_record(path, part)


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("attach-captions", __doc__)
    p.add_argument("--shards", required=True, help="a make-shards --out folder or one of its format folders")
    p.add_argument("--captions", required=True, help="JSONL/TSV caption sidecar (caption-shards writes one)")
    p.add_argument("--out", help="write the captioned shards here (one subfolder per format)")
    p.add_argument("--in-place", action="store_true", help="rewrite the shards where they are")
    p.add_argument("--mode", choices=("replace", "add"), default="replace",
                   help="replace a matched sample's synthetic captions or add the new ones to them")
    p.add_argument("--clip-score", metavar="CKPT", help="store CLIP scores of raw text and captions in meta")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name of --clip-score")
    p.add_argument("--device", choices=("gpu", "cpu"), default="cpu", help="where --clip-score runs")
    add_run_options(p)  # a rerun finishes a killed attach by itself: no --resume, no --overwrite
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
        except (ShardError, OSError) as e:  # no manifest.json anywhere, or an unreadable folder
            raise UsageError(str(e)) from e
        sidecar = load_sidecar(args.captions)
        scorer = None
        if args.clip_score:
            from tools.captions.clip_score import ClipScorer

            scorer = ClipScorer(args.clip_score, args.clip_model, args.device)
        single = len(folders) == 1 and os.path.realpath(folders[0]) == os.path.realpath(args.shards)
        for folder in folders:
            start = time.perf_counter()
            out = folder if args.in_place else args.out if single else os.path.join(args.out, os.path.basename(folder))
            if not args.in_place and os.path.realpath(out) == os.path.realpath(folder):
                raise UsageError(f"--out {args.out} is the input folder; use --in-place")
            r = attach_folder(folder, sidecar, out, args.mode, scorer, progress=not args.quiet)
            print(f"attach-captions: {r['format']}: {r.get('samples', 0)} samples, {join_summary(r)}, "
                  f"{r.get('with_syn', 0)} with synthetic captions ({r.get('captions', 0)} captions), "
                  f"{r['shards_reused']} shards reused → {r['folder']} ({time.perf_counter() - start:.1f} s)")
    except (UsageError, FileNotFoundError, ValueError) as e:
        return error_exit("attach-captions", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
