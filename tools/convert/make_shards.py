"""make-shards: convert an image-caption dataset into WebDataset, Arrow and/or RecordIO shards.

    make-shards --source coco --input captions_train2017.json --format wds,arrow,rec --out shards/coco

The input is listed by a source adapter (tools/convert/sources/), expanded into samples (one per caption
or one per image), cut into fixed slices of --samples-per-shard input samples, and each slice is
converted by a worker into every requested format at once (tools/convert/shard_worker.py); the workers
are a local process pool or Ray tasks (--distributor, tools/convert/distribute.py).
Output: `OUT/<format>/` holding the shards, `manifest.json`, `stats.json` (and `sizes.json` for
wds) and `.parts/` (the plan and per-shard completion records that --resume trusts).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Iterator

from tqdm import tqdm

from pipelines.storage import remote as storage
from pipelines.errors import StorageError
from pipelines.formats import recordio
from pipelines.formats.folder_index import index_for_manifest
from pipelines.formats.base import holds_only_partial_writes, write_json_atomic
from pipelines.formats.registry import FORMATS
from pipelines.schema import SCHEMA_VERSION
from pipelines.text import TOKENIZER_NAME, clean_text
from tools.convert.caption import SidecarJoin, join_summary, load_sidecar
from tools.convert.image_policy import DEFAULT_MAX_PIXELS, RESIZE_BACKENDS, ImagePolicy
from tools.convert import input_identity, remote_out
from tools.convert.distribute import DISTRIBUTORS, DistributorError, make_distributor
from tools.convert.resumable import (PLAN_FILE, UsageError, add_run_options, clear_leftovers, error_exit, resume_plan,
                                     tool_parser, write_plan)
from tools.convert.shard_worker import PARTS_DIR, ShardJob, WorkItem, shard_is_complete
from tools.convert.sources import SOURCES, get_source
from tools.convert.sources.base import SourceError, SourceOptions, SourceRecord

TOOL_VERSION = "0.1.0"


@dataclass(frozen=True)
class ConvertConfig:
    """Every argument that decides the shards' bytes; saved as the plan that --resume must match."""

    source: str
    input: str
    formats: tuple[str, ...]
    images_root: str | None = None
    synthetic_captions: str | None = None
    samples_per_shard: int = 10_000
    resize: int | None = None
    quality: int = 95
    resize_backend: str = "pillow"
    jpeg_draft: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    tokenize: bool = False
    captions_per_image: str = "all"
    keep_uncaptioned: bool = False
    seed: int = 0
    image_column: str | None = None
    caption_column: str | None = None
    yfcc_caption: str = "title+description"
    split: str | None = None

    def policy(self) -> ImagePolicy:
        return ImagePolicy(self.resize, self.quality, self.max_pixels, self.resize_backend, self.jpeg_draft)

    def source_options(self) -> SourceOptions:
        return SourceOptions(images_root=self.images_root, image_column=self.image_column,
                             caption_column=self.caption_column, yfcc_caption=self.yfcc_caption,
                             split=self.split)


def expand(records: Iterator[SourceRecord], cfg: ConvertConfig,
           join: SidecarJoin | None) -> Iterator[WorkItem]:
    """Records (one per image) → work items (one per sample), numbered in input order."""
    index = itertools.count()
    for rec in records:
        captions = [c for c in (clean_text(c) for c in rec.captions) if c]
        syn = [c for c in (clean_text(c) for c in join.captions(rec) or []) if c] if join else []
        if not captions:
            yield WorkItem(next(index), rec, None, syn)
        elif cfg.captions_per_image == "all":
            for c in captions:
                yield WorkItem(next(index), rec, c, syn)
        else:
            i = 0 if cfg.captions_per_image == "first" else \
                random.Random(f"{cfg.seed}:{rec.source_key}").randrange(len(captions))
            yield WorkItem(next(index), rec, captions[i], syn, captions[:i] + captions[i + 1:])


def chunks(items: Iterator[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def old_plan_defaults(cfg: ConvertConfig) -> dict:
    """Values of options added since, for plans written before them. Before --jpeg-draft, resized
    JPEGs were drafted to the target itself, with sides rounded at the draft's scale: other bytes, so
    a resized conversion of then is another conversion; one that resized nothing has the same bytes."""
    return {"resize_backend": "pillow",
            "jpeg_draft": cfg.jpeg_draft if cfg.resize is None else "unrecorded (drafted to the target)"}


def prepare_output(out: str, cfg: ConvertConfig, resume: bool, overwrite: bool) -> None:
    """Check each format folder against the plan it was written with; clear leftovers of a kill.
    The plan records the inputs' identity (tools/convert/input_identity.py): --resume onto an
    input that changed since is refused, since the finished shards hold the old input's samples."""
    plan = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k != "formats"}))
    paths = {"--input": cfg.input, "--synthetic-captions": cfg.synthetic_captions}
    inputs = None  # their identities, computed once for every format folder
    for fmt in cfg.formats:
        folder = os.path.join(out, fmt)
        plan_path = os.path.join(folder, PARTS_DIR, PLAN_FILE)
        if os.path.isdir(folder) and not holds_only_partial_writes(folder):
            if overwrite:
                shutil.rmtree(folder)
            elif not os.path.exists(plan_path):
                raise UsageError(f"{folder} already holds files that make-shards did not write; "
                                 "choose another --out or pass --overwrite")
            else:
                now = resume_plan(
                    "make-shards", plan_path, plan, paths, resume, where=folder, other="another conversion",
                    fix="pass --overwrite to replace it or choose another --out", this="already holds this conversion",
                    unchecked="--input and --synthetic-captions", since="since this conversion began, so its finished "
                    "shards hold the old input; --resume cannot finish it",
                    defaults=old_plan_defaults(cfg))
                inputs = inputs or now
        clear_leftovers(os.path.join(folder, PARTS_DIR), folder)
        inputs = inputs or input_identity.identities(paths)
        write_plan(plan_path, plan, inputs)


def run(cfg: ConvertConfig, out: str, workers: int, resume: bool = False, overwrite: bool = False,
        progress: bool = True, distributor: str = "local", ray_address: str | None = None,
        staging: str | None = None) -> dict:
    """Convert; return the stats. Raises UsageError / SourceError / DistributorError on bad input.
    An `s3://` out is written through the local `staging` folder (tools/convert/remote_out.py)."""
    remote, shown = None, out
    if storage.is_remote(out):
        remote, out = out, os.path.abspath(staging or remote_out.default_staging(out))
        try:
            remote_out.check_target(remote, cfg.formats, overwrite)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if not overwrite:
            remote_out.pull_small_files(remote, out, cfg.formats)
    prepare_output(out, cfg, resume, overwrite)
    if remote:
        remote_out.publish_plan(remote, out, cfg.formats, PLAN_FILE)
    sizes = remote_out.remote_sizes(remote, cfg.formats) if remote and resume else None
    job = ShardJob(out=out, formats=cfg.formats, policy=cfg.policy(), tokenize=cfg.tokenize,
                   keep_uncaptioned=cfg.keep_uncaptioned, source=cfg.source, remote=remote)

    def listing():
        return get_source(cfg.source)(cfg.input, cfg.source_options())

    join = SidecarJoin(load_sidecar(cfg.synthetic_captions), listing) if cfg.synthetic_captions else None
    plan = enumerate(chunks(expand(listing(), cfg, join), cfg.samples_per_shard))
    results: dict[int, dict] = {}
    reused: list[int] = []
    start = time.perf_counter()
    bar = tqdm(desc=f"make-shards → {shown}", unit=" samples", disable=not progress, smoothing=0.1)

    def done(record: dict, was_reused: bool = False) -> None:
        """The one place a finished shard (converted now, or kept by --resume) is recorded."""
        results[int(record["shard"])] = record
        if was_reused:
            reused.append(int(record["shard"]))
        bar.update(record["read"])
        bar.set_postfix(written=sum(r["written"] for r in results.values()), refresh=False)

    def to_convert():
        for shard, items in plan:
            if resume and (existing := shard_is_complete(out, cfg.formats, shard, sizes)):
                done(existing, was_reused=True)
            else:
                yield shard, items

    with make_distributor(distributor, job, workers, ray_address) as dist:
        for record in dist.map_unordered(to_convert()):
            done(record)
    bar.close()
    elapsed = time.perf_counter() - start
    if remote:  # indexes written by Ray workers on other nodes
        remote_out.pull_small_files(remote, out, cfg.formats)
    stats = finalize(out, cfg, [results[k] for k in sorted(results)], elapsed, len(reused),
                     join.counts.as_dict() if join else None)
    if remote:
        remote_out.publish_final(remote, out, cfg.formats)
    return stats


def finalize(out: str, cfg: ConvertConfig, parts: list[dict], elapsed: float, reused: int,
             sidecar: dict | None = None) -> dict:
    skipped: Counter = Counter()
    examples: dict[str, str] = {}
    for p in parts:
        skipped.update(p["skipped"])
        for reason, ex in p["examples"].items():
            examples.setdefault(reason, ex)
    read, written = sum(p["read"] for p in parts), sum(p["written"] for p in parts)
    stats = {
        "read": read, "written": written, "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())), "skip_examples": examples,
        "with_synthetic_caption": sum(p["with_syn"] for p in parts),
        "shards": sum(1 for p in parts if p["written"]), "shards_reused": reused,
        "seconds": round(elapsed, 3), "samples_per_second": round(read / elapsed, 1) if elapsed else None,
    }
    if sidecar is not None:  # per image: how the synthetic-caption sidecar met the input
        stats["synthetic_captions"] = sidecar
    if read != written + stats["skipped"]:
        raise RuntimeError(f"{out}: read {read} != written {written} + skipped {stats['skipped']}")
    for fmt in cfg.formats:
        shards = sorted(({"name": name, "samples": p["files"][fmt]["samples"], **info}
                         for p in parts for name, info in p["files"][fmt]["files"].items()),
                        key=lambda f: f["name"])
        manifest = {
            "format": fmt, "schema_version": SCHEMA_VERSION, "tool": "make-shards",
            "tool_version": TOOL_VERSION, "samples": written,
            "tokenizer": TOKENIZER_NAME if (cfg.tokenize or fmt == "rec") else None,
            "image_policy": cfg.policy().as_dict(), "source": {"name": cfg.source, "input": cfg.input},
            "arguments": asdict(cfg), "files": shards,
        }
        folder = os.path.join(out, fmt)
        # The folder index: what a loader maps instead of parsing every shard's .idx (and, in object
        # storage, fetches instead of one object per shard).
        manifest["index"] = index_for_manifest(folder, fmt, shards, os.path.join(folder, PARTS_DIR))
        if fmt == "rec":
            rec_names = [f["name"] for f in shards if f["name"].endswith(".rec")]
            sizes = {f["name"]: f["bytes"] for f in shards}  # the .rec files may be uploaded already
            manifest["dali_index"] = os.path.basename(recordio.write_combined_index(folder, rec_names, sizes))
        write_json_atomic(os.path.join(folder, "manifest.json"), manifest)
        write_json_atomic(os.path.join(folder, "stats.json"), stats)
        if fmt == "wds":
            sizes = {f["name"]: f["samples"] for f in shards if f["name"].endswith(".tar")}
            write_json_atomic(os.path.join(folder, "sizes.json"), sizes)
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("make-shards", __doc__)
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--input", required=True, help="dataset file or folder, as the source expects")
    p.add_argument("--images-root", help="folder the input's image paths are relative to")
    p.add_argument("--synthetic-captions", help="JSONL/TSV sidecar of synthetic captions")
    p.add_argument("--format", default="wds", help="comma-separated: wds, arrow, rec")
    p.add_argument("--out", required=True, help="output folder, or s3://bucket/prefix; one subfolder per format")
    p.add_argument("--staging", help="with an s3:// --out: the local folder shards are written to before "
                                     "upload (default ~/.cache/lip-pipeline/staging/<out>)")
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--resize", type=int, metavar="SHORT_SIDE", help="shorter side; never upscales")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--resize-backend", choices=RESIZE_BACKENDS, default="pillow",
                   help="bicubic resize by Pillow or by torch's faster uint8 kernel (other bytes)")
    p.add_argument("--jpeg-draft", action=argparse.BooleanOptionalAction, default=True,
                   help="decode JPEGs that get resized at a reduced DCT scale (faster on large photos, "
                        "sizes unchanged, ~40 dB from a full decode's pixels); --no-jpeg-draft: full decode")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip larger images")
    p.add_argument("--tokenize", action="store_true", help="store CLIP BPE tokens (rec always does)")
    p.add_argument("--captions-per-image", choices=("all", "first", "random"), default="all",
                   help="all: one sample per caption; first/random: one per image, rest in meta")
    p.add_argument("--keep-uncaptioned", action="store_true", help="keep caption-less images, empty text")
    p.add_argument("--image-column", help="table source: the image path column")
    p.add_argument("--caption-column", help="table source: the caption column")
    p.add_argument("--yfcc-caption", default="title+description",
                   choices=("title", "description", "tags", "title+description", "all"))
    p.add_argument("--split", help="Karpathy JSON inputs: keep only this split")
    p.add_argument("--seed", type=int, default=0, help="seed of --captions-per-image random")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="local worker processes; with --distributor ray and no --ray-address, the local Ray's CPUs")
    p.add_argument("--distributor", choices=DISTRIBUTORS, default="local",
                   help="where shards are converted: a local process pool, or Ray tasks (pip install '.[ray]')")
    p.add_argument("--ray-address", help="Ray head to join (host:port, or 'auto'); default: start a local Ray")
    add_run_options(p, resume="keep finished shards, redo the rest", overwrite="replace whatever --out holds")
    return p


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(f"unknown --format {','.join(unknown) or args.format!r}; "
                         f"use a comma-separated subset of {','.join(FORMATS)}")
    if not os.path.exists(args.input):
        raise UsageError(f"--input {args.input} does not exist; pass the dataset's file or folder")
    if args.images_root and not os.path.isdir(args.images_root):
        raise UsageError(f"--images-root {args.images_root} is not a folder")
    if args.synthetic_captions and not os.path.isfile(args.synthetic_captions):
        raise UsageError(f"--synthetic-captions {args.synthetic_captions} does not exist")
    if args.samples_per_shard < 1 or (args.resize is not None and args.resize < 1):
        raise UsageError("--samples-per-shard and --resize must be positive")
    if not 1 <= args.quality <= 100:
        raise UsageError("--quality must be within 1..100")
    values = {f.name: getattr(args, f.name) for f in fields(ConvertConfig) if hasattr(args, f.name)}
    values.update(formats=formats, input=os.path.abspath(args.input),
                  images_root=args.images_root and os.path.abspath(args.images_root),
                  synthetic_captions=args.synthetic_captions and os.path.abspath(args.synthetic_captions))
    return ConvertConfig(**values)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        cfg = config_from_args(args)
        if args.ray_address and args.distributor != "ray":
            raise UsageError("--ray-address needs --distributor ray")
        stats = run(cfg, args.out, args.workers, args.resume, args.overwrite, progress=not args.quiet,
                    distributor=args.distributor, ray_address=args.ray_address, staging=args.staging)
    except (UsageError, SourceError, DistributorError, FileNotFoundError, StorageError) as e:
        return error_exit("make-shards", e)
    reasons = ", ".join(f"{k} {v}" for k, v in stats["skipped_by_reason"].items()) or "none"
    joined = f" (sidecar, per image: {join_summary(stats['synthetic_captions'])})" \
        if "synthetic_captions" in stats else ""
    print(f"make-shards: read {stats['read']}, written {stats['written']}, skipped {stats['skipped']} "
          f"({reasons}); {stats['with_synthetic_caption']} with synthetic captions{joined}; "
          f"{stats['samples_per_second']} samples/s → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
