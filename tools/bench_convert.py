"""bench-convert: resize + re-encode throughput of make-shards against img2dataset, same files, same cores.

    bench-convert --out bench_out/convert.json            # ~5,000 images, 3 repeats each
    bench-convert --quick --out /tmp/convert.json         # 200 images, 1 repeat, seconds

Both tools run as subprocesses timed from launch to exit (start-up included, as a user pays it),
writing webdataset shards to the same scratch disk, with the same worker count, shard size,
short-side resize (never upscaling) and JPEG quality. img2dataset reads the files by `file://`
URL; its thread count is chosen by a small sweep so the baseline is its best, not its default.
The bound is Pillow's own decode + resize + encode in one process: what one core can do at most.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DEFAULT_IMAGES = [DATA / "flickr8k-1k" / "images", DATA / "coco-mini" / "train2017",
                  DATA / "coco-mini" / "val2017"]
PACKAGES = ("img2dataset", "pillow", "opencv-python-headless", "albumentations", "pyarrow", "tqdm")
# img2dataset's defaults hash every image and parse its EXIF, work make-shards does not do: turn
# both off so the baseline does the same job. skip_reencode passes an unresized JPEG through as
# make-shards does. It still decodes every image (its resizer decodes before deciding).
I2D_SCRIPT = "import json, sys; from img2dataset import download; download(**json.loads(sys.argv[1]))"
# Quiet third-party start-up: no update check (network) from albumentations, no wandb.
QUIET_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


class BenchError(RuntimeError):
    """A run that failed or dropped images: its time must not be reported."""


def log(msg: str) -> None:
    print(f"[bench-convert] {msg}", file=sys.stderr, flush=True)


def find_jpegs(dirs: list[Path]) -> list[Path]:
    files = sorted(p for d in dirs for p in d.iterdir()
                   if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise BenchError(f"no JPEG files in {', '.join(map(str, dirs))}")
    return files


def stage(sources: list[Path], count: int, folder: Path) -> list[tuple[Path, Path]]:
    """`count` (staged, source) pairs: the sources repeated under distinct names, hard-linked when
    the disk allows (no extra bytes, one page-cache copy), copied otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        src = sources[i % len(sources)]
        dst = folder / f"{i:07d}_{src.name}"
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        pairs.append((dst, src))
    return pairs


def write_lists(files: list[Path], folder: Path) -> tuple[Path, Path]:
    """The same images and captions as a make-shards table (JSONL) and an img2dataset URL list."""
    folder.mkdir(parents=True, exist_ok=True)
    table, urls = folder / "make_shards.jsonl", folder / "img2dataset.csv"
    with open(table, "w") as t, open(urls, "w", newline="") as u:
        writer = csv.writer(u)
        writer.writerow(["url", "caption"])
        for f in files:
            caption = f"a photo named {f.stem}"
            t.write(json.dumps({"image": str(f), "caption": caption}) + "\n")
            writer.writerow([f.resolve().as_uri(), caption])
    return table, urls


def timed(cmd: list[str], logfile: Path) -> float:
    """Wall-clock seconds from launch to exit; the tool's output goes to `logfile`."""
    env = {**os.environ, **QUIET_ENV}
    with open(logfile, "w") as fh:
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
    if rc != 0:
        tail = logfile.read_text(errors="replace")[-2000:]
        raise BenchError(f"{cmd[2]} exited {rc}; log {logfile}:\n{tail}")
    return seconds


def run_make_shards(table: Path, out: Path, n: int, a: argparse.Namespace, spp: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tools.make_shards", "--source", "table", "--input", str(table),
           "--image-column", "image", "--caption-column", "caption", "--format", "wds",
           "--out", str(out), "--resize", str(a.resize), "--quality", str(a.quality),
           "--workers", str(a.workers), "--samples-per-shard", str(spp), "--quiet", "--overwrite"]
    seconds = timed(cmd, out.parent / f"{out.name}.log")
    stats_path = out / "wds" / "stats.json"
    written = json.loads(stats_path.read_text())["written"] if stats_path.exists() else 0
    if written != n:
        raise BenchError(f"make-shards wrote {written} of {n} images ({stats_path})")
    return seconds


def run_img2dataset(urls: Path, out: Path, n: int, a: argparse.Namespace, spp: int,
                    threads: int) -> float:
    # An empty folder, not incremental_mode="overwrite": in 1.47 that deletes the _tmp folder it
    # has just made inside the output and every worker then fails.
    shutil.rmtree(out, ignore_errors=True)
    kwargs = dict(url_list=str(urls), input_format="csv", url_col="url", caption_col="caption",
                  output_folder=str(out), output_format="webdataset", processes_count=a.workers,
                  thread_count=threads, image_size=a.resize, resize_mode="keep_ratio",
                  resize_only_if_bigger=True, encode_format="jpg", encode_quality=a.quality,
                  skip_reencode=True, number_sample_per_shard=spp, compute_hash=None,
                  extract_exif=False, enable_wandb=False, timeout=10, retries=0)
    seconds = timed([sys.executable, "-c", I2D_SCRIPT, json.dumps(kwargs)], out.parent / f"{out.name}.log")
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    if ok != n:
        raise BenchError(f"img2dataset converted {ok} of {n} images ({out}/*_stats.json)")
    return seconds


def pillow_bound(pairs: list[tuple[Path, Path]], size: int, quality: int) -> dict:
    """One process, bytes already in memory: the images that need it are decoded (at the largest
    JPEG DCT scale that still covers `size`), resized and encoded; the rest pass through as both
    tools pass them. Per-image timers split the two kinds."""
    blobs = {src: src.read_bytes() for src in {s for _, s in pairs}}
    spent = {"resized": 0.0, "passed": 0.0}
    counts = {"resized": 0, "passed": 0}
    for _, src in tqdm(pairs, desc="Pillow bound", unit=" img", leave=False):
        t0 = time.perf_counter()
        im = Image.open(io.BytesIO(blobs[src]))
        short = min(im.size)
        kind = "resized" if short > size else "passed"
        if kind == "resized":
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
            scale = size / min(im.size)
            im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BICUBIC,
                           reducing_gap=3.0)
            im.save(io.BytesIO(), "JPEG", quality=quality)
        spent[kind] += time.perf_counter() - t0
        counts[kind] += 1
    total = sum(spent.values())
    return {"images": len(pairs), **{f"{k}_images": v for k, v in counts.items()},
            "seconds": round(total, 3), "images_per_s_per_core": round(len(pairs) / total, 1),
            "resized_images_per_s_per_core": round(counts["resized"] / spent["resized"], 1)
            if counts["resized"] else None}


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu_model": model, "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(), "packages": versions}


def median_rate(seconds: list[float], n: int) -> dict:
    med = statistics.median(seconds)
    return {"images": n, "seconds": [round(s, 3) for s in seconds], "median_s": round(med, 3),
            "images_per_s": round(n / med, 1)}


def table(results: dict) -> str:
    base = results["tools"]["img2dataset"]["images_per_s"]
    rows = ["| tool | images | median s | images/s | × img2dataset |", "|---|---:|---:|---:|---:|"]
    for name, r in results["tools"].items():
        label = f"{name} (threads={results['img2dataset_threads']})" if name == "img2dataset" else name
        rows.append(f"| {label} | {r['images']} | {r['median_s']:.2f} | {r['images_per_s']:.0f} | "
                    f"{r['images_per_s'] / base:.2f} |")
    b, w = results["bound"], results["config"]["workers"]
    rows.append("")
    rows.append(f"Pillow bound (1 process, bytes in memory): {b['images_per_s_per_core']:.0f} images/s "
                f"per core ({b['resized_images']} resized at {b['resized_images_per_s_per_core'] or 0:.0f}"
                f"/s, {b['passed_images']} passed through); × {w} workers = "
                f"{b['images_per_s_per_core'] * w:.0f}/s")
    for name, r in results["tools"].items():
        rows.append(f"- {name}: {r['fraction_of_bound']:.0%} of the bound × workers")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", nargs="+", type=Path, default=DEFAULT_IMAGES, help="folders of JPEGs")
    p.add_argument("--count", type=int, default=5000, help="images converted per run (replicated)")
    p.add_argument("--resize", type=int, default=256, help="shorter side, never upscaled")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--samples-per-shard", type=int, help="default: 4 shards per worker")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="4,16,64", help="img2dataset thread_count values to sweep")
    p.add_argument("--sweep-count", type=int, help="images per sweep run (default: count/5, ≥ 200)")
    p.add_argument("--scratch", type=Path, help="work folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=Path("bench_out/convert.json"))
    p.add_argument("--quick", action="store_true", help="200 images, 1 repeat, 2-point sweep")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.count, a.repeats = min(a.count, 200), 1
        a.threads = ",".join(a.threads.split(",")[:2])
    threads = [int(t) for t in a.threads.split(",")]
    spp = a.samples_per_shard or math.ceil(a.count / (4 * a.workers))
    sweep_n = min(a.count, a.sweep_count or max(200, a.count // 5))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # Scratch beside the results: inputs and both tools' outputs on one disk.
    scratch = a.scratch or Path(tempfile.mkdtemp(prefix="bench_convert_", dir=a.out.parent))
    try:
        pairs = stage(find_jpegs(a.images), a.count, scratch / "images")
        files = [f for f, _ in pairs]
        lists = write_lists(files, scratch)
        sweep_lists = write_lists(files[:sweep_n], scratch / "sweep")
        for f in files:  # warm the page cache so neither tool pays the first read
            f.read_bytes()
        sweep = []
        # The sweep also warms both tools' imports (.pyc) before anything is timed.
        run_make_shards(sweep_lists[0], scratch / "ms_warmup", sweep_n, a, math.ceil(sweep_n / (4 * a.workers)))
        for t in threads:
            log(f"img2dataset thread sweep: threads={t} on {sweep_n} images")
            s = run_img2dataset(sweep_lists[1], scratch / f"i2d_sweep_{t}", sweep_n, a,
                                math.ceil(sweep_n / (4 * a.workers)), t)
            sweep.append({"threads": t, "images": sweep_n, "seconds": round(s, 3),
                          "images_per_s": round(sweep_n / s, 1)})
        best = min(sweep, key=lambda r: r["seconds"])["threads"]
        times: dict[str, list[float]] = {"make-shards": [], "img2dataset": []}
        for r in range(a.repeats):
            # Alternate which tool goes first so drift (thermal, noisy neighbours) hits both.
            for name in (("make-shards", "img2dataset") if r % 2 == 0 else ("img2dataset", "make-shards")):
                log(f"repeat {r + 1}/{a.repeats}: {name} on {a.count} images, {a.workers} workers")
                times[name].append(
                    run_make_shards(lists[0], scratch / "ms_out", a.count, a, spp) if name == "make-shards"
                    else run_img2dataset(lists[1], scratch / "i2d_out", a.count, a, spp, best))
                log(f"  {times[name][-1]:.2f} s")
        log(f"Pillow bound on the same {a.count} images")
        bound = pillow_bound(pairs, a.resize, a.quality)
    except BenchError as e:
        print(f"bench-convert: error: {e}", file=sys.stderr)
        return 1
    finally:
        if a.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    tools = {k: median_rate(v, a.count) for k, v in times.items()}
    for r in tools.values():
        r["ratio_to_img2dataset"] = round(r["images_per_s"] / tools["img2dataset"]["images_per_s"], 3)
        r["fraction_of_bound"] = round(r["images_per_s"] / (bound["images_per_s_per_core"] * a.workers), 3)
    results = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "config": {"count": a.count, "distinct_images": len({s for _, s in pairs}), "resize": a.resize,
                   "quality": a.quality, "workers": a.workers, "samples_per_shard": spp,
                   "repeats": a.repeats, "images": [str(d) for d in a.images]},
        "thread_sweep": sweep, "img2dataset_threads": best, "tools": tools, "bound": bound,
        "ratio": tools["make-shards"]["ratio_to_img2dataset"],
    }
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\nimg2dataset thread sweep ({sweep_n} images): "
          + ", ".join(f"{s['threads']}: {s['images_per_s']:.0f}/s" for s in sweep) + f" → {best}")
    print(f"raw timings → {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
