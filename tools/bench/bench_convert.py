"""bench-convert: resize + re-encode throughput of make-shards against img2dataset, same files, same cores.

    bench-convert --out bench_out/convert.json            # 5,000 images, 3 repeats each
    bench-convert --photos large --out bench_out/convert_large.json   # 1,000 photos >= 1,024 px
    bench-convert --quick --out /tmp/convert.json         # 200 images, 1 repeat

`--photos small` (the default) converts the shared photos as they are (Flickr thumbnails, COCO
<= 640 px); `--photos large` a set of >= 1,024-px photos tiled from the COCO ones
(tools/bench/large_photos.py), built once beside `--out`; `both` runs the two and writes
{"small": ..., "large": ...}.

Both tools run as subprocesses timed from launch to exit (start-up included, as a user pays it;
their own stats give the rate without it), writing webdataset shards to one disk with the same
workers, shard size, short-side resize (never upscaling) and JPEG quality. img2dataset reads the
files by `file://` URL; a small sweep picks its thread count, so the baseline is its best.
The bound is our own `process_image` (decode + resize + encode) in one process, bytes in memory:
what one core can do at most, per resize backend (pillow, torch). Peers (`--peers mds,litdata`,
tools/bench/bench_peers.py) run the same `process_image` inside Mosaic's MDSWriter and LitData's
optimize. `--quality-check` adds ms per resize and PSNR of each backend against today's output
(pillow) and against a LANCZOS resize of the same photo.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tools.bench import large_photos
from tools.bench.bench_peers import WRITERS as PEERS
from tools.convert.image_policy import RESIZE_BACKENDS, ImagePolicy, draft_request, process_image, target_size
from tools.convert.reaper import reaped

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
COCO = [DATA / "coco-mini" / "train2017", DATA / "coco-mini" / "val2017"]
DEFAULT_IMAGES = [DATA / "flickr8k-1k" / "images", *COCO]
PHOTO_SETS = {"small": ("small",), "large": ("large",), "both": ("small", "large")}
PACKAGES = ("img2dataset", "pillow", "opencv-python-headless", "albumentations", "pyarrow", "tqdm", "torch",
            "mosaicml-streaming", "litdata")
PEER_LABELS = {"mds": "Mosaic MDSWriter", "litdata": "LitData optimize"}
I2D_SCRIPT = "import json, sys; from img2dataset import download; download(**json.loads(sys.argv[1]))"
# No update check (network) from albumentations, no wandb, no deprecation chatter in the logs.
QUIET_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
log = functools.partial(print, "[bench-convert]", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A run that failed or dropped images: its time must not be reported."""


def find_jpegs(dirs: list[Path]) -> list[Path]:
    if missing := [str(d) for d in dirs if not d.is_dir()]:
        raise BenchError(f"no such image folder: {', '.join(missing)}")
    files = sorted(p for d in dirs for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise BenchError(f"no JPEG files in {', '.join(map(str, dirs))}")
    # A fixed shuffle, so that the sweep's and --quick's prefixes mix the sets as the whole does.
    random.Random(0).shuffle(files)
    return files


def stage(sources: list[Path], count: int, folder: Path) -> list[tuple[Path, Path]]:
    """`count` (staged, source) pairs: the sources repeated under distinct names, hard-linked when
    the disk allows (no extra bytes, one page-cache copy), copied otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        src = sources[i % len(sources)]
        dst = folder / f"{i:07d}_{src.name}"  # distinct names: both tools key samples by name
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
            t.write(json.dumps({"image": str(f.resolve()), "caption": caption}) + "\n")
            writer.writerow([f.resolve().as_uri(), caption])
    return table, urls


def timed(cmd: list[str], logfile: Path) -> tuple[float, float]:
    """(wall seconds from launch to exit, CPU seconds of the tool and all its processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(logfile, "w") as fh, reaped():
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **QUIET_ENV}, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise BenchError(f"{' '.join(cmd[:3])} exited {rc}; log {logfile}:\n"
                         f"{logfile.read_text(errors='replace')[-2000:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def run_make_shards(table: Path, out: Path, n: int, a: argparse.Namespace, spp: int,
                    backend: str = "pillow") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tools.convert.make_shards", "--source", "table", "--input", str(table),
           "--image-column", "image", "--caption-column", "caption", "--format", "wds",
           "--out", str(out), "--resize", str(a.resize), "--quality", str(a.quality),
           "--workers", str(a.workers), "--samples-per-shard", str(spp), "--quiet", "--overwrite",
           "--resize-backend", backend]
    wall, cpu = timed(cmd, out.parent / f"{out.name}.log")
    stats_path = out / "wds" / "stats.json"
    if (stats := json.loads(stats_path.read_text()) if stats_path.exists() else {"written": 0})["written"] != n:
        raise BenchError(f"make-shards wrote {stats['written']} of {n} images ({stats_path})")
    return {"wall_s": wall, "cpu_s": cpu, "in_tool_s": stats["seconds"]}


def run_img2dataset(urls: Path, out: Path, n: int, a: argparse.Namespace, spp: int,
                    threads: int) -> dict:
    # An empty folder, not incremental_mode="overwrite": in 1.47 that deletes the _tmp folder it
    # has just made inside the output, and every worker then fails.
    shutil.rmtree(out, ignore_errors=True)
    # Its defaults also hash every image and parse its EXIF, work make-shards does not do: both off,
    # so the baseline does the same job. skip_reencode passes an unresized JPEG through as
    # make-shards does (img2dataset still decodes it first: its resizer decodes before deciding).
    kwargs = dict(url_list=str(urls), input_format="csv", url_col="url", caption_col="caption",
                  output_folder=str(out), output_format="webdataset", processes_count=a.workers,
                  thread_count=threads, image_size=a.resize, resize_mode="keep_ratio",
                  resize_only_if_bigger=True, encode_format="jpg", encode_quality=a.quality,
                  skip_reencode=True, number_sample_per_shard=spp, compute_hash=None,
                  extract_exif=False, enable_wandb=False, timeout=10, retries=0)
    wall, cpu = timed([sys.executable, "-c", I2D_SCRIPT, json.dumps(kwargs)], out.parent / f"{out.name}.log")
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    if (ok := sum(s["successes"] for s in stats)) != n:
        raise BenchError(f"img2dataset converted {ok} of {n} images ({out}/*_stats.json)")
    # From the first shard's start to the last one's end: its conversion without interpreter,
    # import and first worker start-up (worker restarts, maxtasksperchild=5, stay in).
    in_tool = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {"wall_s": wall, "cpu_s": cpu, "in_tool_s": in_tool}


def run_peer(writer: str, table: Path, out: Path, n: int, a: argparse.Namespace) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tools.bench.bench_peers", "convert", "--writer", writer, "--table", str(table),
           "--out", str(out), "--workers", str(a.workers), "--resize", str(a.resize), "--quality", str(a.quality)]
    log_path = out.parent / f"{out.name}.log"
    wall, cpu = timed(cmd, log_path)
    stats = json.loads(log_path.read_text().strip().splitlines()[-1])  # its last line: the JSON result
    if stats["written"] != n:
        raise BenchError(f"{PEER_LABELS[writer]} wrote {stats['written']} of {n} images ({log_path})")
    return {"wall_s": wall, "cpu_s": cpu, "in_tool_s": stats["seconds"]}


def image_bound(pairs: list[tuple[Path, Path]], policy: ImagePolicy) -> dict:
    """One process, bytes in memory, CPU time (robust to other load on the machine): make-shards'
    own `process_image`, so images that need it are decoded (JPEGs at a reduced DCT scale, unless
    the policy says otherwise), resized, encoded; the rest pass through, as every tool passes them."""
    import torch

    torch.set_num_threads(1)  # one core, as in a make-shards worker
    blobs = {src: src.read_bytes() for src in {s for _, s in pairs}}
    spent, counts = {"resized": 0.0, "passed": 0.0}, {"resized": 0, "passed": 0}
    for _, src in tqdm(pairs, desc=f"bound ({policy.resize_backend})", unit=" img", mininterval=2,
                       file=sys.stderr):
        t0 = time.process_time()
        out = process_image(blobs[src], policy)
        kind = "passed" if out.data is blobs[src] else "resized"
        spent[kind] += time.process_time() - t0
        counts[kind] += 1
    total = sum(spent.values())
    return {"images": len(pairs), "resized": counts["resized"], "passed_through": counts["passed"],
            "cpu_s": round(total, 3), "images_per_cpu_s": round(len(pairs) / total, 1),
            "resized_per_cpu_s": round(counts["resized"] / spent["resized"], 1) if counts["resized"] else None}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else float(10 * np.log10(255 ** 2 / mse))  # 99: identical


def quality_check(sources: list[Path], size: int, quality: int, limit: int) -> dict:
    """Per backend over up to `limit` distinct photos that get resized: CPU ms (best of 3) of the
    resize alone, beside the decode (with DCT draft) and the encode every backend shares; mean
    PSNR of the resized pixels against a LANCZOS resize of the full decode (no draft) to the same
    size, and of the stored JPEG against today's (pillow) stored JPEG. The draft itself: the
    full decode's CPU ms, and the PSNR (mean, min) of the stored JPEG against the one made from a
    full decode (`jpeg_draft=False`), and of that full-decode resize against LANCZOS."""
    import torch

    from tools.convert.image_policy import torch_resize

    torch.set_num_threads(1)

    def best_ms(fn):
        times = []
        for _ in range(3):
            t0 = time.process_time()
            out = fn()
            times.append(time.process_time() - t0)
        return min(times) * 1e3, out

    def decode(data, draft=True):
        """(image, its box: the photo's exact extent in the drafted pixels, as process_image resizes it)."""
        im = Image.open(io.BytesIO(data))
        drafted = im.draft("RGB", draft_request(size)) if draft else None
        return im.convert("RGB"), drafted[1] if drafted else None

    def stored(data, **policy):
        return np.asarray(Image.open(io.BytesIO(process_image(data, ImagePolicy(size, quality, **policy)).data)))

    photos = [p for p in sorted(set(sources)) if min(Image.open(p).size) > size][:limit]
    try:
        import cv2  # img2dataset's dependency, not ours: its row is measured only where it is installed
    except ImportError:
        cv2 = None
    ms = {k: [] for k in ("decode", "decode_full", "encode", "img2dataset", *RESIZE_BACKENDS)}
    psnrs = {b: {"vs_lanczos": [], "stored_vs_pillow": []} for b in RESIZE_BACKENDS}
    draft = {"stored_vs_full_decode": [], "full_decode_vs_lanczos": []}
    for path in tqdm(photos, desc="quality check", unit=" img", mininterval=2, file=sys.stderr):
        data = path.read_bytes()
        t, (im, box) = best_ms(lambda: decode(data))
        ms["decode"].append(t)
        target = target_size(*Image.open(path).size, size)  # of the full size, as process_image
        t, (full, _) = best_ms(lambda: decode(data, draft=False))
        ms["decode_full"].append(t)
        ref = np.asarray(full.resize(target, Image.LANCZOS))
        draft["full_decode_vs_lanczos"].append(psnr(np.asarray(full.resize(target, Image.BICUBIC,
                                                                          reducing_gap=3.0)), ref))
        stored_by = {b: stored(data, resize_backend=b) for b in RESIZE_BACKENDS}
        draft["stored_vs_full_decode"].append(psnr(stored_by["pillow"], stored(data, jpeg_draft=False)))
        for b, resize in (("pillow", lambda: im.resize(target, Image.BICUBIC, box=box, reducing_gap=3.0)),
                          ("torch", lambda: torch_resize(im, target, box))):
            t, small = best_ms(resize)
            ms[b].append(t)
            psnrs[b]["vs_lanczos"].append(psnr(np.asarray(small), ref))
            psnrs[b]["stored_vs_pillow"].append(psnr(stored_by[b], stored_by["pillow"]))
        ms["encode"].append(best_ms(lambda: small.save(io.BytesIO(), "JPEG", quality=quality))[0])
        if cv2 is not None:  # img2dataset's own per-image work: OpenCV decode, INTER_AREA, encode
            ms["img2dataset"].append(best_ms(lambda: cv2.imencode(".jpg", cv2.resize(
                cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), target, interpolation=cv2.INTER_AREA),
                [cv2.IMWRITE_JPEG_QUALITY, quality]))[0])
    med = {k: round(float(np.median(v)), 3) if v else None for k, v in ms.items()}
    return {"photos": len(photos), "size": size, "quality": quality,
            "decode_ms_median": med["decode"], "encode_ms_median": med["encode"],
            "img2dataset_cv2_ms_median": med["img2dataset"],
            "draft": {"decode_full_ms_median": med["decode_full"],
                      **{k: round(float(np.mean(v)), 2) if v else None for k, v in draft.items()},
                      "stored_vs_full_decode_min": round(min(draft["stored_vs_full_decode"]), 2) if photos else None},
            "backends": {b: {"resize_ms_median": med[b], **{k: round(float(np.mean(v)), 2)
                                                             for k, v in psnrs[b].items()}}
                         for b in RESIZE_BACKENDS}}


def machine() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in text.split("\n\n")[0]
                                              .splitlines() if ":" in ln)}
    # VMs often name only the vendor line ("AMD EPYC"): family/model pin the generation.
    model = (f"{cpu.get('model name', platform.processor())} (family {cpu.get('cpu family')}, "
             f"model {cpu.get('model')}, {cpu.get('cpu MHz')} MHz)")
    installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    return {"cpu_model": model, "nproc": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "platform": platform.platform(), "packages": {p: installed.get(p) for p in PACKAGES}}


def summarize(runs: list[dict], n: int) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "in_tool_s")}
    return {"images": n, "runs": [{k: round(v, 3) for k, v in r.items()} for r in runs],
            "median_s": round(med["wall_s"], 3), "images_per_s": round(n / med["wall_s"], 1),
            "images_per_s_excl_startup": round(n / med["in_tool_s"], 1),
            "images_per_cpu_s": round(n / med["cpu_s"], 1)}


def table(res: dict) -> str:
    base = res["tools"]["img2dataset"]["images_per_s"]
    rows = ["| tool | images | median s | images/s | × img2dataset | images/s excl. start-up "
            "| images per CPU-s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["tools"].items():
        label = f"img2dataset (threads={res['img2dataset_threads']})" if name == "img2dataset" else \
            PEER_LABELS.get(name, name)
        rows.append(f"| {label} | {r['images']} | {r['median_s']:.2f} | {r['images_per_s']:.0f} | "
                    f"{r['images_per_s'] / base:.2f} | {r['images_per_s_excl_startup']:.0f} | "
                    f"{r['images_per_cpu_s']:.0f} |")
    w = res["config"]["workers"]
    rows.append("")
    for backend, b in res["bounds"].items():
        rows.append(f"Bound, {backend} resize (process_image, 1 process, bytes in memory): "
                    f"{b['images_per_cpu_s']:.0f} images per CPU-s ({b['resized']} resized at "
                    f"{b['resized_per_cpu_s'] or 0:.0f}/s, {b['passed_through']} passed through); "
                    f"× {w} workers = {b['images_per_cpu_s'] * w:.0f}/s")
    rows += [f"- {k}: {r['fraction_of_bound']:.0%} of its bound × workers" for k, r in res["tools"].items()]
    if q := res.get("quality_check"):
        d = q["draft"]
        rows += ["", f"JPEG draft on {q['photos']} photos: decode {q['decode_ms_median']:.2f} ms against "
                 f"{d['decode_full_ms_median'] or 0:.2f} ms at full size; stored JPEG vs the full decode's: "
                 f"{d['stored_vs_full_decode'] or 0:.2f} dB (min {d['stored_vs_full_decode_min'] or 0:.2f}); "
                 f"full decode + bicubic vs LANCZOS: {d['full_decode_vs_lanczos'] or 0:.2f} dB"]
        rows += ["", f"Resize backends on {q['photos']} photos (short side {q['size']}, JPEG q{q['quality']}; "
                 f"shared: decode {q['decode_ms_median']:.2f} ms, encode {q['encode_ms_median']:.2f} ms; "
                 f"img2dataset's OpenCV decode + INTER_AREA + encode: {q['img2dataset_cv2_ms_median'] or 0:.2f} ms):", "",
                 "| backend | resize CPU ms (median) | resized vs LANCZOS | stored JPEG vs pillow's (today) |",
                 "|---|---:|---:|---:|"]
        rows += [f"| {k} | {v['resize_ms_median']:.2f} | {v['vs_lanczos']:.2f} dB | {v['stored_vs_pillow']:.2f} dB |"
                 for k, v in q["backends"].items()]
    if sweep := res["thread_sweep"]:
        rates = ", ".join(f"{s['threads']}: {s['images_per_s_excl_startup']:.0f}/s" for s in sweep)
        rows += ["", f"img2dataset thread sweep ({sweep[0]['images']} images, excl. start-up): {rates}"
                 f" → {res['img2dataset_threads']}"]
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
    p.add_argument("--threads", help="img2dataset thread_count sweep, one value: none (4,16,64; --quick: 16)")
    p.add_argument("--sweep-count", type=int, help="images per sweep run (default: count/5, ≥ 200)")
    p.add_argument("--scratch", type=Path, help="work folder, kept (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("bench_out/convert.json"))
    p.add_argument("--resize-backends", default=",".join(RESIZE_BACKENDS),
                   help="make-shards rows, one per --resize-backend")
    p.add_argument("--peers", default=",".join(PEERS), help=f"peer writers ({', '.join(PEERS)}) or none")
    p.add_argument("--quality-check", type=int, default=0, metavar="PHOTOS",
                   help="also PSNR and ms per resize of each backend on this many photos")
    p.add_argument("--photos", choices=PHOTO_SETS, default="small",
                   help="small: the --images folders as they are; large: >= 1,024-px photos tiled from "
                        "--large-from, built once under --out's folder; both: one run of each")
    p.add_argument("--large-count", type=int, default=1000, help="large photos converted per run (replicated)")
    p.add_argument("--large-distinct", type=int, default=240, help="distinct large photos built")
    p.add_argument("--large-from", nargs="+", type=Path, default=COCO, help="folders of the photos tiled")
    p.add_argument("--quick", action="store_true",
                   help="200 images (large: 40 of 12 distinct), 1 repeat, no sweep")
    return p


def photo_set(a: argparse.Namespace, name: str) -> argparse.Namespace:
    """The arguments of one photo set: `a` with its source files (`sources`), count and folders."""
    if name == "small":
        return argparse.Namespace(**{**vars(a), "photos": name, "sources": find_jpegs(a.images)})
    folder = a.out.parent / "large_photos"  # kept: built once, reused by every later run
    log(f"large photos: {a.large_distinct} in {folder} (built from {', '.join(map(str, a.large_from))})")
    try:
        files = large_photos.build(folder, a.large_distinct, a.large_from)
    except FileNotFoundError as e:
        raise BenchError(str(e)) from e
    random.Random(0).shuffle(files)  # as find_jpegs: a prefix mixes the canvas sizes as the whole does
    return argparse.Namespace(**{**vars(a), "photos": name, "sources": files, "count": a.large_count,
                                 "images": [folder]})


def measure(a: argparse.Namespace, scratch: Path) -> dict:
    threads = [int(t) for t in (a.threads or ("16" if a.quick else "4,16,64")).split(",")]
    spp = a.samples_per_shard or math.ceil(a.count / (4 * a.workers))
    pairs = stage(a.sources, a.count, scratch / "images")
    files = [f for f, _ in pairs]
    lists = write_lists(files, scratch)
    for f in files:  # warm the page cache so neither tool pays the first read
        f.read_bytes()
    sweep, best = [], threads[0]
    if len(threads) > 1:
        n = min(a.count, a.sweep_count or max(200, a.count // 5))
        sweep_lists, sweep_spp = write_lists(files[:n], scratch / "sweep"), math.ceil(n / (4 * a.workers))
        # Also warms make-shards' imports before anything is timed; img2dataset's runs warm its own.
        run_make_shards(sweep_lists[0], scratch / "ms_warmup", n, a, sweep_spp)
        for t in threads:
            log(f"img2dataset thread sweep: thread_count={t} on {n} images")
            r = run_img2dataset(sweep_lists[1], scratch / f"i2d_sweep_{t}", n, a, sweep_spp, t)
            sweep.append({"threads": t, "images": n, "wall_s": round(r["wall_s"], 3),
                          "images_per_s_excl_startup": round(n / r["in_tool_s"], 1)})
        # Threads only change the conversion, not the ~10 s of start-up that would drown them.
        best = max(sweep, key=lambda s: s["images_per_s_excl_startup"])["threads"]
    runners = {}  # name → (run, resize backend of its bound)
    for b in a.resize_backends:
        out = scratch / ("ms_out" if b == "pillow" else f"ms_out_{b}")
        runners["make-shards" if b == "pillow" else f"make-shards ({b})"] = (
            functools.partial(run_make_shards, lists[0], out, a.count, a, spp, b), b)
    runners["img2dataset"] = (functools.partial(run_img2dataset, lists[1], scratch / "i2d_out", a.count, a, spp,
                                                best), "pillow")
    for w in a.peers:
        runners[w] = (functools.partial(run_peer, w, lists[0], scratch / f"{w}_out", a.count, a), "pillow")
    runs: dict[str, list[dict]] = {k: [] for k in runners}
    load = {"before": os.getloadavg()}  # other users of the machine show here
    for rep in range(a.repeats):
        # Alternate the order so drift (noisy neighbours, heat) hits every tool alike.
        for name in list(runners) if rep % 2 == 0 else list(runners)[::-1]:
            log(f"repeat {rep + 1}/{a.repeats}: {name}, {a.count} images, {a.workers} workers")
            runs[name].append(runners[name][0]())
            runs[name][-1]["load1"] = os.getloadavg()[0]
            log(f"  {runs[name][-1]['wall_s']:.2f} s (1-minute load {runs[name][-1]['load1']:.1f})")
    load["after"] = os.getloadavg()
    bounds = {}
    for b in dict.fromkeys(["pillow", *a.resize_backends]):
        log(f"{b} bound on the same {a.count} images")
        bounds[b] = image_bound(pairs, ImagePolicy(a.resize, a.quality, resize_backend=b))
    tools = {k: summarize(v, a.count) for k, v in runs.items()}
    for k, r in tools.items():
        r["ratio_to_img2dataset"] = round(r["images_per_s"] / tools["img2dataset"]["images_per_s"], 3)
        r["ratio_to_img2dataset_excl_startup"] = round(
            r["images_per_s_excl_startup"] / tools["img2dataset"]["images_per_s_excl_startup"], 3)
        r["fraction_of_bound"] = round(r["images_per_s"] / (bounds[runners[k][1]]["images_per_cpu_s"]
                                                           * a.workers), 3)
    check = quality_check([s for _, s in pairs], a.resize, a.quality, a.quality_check) if a.quality_check else None
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "config": {"photos": a.photos, "count": a.count, "distinct_images": len(set(s for _, s in pairs)),
                       "resize": a.resize, "quality": a.quality, "workers": a.workers,
                       "samples_per_shard": spp, "repeats": a.repeats,
                       "images": [str(d) for d in a.images]},
            "load_average": load,
            "thread_sweep": sweep, "img2dataset_threads": best, "tools": tools, "bounds": bounds,
            "bound": bounds["pillow"], "quality_check": check,
            "ratio": tools["make-shards"]["ratio_to_img2dataset"] if "make-shards" in tools else None}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.count, a.repeats = min(a.count, 200), 1
        a.large_count, a.large_distinct = min(a.large_count, 40), min(a.large_distinct, 12)
    a.resize_backends = [b.strip() for b in a.resize_backends.split(",") if b.strip()]
    a.peers = [] if a.peers == "none" else [w.strip() for w in a.peers.split(",") if w.strip()]
    if bad := [b for b in a.resize_backends if b not in RESIZE_BACKENDS] + [w for w in a.peers if w not in PEERS]:
        print(f"bench-convert: error: unknown resize backend or peer {bad}; backends: "
              f"{', '.join(RESIZE_BACKENDS)}; peers: {', '.join(PEERS)} or none", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # Scratch beside the results: inputs and both tools' outputs on one disk.
    scratch = a.scratch or Path(tempfile.mkdtemp(prefix="bench_convert_", dir=a.out.parent))
    names = PHOTO_SETS[a.photos]
    try:
        # One set: its files straight in scratch, as before the option; both: a subfolder each.
        res = {n: measure(photo_set(a, n), scratch / n if len(names) > 1 else scratch) for n in names}
    except BenchError as e:
        print(f"bench-convert: error: {e}", file=sys.stderr)
        return 1
    finally:
        if a.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    a.out.write_text(json.dumps(res if len(names) > 1 else res[names[0]], indent=1) + "\n")
    print("\n\n".join((f"## {n} photos\n\n" if len(names) > 1 else "") + table(r) for n, r in res.items())
          + f"\nraw timings → {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
