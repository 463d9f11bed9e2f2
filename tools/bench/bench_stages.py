"""Where the DALI path's time goes (`bench-loader --stages`): CPU per image of each stage and
the cost of an epoch boundary, each beside DALI's own reader measured in the same run.

Stages, CPU µs per image (all threads of the process; page cache warm):
- plan: the epoch's permutation and rank slice (`EpochPlan.batches`);
- read: `ShardSet.read_batch`, what the external source's workers do per batch (offsets →
  image bytes copied out of the memory-mapped shard, tokens chosen, one text array);
- draws: what the workers add for training, the image sizes from the headers and the crop
  windows and flips of (seed, epoch, id) (`pipelines.backends.dali.host_draws`); `header` is its first part;
- host: the whole host side with decoding and augmentation removed, on one core (`host_rate`:
  plan, reads, tokens, draws, the hand-off to DALI, the Batch's keys and ids), as samples per
  CPU-second: the ceiling a GPU run meets once nvJPEG decodes;
- graph: DALI's decode + augmentation alone, fed the same encoded batches and draws from memory;
- loader: `build_loader(backend="dali")` end to end, its worker processes included;
- native: DALI's own reader + the same graph (`dali-native`), the bound.
Epoch boundary: the wait for the first batch of an epoch minus the median wait for a batch,
for our loader (second epoch on) and for DALI's reader.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import time
from argparse import Namespace

import numpy as np

from pipelines.loader import LoaderConfig, build_loader
from pipelines.schema import CONTEXT_LENGTH
from pipelines.plan.epoch_plan import EpochPlan
from pipelines.shardset import ShardSet
from pipelines.augment.transforms import AugmentSpec
from tools.convert.reaper import descendants, process_table, stat_fields


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def graph_cpu(args: Namespace, held: list[tuple], images: int) -> float:
    """CPU µs per image of the decode + augment graph alone, fed encoded batches (and their
    windows and flips) from memory."""
    from nvidia.dali import fn, pipeline_def

    from pipelines.backends.dali import augment_graph

    def source(info):
        return held[info.iteration % len(held)]

    @pipeline_def(batch_size=args.batch_size, num_threads=max(1, args.workers), device_id=None, seed=0,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        jpegs, anchors, shapes, mirror = fn.external_source(source, num_outputs=4, batch=True, batch_info=True)
        return augment_graph(jpegs, AugmentSpec(size=args.image_size, train=True), "cpu", 0.0,
                             anchors, shapes, mirror)

    p = pipe()
    p.build()
    p.run()  # warm-up
    t, n = cpu_seconds(), 0
    while n < images:
        (out,) = p.run()
        n += len(out)
    used = cpu_seconds() - t
    del p
    return used / n * 1e6


def host_rate(args: Namespace, shards, fmt: str, seconds: float = 3.0, depth: int | None = None,
              workers: int = 0) -> dict:
    """The host side of one rank with decoding and augmentation removed, on one core: the DALI
    backend's own source (`PlanSource`: plan, index, reads, tokens, header sizes, crop windows and
    flips), the hand-off to DALI (an external source and no decode: DALI copies what the source gives
    into its buffers and hands it out) and the Batch's keys, ids and sources. What a GPU run meets
    once nvJPEG takes the decode. `shards`: a folder or a list of sources; `depth`: DALI's prefetch
    queue (default the loader's, `PREFETCH`). Samples per CPU-second of this process (one thread:
    DALI's too) and per wall-second. `workers` > 0: the source in that many DALI worker processes
    (forked), as the GPU graph runs it; per CPU-second of all processes and of this one alone."""
    import torch
    from nvidia.dali import fn, pipeline_def

    from pipelines.backends.dali import PREFETCH, PlanSource

    cfg = LoaderConfig(shards=shards, format=fmt, backend="dali", device="cpu", batch_size=args.batch_size,
                       image_size=args.image_size, workers=1)
    loader = build_loader(cfg)  # its plan and shard set; DALI's backend starts nothing until iterated
    shardset = loader.shardset
    source = PlanSource(shardset, loader.plan(), 0, cfg.seed, loader.bad, cfg.augment(), in_process=not workers)
    torch.set_num_threads(1)
    depth = PREFETCH if depth is None else depth
    feed = {"parallel": True} if workers else {"no_copy": False}
    pool = {"py_num_workers": workers, "py_start_method": "fork"} if workers else {}

    # The loader's queue depth: DALI's executor costs more per sample at depth 1 (~25 against ~19 µs a
    # sample with the loader's five outputs), so a shallower queue understates what the host sustains.
    @pipeline_def(batch_size=args.batch_size, num_threads=1, device_id=None, seed=0, prefetch_queue_depth=depth,
                  exec_dynamic=True, **pool)
    def pipe():
        return tuple(fn.external_source(source, num_outputs=5, batch=True, batch_info=True, **feed))

    p = pipe()
    p.build()
    p.run()
    n, i, t0 = 0, 1, time.perf_counter()
    cpu, tree = time.process_time(), _tree_cpu()
    while time.perf_counter() - t0 < seconds:
        jpegs, text, *_ = p.run()
        text = torch.from_numpy(np.asarray(text.as_tensor()))
        _, ids = source.planned(i)
        keys, raw, syn = shardset.keys(ids), text[:, :CONTEXT_LENGTH].long(), text[:, CONTEXT_LENGTH:-1].long()
        sources = torch.from_numpy(shardset.source_of(ids)) if hasattr(shardset, "source_of") else None
        n, i = n + len(jpegs), i + 1
    cpu, wall, tree = time.process_time() - cpu, time.perf_counter() - t0, _tree_cpu() - tree
    del p
    loader.close()
    if workers:
        return {"host_per_cpu_s": n / tree, "host_per_s": n / wall, "main_per_cpu_s": n / cpu}
    return {"host_per_cpu_s": n / cpu, "host_per_s": n / wall}


def _tree_cpu() -> float:
    """CPU seconds of this process and of the processes below it alive now (DALI's workers)."""
    me, total = os.getpid(), time.process_time()
    for pid in descendants(process_table(), {me}, set()) - {me}:
        if (fields := stat_fields(pid)) is not None:  # utime + stime, in clock ticks
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def mix_folders(args: Namespace, fmt: str) -> list[str]:
    """`--mix`'s folders of this format (each DIR/fmt), or [] when one of them has none."""
    found = [os.path.join(d, fmt) for d in args.mix or []]
    return found if found and all(os.path.isdir(f) for f in found) else []


def host_only(args: Namespace, formats: list[str], folders: dict[str, str], machine: dict) -> int:
    """`--host`: the host side's samples per CPU-second, per format and over `--mix`, median of repeats."""
    rows = []
    for fmt in formats:
        cases = [(folders[fmt], "one folder")]
        if mix_folders(args, fmt):
            cases.append((mix_folders(args, fmt), f"mix of {len(args.mix)}"))
        for shards, label in cases:
            runs = [host_rate(args, shards, fmt, args.seconds) for _ in range(args.repeats)]
            rows.append({"format": fmt, "data": label, "per_cpu_s": statistics.median(r["host_per_cpu_s"] for r in runs),
                         "per_s": statistics.median(r["host_per_s"] for r in runs)})
            print(f"[bench-loader] host {fmt} {label}: {rows[-1]['per_cpu_s']:,.0f} samples per CPU-second")
            if args.host_workers:
                runs = [host_rate(args, shards, fmt, args.seconds, workers=args.host_workers)
                        for _ in range(args.repeats)]
                rows[-1].update({"workers_per_cpu_s": statistics.median(r["host_per_cpu_s"] for r in runs),
                                 "workers_main_per_cpu_s": statistics.median(r["main_per_cpu_s"] for r in runs)})
                print(f"[bench-loader] host {fmt} {label}, source in {args.host_workers} worker(s): "
                      f"{rows[-1]['workers_per_cpu_s']:,.0f} samples per CPU-second of all processes")
    extra = (f" source in {args.host_workers} DALI worker(s): per CPU-second of all processes | "
             "of the training process |") if args.host_workers else ""
    print(f"\n| format | data | host side: samples per CPU-second (one core) | samples per second |{extra}\n"
          f"|---|---|---:|---:|{'---:|---:|' if extra else ''}")
    for r in rows:
        more = f" {r['workers_per_cpu_s']:,.0f} | {r['workers_main_per_cpu_s']:,.0f} |" if extra else ""
        print(f"| {r['format']} | {r['data']} | {r['per_cpu_s']:,.0f} | {r['per_s']:,.0f} |{more}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "peer_locations"},
                       "host": rows}, f, indent=2, default=str)
    return 0


def timed_epochs(epochs, count: int) -> tuple[list[float], list[int]]:
    """Wall time waited for each batch over `count` epochs, and the index of each epoch's first."""
    waits, firsts = [], []
    for _ in range(count):
        firsts.append(len(waits))
        t = time.perf_counter()
        for _ in epochs():
            now = time.perf_counter()
            waits.append(now - t)
            t = now
    return waits, firsts


def boundary(waits: list[float], firsts: list[int]) -> float:
    """ms an epoch start costs beyond a steady batch (epochs after the first)."""
    steady = statistics.median(waits)
    return 1e3 * statistics.median(waits[f] - steady for f in firsts[1:])


def stages(args: Namespace, folder: str, fmt: str, native_opener) -> dict:
    from pipelines.backends.dali import header_sizes, host_draws

    shardset = ShardSet(folder, fmt)
    plan = EpochPlan(total=len(shardset), batch_size=args.batch_size)
    batches = plan.batches()
    n = sum(len(b) for b in batches)
    t = time.process_time()
    for e in range(3):
        EpochPlan(total=len(shardset), batch_size=args.batch_size, epoch=e).batches()
    row = {"format": fmt, "samples": len(shardset), "plan_us": (time.process_time() - t) / (3 * n) * 1e6}
    held = [shardset.read_batch(b, 0, 0)[0] for b in batches]  # also warms the page cache
    t = time.process_time()
    for b in batches:
        shardset.read_batch(b, 0, 0)
    row["read_us"] = (time.process_time() - t) / n * 1e6
    spec = AugmentSpec(size=args.image_size, train=True)
    t = time.process_time()
    for b, images in zip(batches, held):
        header_sizes(images, b)
    row["header_us"] = (time.process_time() - t) / n * 1e6
    t = time.process_time()
    draws = [host_draws(spec, 0, 0, b, images) for b, images in zip(batches, held)]
    row["draws_us"] = (time.process_time() - t) / n * 1e6
    row.update(host_rate(args, folder, fmt))
    row["graph_us"] = graph_cpu(args, [(images, *d) for images, d in zip(held, draws)], 2 * n)

    cfg = LoaderConfig(shards=folder, format=fmt, backend="dali", device="cpu", batch_size=args.batch_size,
                       image_size=args.image_size, workers=args.workers)
    t0 = time.perf_counter()
    loader = build_loader(cfg)
    epochs = lambda: iter(loader)  # noqa: E731
    next(epochs())  # the build and the first batch: reported apart, not in the CPU per image
    row["loader_first_batch_s"] = time.perf_counter() - t0
    start = cpu_seconds()
    waits, firsts = timed_epochs(epochs, 4)
    loader.close()  # its workers are reaped now, so their CPU counts
    row["loader_us"] = (cpu_seconds() - start) / (len(waits) * args.batch_size) * 1e6
    row["loader_boundary_ms"] = boundary(waits, firsts)
    if native_opener is not None:
        t0 = time.perf_counter()
        epochs, close = native_opener()
        next(epochs())
        row["native_first_batch_s"] = time.perf_counter() - t0
        start = cpu_seconds()
        waits, firsts = timed_epochs(epochs, 4)
        close()
        row["native_us"] = (cpu_seconds() - start) / (len(waits) * args.batch_size) * 1e6
        row["native_boundary_ms"] = boundary(waits, firsts)
    return row


def stages_table(rows: list[dict]) -> str:
    def f(v, spec):
        return "–" if v is None else format(v, spec)
    lines = ["| format | samples | plan | read | draws (header) | host side, no decode (samples per CPU-s) | graph | "
             "loader (all processes) | native (bound) | "
             "loader / native CPU | first batch: loader / native | epoch boundary: loader / native |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        native = r.get("native_us")
        lines.append(
            f"| {r['format']} | {r['samples']:,} | {r['plan_us']:.2f} µs | {r['read_us']:.1f} µs | "
            f"{r['draws_us']:.1f} µs ({r['header_us']:.1f} µs) | "
            f"{r['host_per_cpu_s']:,.0f} | "
            f"{r['graph_us']:,.0f} µs | {r['loader_us']:,.0f} µs | {f(native, ',.0f')} µs | "
            f"{f(native and r['loader_us'] / native, '.2f')} | {r['loader_first_batch_s']:.2f} s / "
            f"{f(r.get('native_first_batch_s'), '.2f')} s | {r['loader_boundary_ms']:+.0f} ms / "
            f"{f(r.get('native_boundary_ms'), '+.0f')} ms |")
    return "\n".join(lines)
