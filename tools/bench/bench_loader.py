"""bench-loader: training-loader images/s per backend, same shards, same cores, tokens delivered.

    bench-loader --shards bench_out/shards/real-1239 --format wds,arrow,rec \\
        --backends dali-cpu,torch,openclip,dali-native --batch-size 64 --workers 2 --seconds 20
    bench-loader --shards DIR --backends dali-cpu,torch --quick --out /tmp/loader.json

`dali-gpu` / `dali-cpu` / `torch` are `pipelines.loader.build_loader` as training uses it (epoch
plan, raw + synthetic tokens). `openclip` is open_clip's own `get_wds_dataset` (its webdataset
pipeline, WebLoader and per-sample `open_clip.tokenize` in the workers) with our torchvision
transform: a baseline nobody can call weak. `dali-native` is DALI's own reader feeding the same
augment graph, no tokens: the bound for our plan + external-source layer. Each repeat builds its
loader afresh, warms up (excluded), then counts images over `--seconds`, crossing epochs.
`mosaic` / `litdata` are Mosaic Streaming's StreamingDataset + StreamingDataLoader and LitData's
StreamingDataset + StreamingDataLoader over the wds shards exported once into MDS / LitData
chunks (tools/bench/bench_peers.py), with the torch baseline's decode + augmentation and the caption
tokenized in the workers. `--resume-check` stops each loader mid-epoch, restores a fresh one from
its state_dict and says whether the epoch's keys came out exactly as uninterrupted. `--s3`
serves every dataset from a loopback S3 server (moto) instead of the local disk.
`--mix A,B` adds dali-cpu / torch rows over folders A and B as one mixture of sources: with A and B
holding --shards' samples between them, the ratio to the one-folder row is what mixing costs.
`--stages` adds, per format, the DALI path's CPU per image by stage, its first batch and the cost
of an epoch boundary beside DALI's reader (`tools/bench/bench_stages.py`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Iterator, Sequence

import torch

from pipelines.formats.registry import FORMATS
from pipelines.loader import LoaderConfig, build_loader
from pipelines.loader_settings import dali_unavailable
from pipelines.schema import CONTEXT_LENGTH
from pipelines.shardset import ShardSet
from pipelines.augment.transforms import AugmentSpec
from tools.bench.bench_stages import mix_folders

BACKENDS = ("dali-gpu", "dali-cpu", "torch", "openclip", "dali-native", "mosaic", "litdata")
PEERS = ("mosaic", "litdata")
WARMUP_BATCHES = 2
WARMUP_FRACTION = 0.1
PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda120", "webdataset", "open_clip_torch", "pillow", "numpy",
            "mosaicml-streaming", "litdata", "moto")

# Each call yields the next epoch's batch sizes: the timer sees epoch boundaries as training does.
Epochs = Callable[[], Iterator[int]]


class BenchError(RuntimeError):
    """A backend that cannot run here or delivered the wrong thing: its figure must not count."""


@dataclass
class Result:
    backend: str
    format: str
    label: str
    rates: list[float] = field(default_factory=list)  # images/s per repeat
    first_batch_s: list[float] = field(default_factory=list)  # build → first batch, per repeat
    load_avg: list[float] = field(default_factory=list)  # 1-min load average after each repeat
    hw_decoder_load: float | None = None
    tokens: str = "raw + syn"  # which token tensors each batch carried
    ratio_torch: float | None = None
    ratio_openclip: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def log(msg: str) -> None:
    print(f"[bench-loader] {msg}", flush=True)


def _check_tokens(raw: torch.Tensor, n: int) -> None:
    if tuple(raw.shape) != (n, CONTEXT_LENGTH):
        raise BenchError(f"batch of {n} came with tokens of shape {tuple(raw.shape)}, not ({n}, 77)")


def our_config(args: Namespace, folder: str | list, fmt: str, backend: str, device: str, hw_load: float) -> LoaderConfig:
    remote = any(str(f).startswith("s3://") for f in (folder if isinstance(folder, list) else [folder]))
    cache = {"cache_dir": os.path.join(args.peers_dir, "cache", "ours")} if remote else {}
    return LoaderConfig(shards=folder, format=fmt, backend=backend, device=device, split="train",
                        batch_size=args.batch_size, image_size=args.image_size, workers=args.workers,
                        hw_decoder_load=hw_load, **cache)


def ours(args: Namespace, folder: str, fmt: str, backend: str, device: str,
         hw_load: float) -> tuple[Epochs, Callable[[], None]]:
    loader = build_loader(our_config(args, folder, fmt, backend, device, hw_load))

    def epoch() -> Iterator[int]:
        for batch in loader:
            _check_tokens(batch.raw_tokens, len(batch))
            _check_tokens(batch.syn_tokens, len(batch))
            yield len(batch)
    return epoch, loader.close


def openclip(args: Namespace, folder: str) -> tuple[Epochs, Callable[[], None]]:
    import open_clip  # slow imports (all models), paid only when this backend runs
    import open_clip_train.data as oc_data

    from pipelines.backends.torch_loader import torchvision_transform
    from tools.bench.open_clip_run import patch_tar_stage

    patch_tar_stage(oc_data)

    shardset = ShardSet(folder, "wds")
    tars = list(shardset.paths)
    if len(tars) < args.workers:
        raise BenchError(f"open_clip needs at least one shard per worker: {len(tars)} shards, "
                         f"{args.workers} workers (make-shards --samples-per-shard lower)")
    # The subset of open_clip's training arguments that get_wds_dataset reads ("::" joins shard lists).
    oc_args = Namespace(train_data="::".join(tars), train_num_samples=len(shardset),
                        dataset_resampled=False, train_data_upsampling_factors=None, seed=0,
                        batch_size=args.batch_size, world_size=1, workers=args.workers)
    transform = torchvision_transform(AugmentSpec(size=args.image_size, train=True))
    info = oc_data.get_wds_dataset(oc_args, transform, is_train=True, epoch=0, tokenizer=open_clip.tokenize)
    state = {"epoch": 0}

    def epoch() -> Iterator[int]:
        info.set_epoch(state["epoch"])  # what open_clip's train loop does before each epoch
        state["epoch"] += 1
        for images, texts in info.dataloader:
            _check_tokens(texts, len(images))
            yield len(images)

    def close() -> None:
        # Persistent workers live as long as the DataLoader's iterator: end them now, not at exit.
        if getattr(info.dataloader, "_iterator", None) is not None:
            info.dataloader._iterator._shutdown_workers()
    return epoch, close


def peer(args: Namespace, reader: str) -> tuple[Epochs, Callable[[], None]]:
    from tools.bench.bench_peers import open_peer, peer_epochs

    loader, close = open_peer(reader, args.peer_locations[reader], args.batch_size, args.workers,
                              args.image_size, cache=os.path.join(args.peers_dir, "cache", reader))
    return peer_epochs(loader), close


def resume_checks(args: Namespace, folder: str) -> list[dict]:
    """Exact mid-epoch resume of each loader asked for (wds), stopped after half an epoch."""
    from tools.bench.bench_peers import open_peer, resume_check

    stop = max(1, len(ShardSet(folder, "wds")) // args.batch_size // 2) if not folder.startswith("s3://") \
        else max(1, args.resume_stop)
    rows = []
    for backend in args.backends:
        if backend in PEERS:
            cache = os.path.join(args.peers_dir, "cache", f"resume-{backend}")

            def make(backend=backend, cache=cache):
                shutil.rmtree(cache, ignore_errors=True)  # each loader starts cold, as after a restart
                return open_peer(backend, args.peer_locations[backend], args.batch_size, args.workers,
                                 args.image_size, cache=cache)
            keys = lambda batch: batch[2]  # noqa: E731
        elif backend in ("torch", "dali-cpu"):
            def make(backend=backend):
                loader = build_loader(our_config(args, folder, "wds", "torch" if backend == "torch" else "dali",
                                                 "cpu", args.hw_decoder_load[0]))
                return loader, loader.close
            keys = lambda batch: batch.keys  # noqa: E731
        else:
            continue
        log(f"resume check: {backend}, stop after {stop} batches")
        rows.append({"backend": backend, "source": "s3" if folder.startswith("s3://") else "local",
                     "stop_after_batches": stop, **resume_check(make, keys, stop)})
        log(f"  {rows[-1]}")
    return rows


def native(args: Namespace, folder: str, fmt: str, device: str,
           hw_load: float) -> tuple[Epochs, Callable[[], None]]:
    from nvidia.dali import fn, pipeline_def

    from pipelines.backends.dali import augment_graph, to_torch  # the loader's own graph and output conversion

    shards = ShardSet(folder, fmt).paths
    if fmt == "wds":
        def reader():
            return fn.readers.webdataset(paths=list(shards), ext=["jpg;png;jpeg;webp"],
                                         index_paths=[p[:-len(".tar")] + ".idx" for p in shards],
                                         random_shuffle=True, name="Reader")
    elif fmt == "rec":
        index = os.path.join(folder, "all.idx")
        if not os.path.exists(index):
            raise BenchError(f"{index} missing: make-shards writes it for DALI's mxnet reader")

        def reader():
            return fn.readers.mxnet(path=list(shards), index_path=[index],
                                    random_shuffle=True, name="Reader")[0]
    else:
        raise BenchError(f"DALI has no reader for {fmt}")
    gpu = device == "gpu"

    @pipeline_def(batch_size=args.batch_size, num_threads=max(1, args.workers), seed=0,
                  device_id=torch.cuda.current_device() if gpu else None, prefetch_queue_depth=2,
                  exec_dynamic=True)
    def pipe():
        return augment_graph(reader(), AugmentSpec(size=args.image_size, train=True),
                             "mixed" if gpu else "cpu", hw_load)

    p = pipe()
    p.build()
    epoch_batches = -(-p.epoch_size("Reader") // args.batch_size)
    target = torch.device("cuda" if gpu else "cpu")

    def epoch() -> Iterator[int]:
        # The reader wraps around by itself; an epoch here is only a unit of iteration.
        for _ in range(epoch_batches):
            (images,) = p.run()
            yield to_torch(images, target).shape[0]
    return epoch, lambda: None


def measure(open_backend: Callable[[], tuple[Epochs, Callable[[], None]]], seconds: float,
            gpu: bool) -> tuple[float, float]:
    """(images/s over `seconds` after warm-up, seconds from build to first batch)."""
    def now() -> float:
        if gpu:
            torch.cuda.synchronize()  # GPU work is queued: count it done only when it is
        return time.perf_counter()

    t0 = now()
    epoch, close = open_backend()
    first = warm_end = t_start = None
    n = 0
    try:
        while True:
            it = epoch()
            try:
                for size in it:
                    t = now()
                    if first is None:
                        first, warm_end, batches = t - t0, t + WARMUP_FRACTION * seconds, 0
                    if t_start is None:
                        batches += 1
                        if batches >= WARMUP_BATCHES and t >= warm_end:
                            t_start = t  # images of batches that end after this count
                        continue
                    n += size
                    if t - t_start >= seconds:
                        return n / (t - t_start), first
            finally:
                it.close()  # a loader left mid-epoch ends its workers here, not at exit
            if first is None:
                raise BenchError("the loader yielded no batch: fewer samples than one batch?")
    finally:
        close()


def machine(packages: Sequence[str] = PACKAGES) -> dict:
    """CPU, cores, GPU, Python and the versions of `packages`: what every benchmark report names."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    versions = {pkg: installed.get(pkg.lower()) for pkg in packages}
    return {"cpu": cpu, "nproc": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def plan(args: Namespace, fmt: str, folder: str) -> list[tuple[Result, Callable, bool]]:
    """(result row, backend opener, on GPU) for every measurement of this format, in order."""
    runs = []
    for backend in args.backends:
        if backend == "dali-gpu":
            for load in args.hw_decoder_load:
                runs.append((Result(backend, fmt, f"dali-gpu (hw {load:g})", hw_decoder_load=load),
                             lambda load=load: ours(args, folder, fmt, "dali", "gpu", load), True))
        elif backend in ("dali-cpu", "torch"):
            runs.append((Result(backend, fmt, backend),
                         lambda b=backend: ours(args, folder, fmt, "torch" if b == "torch" else "dali",
                                                "cpu", args.hw_decoder_load[0]), False))
            if mix_folders(args, fmt):  # the same samples as several sources mixed 1:1 (pipelines/sources.py)
                sources = mix_folders(args, fmt)
                runs.append((Result(backend, fmt, f"{backend} (mix of {len(sources)})"),
                             lambda b=backend, s=sources: ours(args, s, fmt, "torch" if b == "torch" else "dali",
                                                               "cpu", args.hw_decoder_load[0]), False))
        elif backend in PEERS:
            runs.append((Result(backend, fmt, backend, tokens="raw"), lambda b=backend: peer(args, b), False))
        elif backend == "openclip":
            runs.append((Result(backend, fmt, backend, tokens="raw"), lambda: openclip(args, folder), False))
        else:
            gpu = args.native_device == "gpu"
            runs.append((Result(backend, fmt, f"dali-native ({args.native_device})", tokens="none",
                                hw_decoder_load=args.hw_decoder_load[0] if gpu else None),
                         lambda: native(args, folder, fmt, args.native_device, args.hw_decoder_load[0]),
                         gpu))
    if args.s3:
        for res, _, _ in runs:
            res.label += " (s3)"
    return runs


def skip_reason(backend: str, fmt: str, gpu: bool, s3: bool = False) -> str | None:
    if gpu and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if backend.startswith("dali") and (why := dali_unavailable()):  # the loader's own check, as auto uses
        return why
    if s3 and backend in ("openclip", "dali-native"):
        return "reads local files only (--s3)"
    if backend == "openclip" and fmt != "wds":
        return "open_clip's loader reads webdataset tars only"
    if backend in PEERS and fmt != "wds":
        return "its dataset is exported from the wds shards: measured on the wds row"
    if backend == "dali-native" and fmt == "arrow":
        return "DALI has no Arrow reader"
    return None


def table(results: list[Result]) -> str:
    def ratio(r: float | None) -> str:
        return "–" if r is None else f"{r:.2f}×"
    lines = ["| backend | format | images/s (median) | min – max | × torch | × openclip | first batch s | tokens |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.label} | {r.format} | {r.median:,.0f} | {min(r.rates):,.0f} – "
                     f"{max(r.rates):,.0f} | {ratio(r.ratio_torch)} | {ratio(r.ratio_openclip)} | "
                     f"{statistics.median(r.first_batch_s):.2f} | {r.tokens} |")
    return "\n".join(lines)


def resume_table(rows: list[dict]) -> str:
    lines = ["| loader | epoch samples | stopped after | resumed exactly | repeated | missing | note |",
             "|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['backend']}{' (s3)' if r.get('source') == 's3' else ''} | {r['epoch_samples']} | {r.get('before_stop', '–')} samples | "
                     f"{'yes' if r['exact'] else 'no'} | {r.get('repeated', '–')} | {r.get('missing', '–')} | "
                     f"{r.get('error', '')} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench-loader", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", required=True, help="make-shards --out folder (one subfolder per "
                   "format) or a single format folder")
    p.add_argument("--format", default="wds", help=f"comma-separated: {', '.join(FORMATS)}")
    p.add_argument("--backends", default="dali-gpu,dali-cpu,torch,openclip",
                   help=f"comma-separated: {', '.join(BACKENDS)}")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="DataLoader workers / DALI threads and Python workers")
    p.add_argument("--seconds", type=float, default=30.0, help="measured wall time per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hw-decoder-load", default="0.65", help="comma-separated sweep for dali-gpu")
    p.add_argument("--native-device", choices=("cpu", "gpu"), default="cpu", help="dali-native's device")
    p.add_argument("--out", help="JSON with every raw figure and the machine")
    p.add_argument("--stages", action="store_true", help="also measure CPU per image by stage and "
                   "the epoch boundary of the DALI path beside DALI's reader (tools/bench/bench_stages.py)")
    p.add_argument("--peers-dir", help="where mosaic/litdata datasets and caches go (default: a temporary folder)")
    p.add_argument("--resume-check", action="store_true", help="also check exact mid-epoch resume (wds) of "
                   "torch, dali-cpu, mosaic and litdata among --backends")
    p.add_argument("--resume-stop", type=int, default=2, help="--s3 resume check: batches before the stop")
    p.add_argument("--s3", action="store_true", help="serve the wds shards and the peers' datasets from a "
                   "loopback S3 server (moto) and read them through each loader's s3:// support")
    p.add_argument("--mix", type=lambda v: [d for d in v.split(",") if d], default=None,
                   help="comma-separated make-shards --out folders that hold --shards' samples between them: "
                   "dali-cpu and torch also run over them as one mixture (weights 1), beside the one folder")
    p.add_argument("--host", action="store_true", help="only the host side per format (and of --mix): "
                   "samples per CPU-second with decoding removed, on one core (tools/bench/bench_stages.py)")
    p.add_argument("--host-workers", type=int, default=0, metavar="N",
                   help="with --host: also the GPU graph's way, the source in N DALI worker processes "
                   "(samples per CPU-second of all processes, and of the training process alone)")
    p.add_argument("--quick", action="store_true", help="2 s, 1 repeat, batch 32, 64 px: for tests")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seconds, args.repeats, args.batch_size, args.image_size = 2.0, 1, 32, 64
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    args.hw_decoder_load = [float(x) for x in args.hw_decoder_load.split(",")]
    bad = [b for b in args.backends if b not in BACKENDS] + [f for f in formats if f not in FORMATS]
    if bad or args.repeats < 1 or args.seconds <= 0 or args.batch_size < 1:
        print(f"bench-loader: unknown backend/format {bad} or non-positive --repeats/--seconds/"
              f"--batch-size; backends: {', '.join(BACKENDS)}; formats: {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.peers_dir is None:
            args.peers_dir = tempfile.mkdtemp(prefix="bench_loader_peers_")
            stack.callback(shutil.rmtree, args.peers_dir, True)
        return run(args, formats, stack)


def run(args: Namespace, formats: list[str], stack) -> int:
    def local(fmt: str) -> str:
        sub = os.path.join(args.shards, fmt)
        return sub if os.path.isdir(sub) else args.shards
    folders = {fmt: local(fmt) for fmt in formats}
    args.peer_locations = {}
    if want := [b for b in args.backends if b in PEERS and "wds" in formats]:
        from tools.bench.bench_peers import export

        for reader in want:
            log(f"export the wds shards for {reader} (once; not timed)")
            args.peer_locations[reader] = export(folders["wds"], args.peers_dir, reader)
    if args.s3:
        from tools.bench.bench_peers import loopback_s3, upload

        stack.enter_context(loopback_s3())
        for fmt in formats:
            folders[fmt] = upload(folders[fmt], f"s3://bench/{fmt}")
        for reader, path in args.peer_locations.items():
            args.peer_locations[reader] = upload(path, f"s3://bench/{reader}")
        log(f"serving {', '.join([*folders.values(), *args.peer_locations.values()])} from {os.environ['AWS_ENDPOINT_URL']}")
    results: list[Result] = []
    skipped: list[dict] = []
    stage_rows: list[dict] = []
    resume_rows: list[dict] = []
    if args.host:
        from tools.bench.bench_stages import host_only

        return host_only(args, formats, folders, machine())
    for fmt in formats:
        folder = folders[fmt]
        if args.resume_check and fmt == "wds":
            resume_rows = resume_checks(args, folder)
        if args.stages:
            from tools.bench.bench_stages import stages

            native_opener = None if skip_reason("dali-native", fmt, False) else \
                (lambda: native(args, folder, fmt, "cpu", 0.0))
            stage_rows.append(stages(args, folder, fmt, native_opener))
            log(f"stages {fmt}: {stage_rows[-1]}")
        runs = []
        for res, opener, gpu in plan(args, fmt, folder):
            reason = skip_reason(res.backend, fmt, gpu, args.s3)
            if reason:
                log(f"skip {res.label} on {fmt}: {reason}")
                skipped.append({"backend": res.label, "format": fmt, "reason": reason})
            else:
                runs.append((res, opener, gpu))
        # Round robin, reversed every other repeat: a machine that speeds up or slows down over
        # the minutes of a run shifts every backend alike instead of biasing the ratios.
        for rep in range(args.repeats):
            for res, opener, gpu in runs if rep % 2 == 0 else runs[::-1]:
                rate, first = measure(opener, args.seconds, gpu)
                res.rates.append(rate)
                res.first_batch_s.append(first)
                res.load_avg.append(os.getloadavg()[0])
                log(f"{res.label} {fmt} repeat {rep + 1}/{args.repeats}: {rate:,.1f} images/s "
                    f"(first batch after {first:.1f} s, load {res.load_avg[-1]:.2f})")
        done = [res for res, _, _ in runs]
        base = {r.backend: r.median for r in done if r.backend in ("torch", "openclip")}
        for r in done:
            r.ratio_torch = r.median / base["torch"] if "torch" in base else None
            r.ratio_openclip = r.median / base["openclip"] if "openclip" in base else None
        results += done
    info = machine()
    print(f"\n{info['cpu']}, {info['usable_cores']} cores, GPU: {info['gpu'] or 'none'}; batch "
          f"{args.batch_size}, {args.image_size} px, {args.workers} workers, {args.seconds:g} s x "
          f"{args.repeats}\n")
    print(table(results) if results else "(nothing measured)")
    if stage_rows:
        from tools.bench.bench_stages import stages_table

        print("\nCPU per image by stage, first batch and epoch boundary (dali-cpu):\n")
        print(stages_table(stage_rows))
    if resume_rows:
        print("\nMid-epoch resume (wds): stop, state_dict, fresh loader, load_state_dict, run to the end:\n")
        print(resume_table(resume_rows))
    for s in skipped:
        print(f"skipped {s['backend']} on {s['format']}: {s['reason']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("out", "peer_locations")}
        rows = [{**vars(r), "median": r.median, "min": min(r.rates), "max": max(r.rates)} for r in results]
        with open(args.out, "w") as f:
            json.dump({"machine": info, "config": config, "results": rows, "skipped": skipped,
                       "stages": stage_rows, "resume": resume_rows}, f, indent=1)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
