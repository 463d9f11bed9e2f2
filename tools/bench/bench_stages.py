"""Where the DALI path's time goes (`bench-loader --stages`): CPU per image of each stage and
the cost of an epoch boundary, each beside DALI's own reader measured in the same run.

Stages, CPU µs per image (all threads of the process; page cache warm):
- plan: the epoch's permutation and rank slice (`EpochPlan.batches`);
- read: `ShardSet.read_batch`, what the external source's workers do per batch (offsets →
  image bytes copied out of the memory-mapped shard, tokens chosen, one text array);
- host: the whole host side with decoding and augmentation removed, on one core (`host_rate`:
  plan, reads, tokens, the hand-off to DALI, the Batch's keys and ids), as samples per CPU-second:
  the ceiling a GPU run meets once nvJPEG decodes;
- graph: DALI's decode + augmentation alone, fed the same encoded batches from memory;
- loader: `build_loader(backend="dali")` end to end, its worker processes included;
- native: DALI's own reader + the same graph (`dali-native`), the bound.
Epoch boundary: the wait for the first batch of an epoch minus the median wait for a batch,
for our loader (second epoch on) and for DALI's reader.
"""
from __future__ import annotations

import collections
import resource
import statistics
import time
from argparse import Namespace

import numpy as np

from pipelines.loader import LoaderConfig, build_loader
from pipelines.schema import CONTEXT_LENGTH
from pipelines.sampling import EpochPlan
from pipelines.shardset import ShardSet
from pipelines.transforms import AugmentSpec


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def graph_cpu(args: Namespace, held: list[list], images: int) -> float:
    """CPU µs per image of the decode + augment graph alone, fed encoded batches from memory."""
    from nvidia.dali import fn, pipeline_def

    from pipelines.dali import augment_graph

    def source(info):
        return held[info.iteration % len(held)]

    @pipeline_def(batch_size=args.batch_size, num_threads=max(1, args.workers), device_id=None, seed=0,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        jpegs = fn.external_source(source, batch=True, batch_info=True)
        return augment_graph(jpegs, AugmentSpec(size=args.image_size, train=True), "cpu", 0.0)

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


def host_rate(args: Namespace, shards, fmt: str, seconds: float = 3.0) -> dict:
    """The host side of one rank with decoding and augmentation removed, on one core: plan, index,
    reads, tokens, the Batch's keys and ids, and the hand-off to DALI (an external source, no
    decode: DALI copies the encoded bytes and the text into its buffers and hands them out).
    What a GPU run meets once nvJPEG takes the decode. `shards`: a folder or a list of sources.
    Samples per CPU-second of this process (one thread: DALI's too) and per wall-second."""
    import torch
    from nvidia.dali import fn, pipeline_def, types

    cfg = LoaderConfig(shards=shards, format=fmt, backend="dali", device="cpu", batch_size=args.batch_size,
                       image_size=args.image_size, workers=1)
    loader = build_loader(cfg)  # its plan and shard set; DALI's backend starts nothing until iterated
    shardset, plan = loader.shardset, loader.plan()
    torch.set_num_threads(1)
    state = {"b": 0, "epoch": plan}
    planned: collections.deque = collections.deque()  # ids handed to DALI, for the Batch's keys and ids

    def batch_ids():
        p = state["epoch"]
        if state["b"] >= p.num_batches:
            state["epoch"], state["b"] = loader.plan(p.epoch + 1), 0
            p = state["epoch"]
        ids = p.batch(state["b"])
        state["b"] += 1
        return p.epoch, ids

    def source(info):
        epoch, ids = batch_ids()
        planned.append(ids)
        return shardset.read_batch(ids, cfg.seed, epoch)

    @pipeline_def(batch_size=args.batch_size, num_threads=1, device_id=None, seed=0, prefetch_queue_depth=1,
                  exec_dynamic=True)
    def pipe():
        jpegs, text = fn.external_source(source, num_outputs=2, batch=True, batch_info=True,
                                         dtype=[types.UINT8, types.INT32])
        return jpegs, text

    p = pipe()
    p.build()
    p.run()
    n, cpu, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        jpegs, text = p.run()
        text = torch.from_numpy(np.asarray(text.as_tensor()))
        ids = planned.popleft()
        keys, raw, syn = shardset.keys(ids), text[:, :CONTEXT_LENGTH].long(), text[:, CONTEXT_LENGTH:-1].long()
        sources = torch.from_numpy(shardset.source_of(ids)) if hasattr(shardset, "source_of") else None
        n += len(jpegs)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - t0
    del p
    loader.close()
    return {"host_per_cpu_s": n / cpu, "host_per_s": n / wall}


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
    row.update(host_rate(args, folder, fmt))
    row["graph_us"] = graph_cpu(args, held, 2 * n)

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
    lines = ["| format | samples | plan | read | host side, no decode (samples per CPU-s) | graph | "
             "loader (all processes) | native (bound) | "
             "loader / native CPU | first batch: loader / native | epoch boundary: loader / native |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        native = r.get("native_us")
        lines.append(
            f"| {r['format']} | {r['samples']:,} | {r['plan_us']:.2f} µs | {r['read_us']:.1f} µs | "
            f"{r['host_per_cpu_s']:,.0f} | "
            f"{r['graph_us']:,.0f} µs | {r['loader_us']:,.0f} µs | {f(native, ',.0f')} µs | "
            f"{f(native and r['loader_us'] / native, '.2f')} | {r['loader_first_batch_s']:.2f} s / "
            f"{f(r.get('native_first_batch_s'), '.2f')} s | {r['loader_boundary_ms']:+.0f} ms / "
            f"{f(r.get('native_boundary_ms'), '+.0f')} ms |")
    return "\n".join(lines)
