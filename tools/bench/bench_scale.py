"""bench-scale: what opening and loading cost per rank at 1 M to 100 M samples, and from object storage.

    python -m tools.bench.bench_scale                               # 1M, 10M, 100M (wds and rec), S3, the 1M epoch
    python -m tools.bench.bench_scale --sizes 1e6 1e7 --no-epoch     # fewer rows
    python -m tools.bench.bench_scale --quick                        # seconds: a test's worth

A real shard set (make-shards output of synthetic photos, or `--base DIR`) is replicated by hard
links into folders of N samples (shard i is base shard i mod B; its manifest and folder index are
written for the copy: the index by tiling the base's, so building a 100 M-sample folder costs
links, not conversions). Each row is measured in a fresh process per rank, with a warm page
cache (the index is read once before):
- open: seconds to open the shard set (index mapped, every shard stat'ed), RSS after it (the open's anonymous
  memory, and file pages of the mapped index), open descriptors;
- plan: seconds to compute the first batch's ids (`EpochPlan.batch`); first batch: seconds to the
  first Batch of the torch loader (2 workers), anonymous memory per worker (its own heap and
  what it copied of its parent: the shard and index pages it maps are page cache);
- after `--batches` batches: descriptors and shard maps in the main process and each worker;
- resume: seconds from a saved mid-epoch state to the next Batch in a new loader.
`--epoch`: a whole epoch over the 1 M-sample folder (1,000 shards) under `ulimit -n 1024`, with the
torch and DALI backends. S3 (moto on 127.0.0.1): the folder of `--s3-shards` shards uploaded, then
requests and bytes of one open, and an epoch by `--ranks` rank processes of one node sharing one
cache (downloads per shard). Figures go to `--out` as JSON and Markdown (docs/benchmarks.md, "Scale").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines.formats.folder_index import SUFFIX
from pipelines.formats.base import file_digest
from pipelines.formats.index import INDEX_NAME, FolderIndex, write_index
from tools.convert.reaper import reaped

COMPANION = {"wds": (".idx",), "rec": (".idx", ".jsonl"), "arrow": ()}


# --- building the folders -------------------------------------------------------------------------

def make_base(root: str, samples: int, per_shard: int, fmt: str) -> str:
    """A format folder of `samples` synthetic 64-px photos (tokenized, `per_shard` a shard),
    converted by make-shards once and kept under `root`. Returns the format folder."""
    from tools.convert import make_shards
    from tools.demo import make_synthetic

    out = os.path.join(root, f"base-{samples}-{per_shard}")
    if os.path.exists(os.path.join(out, fmt, INDEX_NAME)):
        return os.path.join(out, fmt)
    syn = os.path.join(root, f"syn-{samples}")
    if not os.path.exists(os.path.join(syn, "train.jsonl")) and make_synthetic.main(
            ["--out", syn, "--train", str(samples), "--test", "0", "--size", "64",
             "--workers", str(min(4, os.cpu_count() or 1))]) != 0:
        raise SystemExit("bench-scale: make-synthetic failed")
    args = ["--source", "table", "--input", os.path.join(syn, "train.jsonl"), "--image-column", "image",
            "--caption-column", "caption", "--synthetic-captions", os.path.join(syn, "train_syn.jsonl"),
            "--tokenize", "--format", fmt, "--samples-per-shard", str(per_shard), "--out", out, "--quiet",
            "--overwrite"]
    if make_shards.main(args) != 0:
        raise SystemExit("bench-scale: make-shards failed")
    return os.path.join(out, fmt)


def replicate(base: str, dest: str, shards: int) -> str:
    """`dest` holding `shards` shards, shard i a hard link of base shard i mod B (its data file and
    companions), with manifest.json and a folder index for the copy. Returns `dest`."""
    index = FolderIndex(os.path.join(base, INDEX_NAME))
    fmt, names = index.format, index.names
    if os.path.exists(os.path.join(dest, INDEX_NAME)) and len(FolderIndex(os.path.join(dest, INDEX_NAME)).names) == shards:
        return dest  # built by an earlier run
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    with open(os.path.join(base, "manifest.json")) as f:
        manifest = json.load(f)
    entries = {e["name"]: e for e in manifest["files"]}
    files, suffix = [], SUFFIX[fmt]
    for i in range(shards):
        src = names[i % len(names)]
        for ext in (suffix, *COMPANION[fmt]):
            name = f"{i:06d}{ext}"
            os.link(os.path.join(base, src[: -len(suffix)] + ext), os.path.join(dest, name))
            files.append({**entries[src[: -len(suffix)] + ext], "name": name})
    pieces = [index.piece(s) for s in range(len(names))]

    def tiled():
        for i in range(shards):
            p = pieces[i % len(pieces)]
            p.name = f"{i:06d}{suffix}"
            yield p
    info = write_index(os.path.join(dest, INDEX_NAME), fmt, tiled())
    samples = sum(int(index.shards["count"][i % len(names)]) for i in range(shards))
    manifest.update(files=files, samples=samples, index={"name": INDEX_NAME, "bytes": os.path.getsize(info),
                                                                  "sha256": file_digest(info)})
    with open(os.path.join(dest, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return dest


# --- one rank, measured in its own process -------------------------------------------------------

def link_copy(src: str, dest: str) -> str:
    """Another source of the same samples: `dest` holding hard links of every file in `src` (its
    shards, index and manifest: a replicated dataset, a folder of its own for the loader)."""
    if os.path.exists(os.path.join(dest, INDEX_NAME)):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)):
            os.link(os.path.join(src, name), os.path.join(dest, name))
    return dest


def _status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _mapping_rss(path: str) -> int:
    """Resident bytes of this process's mappings of `path` (the folder index's touched pages)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and ":" not in first:  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def _private(pid: int) -> int | None:
    """A process's own memory: its anonymous pages (heap, and what it copied of its parent's
    since the fork), not the file pages it maps (shards, the index: page cache, shared and
    reclaimable, though counted as private while only this process maps them). None when the
    process has gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Anonymous:"))
    except (FileNotFoundError, ProcessLookupError):
        return None


def _handles(pid: int, folder: str) -> tuple[int, int] | None:
    """(open descriptors, shard-file maps) of a process; None when it has gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/maps") as f:
            maps = {line.split()[-1] for line in f if folder in line and not line.rstrip().endswith(INDEX_NAME)}
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fds, len(maps)


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, ValueError):
                pass
    return out


def probe(args: argparse.Namespace) -> dict:
    """One rank: open, plan, first batch, `--batches` batches, resume (see the module docstring)."""
    import torch

    import pipelines.backends.torch_loader  # noqa: F401 - imported before the baseline: libraries are not the open's cost
    from pipelines.loader import Loader, LoaderConfig, build_loader
    from pipelines.shardset import ShardSet
    from pipelines.storage.remote import REQUESTS

    torch.set_num_threads(1)
    cfg = LoaderConfig(shards=args.folder, format=args.format, backend=args.backend, device="cpu", split="train",
                       shuffle=args.shuffle, batch_size=args.batch_size, image_size=64, rank=args.rank,
                       world_size=args.world, workers=args.workers, cache_dir=args.cache_dir)
    base = _status()
    t0 = time.perf_counter()
    mixture = isinstance(args.folder, list)  # several sources: the loader opens them (pipelines/sources.py)
    shardset = None if mixture else ShardSet(cfg.shards, cfg.format, cfg.on_error, cfg.cache_dir, cfg.cache_limit,
                                             cfg.max_open_shards)
    opened = time.perf_counter() - t0
    loader = Loader(cfg, shardset)
    shardset = loader.shardset
    sets = shardset.sets if mixture else [shardset]
    out = {"open_s": time.perf_counter() - t0 if mixture else opened, "loader_s": time.perf_counter() - t0,
           "samples": len(shardset), "shards": len(shardset.paths), "requests_open": sum(REQUESTS.values()),
           **{f"open_{k}": v for k, v in _status().items()}, "base_rss": base["VmRSS"],
           "base_anon": base["RssAnon"], "index_rss": sum(_mapping_rss(s.index.path) for s in sets)}
    out["open_fds"] = len(os.listdir("/proc/self/fd"))
    if args.open_only:
        loader.close()
        return out
    t0 = time.perf_counter()
    plan = loader.plan()
    plan.batch(0)
    out["plan_s"] = time.perf_counter() - t0
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)
    out["first_batch_s"] = time.perf_counter() - t0
    workers = _children(os.getpid())
    out["worker_private"] = [v for v in map(_private, workers) if v is not None]
    batches = min(args.batches, len(loader))
    for _ in range(batches - 1):
        next(it)
    folder = os.path.commonpath([s.folder for s in sets]) if mixture else loader.shardset.folder
    out["after"] = {"batches": batches, "main": _handles(os.getpid(), folder),
                    "workers": [h for h in (_handles(w, folder) for w in _children(os.getpid())) if h]}
    out.update({f"after_{k}": v for k, v in _status().items()})
    state = loader.state_dict()
    del it
    loader.close()
    t0 = time.perf_counter()
    again = build_loader(cfg)
    again.load_state_dict(state)
    next(iter(again))
    out["resume_s"] = time.perf_counter() - t0
    again.close()
    return out


def run_probe(folder: str, fmt: str, **kw) -> dict:
    args = {"folder": folder, "format": fmt, "backend": "torch", "shuffle": "global", "batch_size": 64, "rank": 0,
            "world": 8, "workers": 2, "batches": 100, "cache_dir": os.path.join(tempfile.gettempdir(), "bench-scale-cache"),
            "open_only": False, **kw}
    cmd = [sys.executable, "-m", "tools.bench.bench_scale", "_probe", json.dumps(args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"bench-scale: probe failed ({folder}, {fmt}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def warm(folder: str) -> None:
    """Read the folder index once, so opens are measured with a warm page cache."""
    with open(os.path.join(folder, INDEX_NAME), "rb") as f:
        while f.read(1 << 24):
            pass


# --- the whole epoch under a descriptor limit ----------------------------------------------------

def epoch_probe(args: argparse.Namespace) -> dict:
    from pipelines.loader import LoaderConfig, build_loader

    cfg = LoaderConfig(shards=args.folder, format=args.format, backend=args.backend, device="cpu", split="train",
                       batch_size=args.batch_size, image_size=64, workers=args.workers, cache_dir=args.cache_dir)
    loader = build_loader(cfg)
    t0, n, peak = time.perf_counter(), 0, 0
    for i, batch in enumerate(loader):
        n += len(batch)
        if i % 200 == 0:
            held = [_handles(w, loader.shardset.folder) for w in _children(os.getpid())]
            peak = max([peak, len(os.listdir("/proc/self/fd"))] + [h[0] for h in held if h])
    loader.close()
    return {"samples": n, "seconds": time.perf_counter() - t0, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "peak_fds": peak}


def run_epoch(folder: str, fmt: str, backend: str, nofile: int, workers: int) -> dict:
    args = {"folder": folder, "format": fmt, "backend": backend, "batch_size": 256, "workers": workers,
            "cache_dir": os.path.join(tempfile.gettempdir(), "bench-scale-cache")}
    cmd = [sys.executable, "-m", "tools.bench.bench_scale", "_epoch", json.dumps(args)]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- object storage ------------------------------------------------------------------------------

def s3_rows(base: str, root: str, shards: list[int], ranks: int) -> list[dict]:
    from pipelines.storage import remote as storage
    from tools.bench.bench_peers import loopback_s3

    rows = []
    with loopback_s3("scale"):
        for count in shards:
            folder = replicate(base, os.path.join(root, f"s3-{count}"), count)
            prefix = f"s3://scale/wds-{count}"  # a make-shards --out prefix, opened by it as users do
            url = f"{prefix}/wds"
            names = sorted(os.listdir(folder))
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda n: storage.upload_file(os.path.join(folder, n), f"{url}/{n}"), names))
            cache = os.path.join(root, f"s3-cache-{count}")
            shutil.rmtree(cache, ignore_errors=True)
            one = run_probe(prefix, "wds", open_only=True, cache_dir=cache)
            again = run_probe(prefix, "wds", open_only=True, cache_dir=cache)
            row = {"shards": count, "samples": one["samples"], "open_s": one["open_s"],
                   "requests_first_open": one["requests_open"], "requests_next_open": again["requests_open"],
                   "index_bytes": os.path.getsize(os.path.join(folder, INDEX_NAME)),
                   "open_rss": one["open_VmRSS"] - one["base_rss"]}
            if count <= 2000:  # an epoch of every rank of a node: each shard fetched once between them
                shutil.rmtree(cache, ignore_errors=True)
                row["node_epoch"] = node_epoch(url, cache, ranks)
            rows.append(row)
    return rows


def node_epoch(url: str, cache: str, ranks: int) -> dict:
    args = {"folder": url, "format": "wds", "cache_dir": cache, "world": ranks}
    procs = [subprocess.Popen([sys.executable, "-m", "tools.bench.bench_scale", "_rank", json.dumps({**args, "rank": r})],
                              stdout=subprocess.PIPE, text=True) for r in range(ranks)]
    t0 = time.perf_counter()
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"ranks": ranks, "seconds": time.perf_counter() - t0, "samples": sum(o["samples"] for o in outs),
            "downloads": sum(o["downloads"] for o in outs), "requests": sum(o["requests"] for o in outs)}


def rank_epoch(args: argparse.Namespace) -> dict:
    """One rank of a node reading a whole epoch of shards (ids only, nothing decoded): the cache's work."""
    from pipelines.shardset import ShardSet, position_of
    from pipelines.plan.epoch_plan import EpochPlan
    from pipelines.storage.remote import REQUESTS

    shards = ShardSet(args.folder, args.format, cache_dir=args.cache_dir)
    ends = shards.ends.tolist()
    plan = EpochPlan(total=len(shards), batch_size=64, rank=args.rank, world_size=args.world, shuffle="block",
                     drop_last=False, shard_sizes=[b - a for a, b in zip([0] + ends, ends)])
    n = 0
    for b in range(plan.num_batches):
        shards.follow(plan, b)
        images, _ = shards.read_batch(plan.batch(b), 0, 0, position_of(0, b))
        n += len(images)
    shards.close()
    return {"samples": n, "downloads": shards.cache.stats()["fetched"], "requests": sum(REQUESTS.values())}


# --- the report ----------------------------------------------------------------------------------

def fit(rows: list[dict], key: str) -> dict:
    """Least squares `key` = a + b·shards + c·samples over the rows (b, c: growth per shard, per sample)."""
    x = np.array([[1.0, r["shards"], r["samples"]] for r in rows])
    y = np.array([r[key] for r in rows], float)
    if len(rows) < 3:
        return {}
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"fixed": coef[0], "per_shard": coef[1], "per_sample": coef[2]}


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def markdown(report: dict) -> str:
    lines = ["| format | samples | shards | open s | RSS after open: total (the open's anonymous memory; index pages) "
             "| plan s | first batch s | fds / shard maps after batches (main; workers) | worker anonymous | resume s |",
             "|---|---:|---:|---:|---|---:|---:|---|---|---:|"]
    for r in report["local"]:
        after = r.get("after", {})
        workers = "; ".join(f"{f}/{m}" for f, m in after.get("workers", []))
        lines.append(f"| {r['format']} | {r['samples']:,} | {r['shards']:,} | {r['open_s']:.2f} "
                     f"| {gib(r['open_VmRSS'])} (+{gib(r['open_RssAnon'] - r['base_anon'])}; {gib(r['index_rss'])}) "
                     f"| {r.get('plan_s', float('nan')):.4f} | {r.get('first_batch_s', float('nan')):.2f} "
                     f"| {after.get('main', ['-', '-'])[0]}/{after.get('main', ['-', '-'])[1]}; {workers} "
                     f"| {', '.join(gib(p) for p in r.get('worker_private', []))} | {r.get('resume_s', float('nan')):.2f} |")
    for name in ("open_s", "open_anon", "open_VmRSS"):
        f = report["fits"].get(name)
        if f:
            lines.append(f"\nFit of {name}: {f['fixed']:.4g} + {f['per_shard']:.4g} per shard + "
                         f"{f['per_sample']:.4g} per sample.")
    if report.get("mix"):
        m = report["mix"]
        lines.append(f"\n| sources (a mixture of {m['sources']} copies) | samples | open s | RSS after open: anonymous; "
                     "index pages | plan s | first batch s | resume s |\n|---|---:|---:|---|---:|---:|---:|")
        for label, r in (("one", m["one"]), (f"{m['sources']}", m["many"])):
            lines.append(f"| {label} | {r['samples']:,} | {r['open_s']:.2f} | +{gib(r['open_RssAnon'] - r['base_anon'])}; "
                         f"{gib(r['index_rss'])} | {r.get('plan_s', float('nan')):.4f} | "
                         f"{r.get('first_batch_s', float('nan')):.2f} | {r.get('resume_s', float('nan')):.2f} |")
    if report.get("epoch"):
        lines.append("\n| whole epoch under ulimit -n | backend | samples | seconds | peak fds |\n|---|---|---:|---:|---:|")
        for backend, e in report["epoch"].items():
            lines.append(f"| {e.get('nofile', '-')} | {backend} | {e.get('samples', '-')} | "
                         f"{e.get('seconds', float('nan')):.0f} | {e.get('peak_fds', e.get('error', '-'))} |")
    if report.get("s3"):
        lines.append("\n| s3 shards | samples | index bytes | first open: requests, s | next open: requests "
                     "| node epoch: ranks, downloads / shards |\n|---:|---:|---:|---|---:|---|")
        for r in report["s3"]:
            node = r.get("node_epoch")
            node_text = f"{node['ranks']}, {node['downloads']} / {r['shards']}" if node else "-"
            lines.append(f"| {r['shards']:,} | {r['samples']:,} | {r['index_bytes']:,} | {r['requests_first_open']}, "
                         f"{r['open_s']:.2f} | {r['requests_next_open']} | {node_text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_probe"], ["_epoch"], ["_rank"]):
        args = argparse.Namespace(**json.loads(argv[1]))
        fn = {"_probe": probe, "_epoch": epoch_probe, "_rank": rank_epoch}[argv[0]]
        print(json.dumps(fn(args)))
        return 0
    p = argparse.ArgumentParser(prog="bench-scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="a make-shards --out folder with wds and rec subfolders (default: synthetic)")
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "bench-scale"),
                   help="where the replicated folders go (hard links: on the base's file system)")
    p.add_argument("--sizes", type=float, nargs="*", default=[1e6, 1e7, 1e8], help="samples per folder")
    p.add_argument("--per-shard", type=int, default=1000, help="wds samples per shard")
    p.add_argument("--rec-per-shard", type=int, default=10000, help="rec samples per shard")
    p.add_argument("--batches", type=int, default=100, help="batches per rank before counting descriptors and maps")
    p.add_argument("--epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="a whole epoch over the 1M folder under ulimit -n 1024, both backends")
    p.add_argument("--s3-shards", type=int, nargs="*", default=[1000, 10000])
    p.add_argument("--ranks", type=int, default=8, help="rank processes of one node in the S3 epoch")
    p.add_argument("--mix", type=int, default=4, help="also open this many sources of the largest wds size "
                   "(hard-linked copies) as one mixture, against one (0: skip)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    p.add_argument("--out", default="bench_out/scale")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.per_shard, args.rec_per_shard, args.batches = [2000, 20000], 100, 1000, 5
        args.epoch, args.s3_shards, args.ranks = False, [20], 2
    with reaped():  # its probe and rank processes die with it, however it ends
        return measure(args, argv)


def measure(args: argparse.Namespace, argv: list[str]) -> int:
    os.makedirs(args.root, exist_ok=True)
    base = max(args.rec_per_shard, args.per_shard)
    wds_base = os.path.join(args.base, "wds") if args.base else make_base(args.root, base, args.per_shard, "wds")
    rec_base = os.path.join(args.base, "rec") if args.base else make_base(args.root, base, args.rec_per_shard, "rec")
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
                          "python": platform.python_version(), "load_before": os.getloadavg()},
              "command": " ".join(["python -m tools.bench.bench_scale", *argv]), "local": [], "fits": {}}
    for size in args.sizes:
        for fmt, base, per in (("wds", wds_base, args.per_shard), ("rec", rec_base, args.rec_per_shard)):
            shards = max(1, int(size) // per)
            folder = replicate(base, os.path.join(args.root, f"{fmt}-{int(size)}"), shards)
            warm(folder)
            row = {"format": fmt, **run_probe(folder, fmt, batches=args.batches)}
            report["local"].append(row)
            print(json.dumps({k: row[k] for k in ("format", "samples", "shards", "open_s", "open_VmRSS")}), flush=True)
    if args.mix > 1:  # several sources of the largest size against one (the first row of that size)
        size = int(max(args.sizes))
        folder = os.path.join(args.root, f"wds-{size}")
        folders = [folder] + [link_copy(folder, f"{folder}-copy{i}") for i in range(1, args.mix)]
        one = next(r for r in report["local"] if r["format"] == "wds" and r["samples"] >= size * 0.99)
        many = run_probe(folders, "wds", batches=args.batches)
        report["mix"] = {"sources": args.mix, "one": one, "many": many}
        print(json.dumps({"mix": args.mix, "samples": many["samples"], "open_s": many["open_s"]}), flush=True)
    for row in report["local"] + ([report["mix"]["many"]] if "mix" in report else []):
        row["open_anon"] = row["open_RssAnon"] - row["base_anon"]
    for key in ("open_s", "open_anon", "open_VmRSS"):
        report["fits"][key] = fit(report["local"], key)
    if args.epoch:
        folder = os.path.join(args.root, f"wds-{int(1e6)}")
        replicate(wds_base, folder, int(1e6) // args.per_shard)
        report["epoch"] = {b: run_epoch(folder, "wds", b, 1024, 2) for b in ("torch", "dali")}
    if args.s3_shards:  # small shards (10 photos): thousands of objects upload in a minute
        report["s3"] = s3_rows(make_base(args.root, 100, 10, "wds"), args.root, args.s3_shards, args.ranks)
    report["machine"]["load_after"] = os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(os.path.join(args.out, "scale.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
