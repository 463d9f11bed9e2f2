"""Shuffle quality against read locality: `shuffle="global"` beside `"block"` at several block sizes.

    python -m tools.bench.bench_shuffle                       # the default cases, JSON + Markdown in bench_out/shuffle
    python -m tools.bench.bench_shuffle --samples 50000 --shard-size 500 --batch-size 64 --world 2
    python -m tools.bench.bench_shuffle --shards shards/demo/train/wds --batch-size 32 --world 2

Only the epoch plan runs (no data is read), so the figures are exact for the plan and cheap.
Per mode, over one epoch (every rank, `drop_last`):
- shards / batch / rank: distinct shards in one rank's batch (what one step of one rank opens);
- shards / window: distinct shards in a rank's `--window` consecutive batches;
- shards / step: distinct shards in one step of all ranks together (a node's or the job's view);
- same-shard pairs: the share of sample pairs in a rank's batch that come from one shard (the
  batch's contrastive negatives from the same source; ≈ 1 / shards under global);
- top shard: the largest share of a rank's batch from a single shard;
- neighbour distance: mean |source position difference| of consecutive samples a rank yields,
  divided by the sample count (storage order; ≈ 1/3 for a uniform permutation);
- shard lifetime: steps from a shard's first read to its last (when its samples are all
  consumed), mean, and as a share of the epoch;
- open shards: shards started but not finished at a step, max over the epoch: what a cache
  must hold to read every shard once.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from pipelines.formats.registry import FORMATS
from pipelines.plan.epoch_plan import EpochPlan

# (name, samples, shard size, batch per rank, world size): a 1M-sample web set on one 8-GPU node,
# and a COCO-sized fine-tune (118,287 train images, last shard partial) on 2 GPUs.
CASES = (("1M/8 ranks", 1_000_000, 1000, 256, 8), ("COCO/2 ranks", 118_287, 1000, 128, 2))


def shard_sizes(samples: int, shard_size: int) -> list[int]:
    full, rest = divmod(samples, shard_size)
    return [shard_size] * full + ([rest] if rest else [])


def distinct_per_row(shards: np.ndarray) -> np.ndarray:
    """Distinct values in each row of an int array [rows, n]."""
    s = np.sort(shards, axis=1)
    return (np.diff(s, axis=1) != 0).sum(axis=1) + 1


def batch_mixing(shards: np.ndarray, n_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(same-shard pair share, top shard share) of each row of [batches, B] shard numbers."""
    rows, width = shards.shape
    key = np.arange(rows)[:, None] * n_shards + shards
    uniq, counts = np.unique(key, return_counts=True)
    row = uniq // n_shards
    pairs = np.bincount(row, weights=counts * (counts - 1.0), minlength=rows) / max(1, width * (width - 1))
    top = np.zeros(rows)
    np.maximum.at(top, row, counts / width)
    return pairs, top


def measure(sizes: Sequence[int], batch: int, world: int, shuffle: str, block: int, window: int,
            seed: int = 0, epoch: int = 0) -> dict:
    total = sum(sizes)
    plans = [EpochPlan(total, batch, seed=seed, epoch=epoch, rank=r, world_size=world, shuffle=shuffle,
                       block_shards=block, shard_sizes=sizes) for r in range(world)]
    t = time.perf_counter()
    order = plans[0].order()
    order_ms = (time.perf_counter() - t) * 1e3
    steps = plans[0].num_batches
    per_rank = {k: [] for k in ("batch", "window", "pairs", "top", "neighbour")}
    for plan in plans:
        ids = plan.rank_ids().reshape(steps, batch)
        shards = plan.shards_of(ids)
        per_rank["batch"].append(distinct_per_row(shards).mean())
        w = steps // window * window
        if w:
            per_rank["window"].append(distinct_per_row(shards[:w].reshape(-1, window * batch)).mean())
        pairs, top = batch_mixing(shards, len(sizes))
        per_rank["pairs"].append(pairs.mean())
        per_rank["top"].append(top.mean())
        per_rank["neighbour"].append(np.abs(np.diff(ids.reshape(-1))).mean() / total)
    # The job's view: step j is positions [j·B·W, (j+1)·B·W) of the permutation on every rank.
    step_shards = plans[0].shards_of(order[: steps * batch * world].reshape(steps, batch * world))
    used = np.unique(step_shards)
    step_of = np.repeat(np.arange(steps), batch * world)
    first = np.full(len(sizes), steps)
    last = np.full(len(sizes), -1)
    np.minimum.at(first, step_shards.reshape(-1), step_of)
    np.maximum.at(last, step_shards.reshape(-1), step_of)
    life = last[used] - first[used] + 1
    change = np.zeros(steps + 1, np.int64)
    np.add.at(change, first[used], 1)
    np.add.at(change, last[used] + 1, -1)
    open_shards = np.cumsum(change)[:steps]
    return {"shuffle": shuffle if shuffle != "block" else f"block/{block}", "mode": shuffle,
            "block_shards": block if shuffle == "block" else None, "steps": steps,
            "shards_per_batch": float(np.mean(per_rank["batch"])),
            "shards_per_window": float(np.mean(per_rank["window"])) if per_rank["window"] else None,
            "shards_per_step": float(distinct_per_row(step_shards).mean()),
            "same_shard_pairs": float(np.mean(per_rank["pairs"])), "top_shard_share": float(np.mean(per_rank["top"])),
            "neighbour_distance": float(np.mean(per_rank["neighbour"])),
            "shard_lifetime_steps": float(life.mean()), "shard_lifetime_share": float(life.mean() / steps),
            "open_shards_max": int(open_shards.max()), "open_shards_mean": float(open_shards.mean()),
            "order_ms": order_ms}


def table(case: dict) -> str:
    w = case["window"]
    lines = [f"**{case['name']}**: {case['samples']:,} samples in {case['shards']:,} shards, batch "
             f"{case['batch_size']} × {case['world']} ranks, {case['rows'][0]['steps']:,} steps per epoch",
             "",
             f"| shuffle | shards / batch / rank | shards / {w} batches / rank | shards / step (all ranks) | "
             "same-shard pairs | top shard | neighbour distance | shard lifetime, steps (share) | "
             "open shards (max) | order ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in case["rows"]:
        window = "–" if r["shards_per_window"] is None else f"{r['shards_per_window']:.1f}"
        lines.append(f"| {r['shuffle']} | {r['shards_per_batch']:.1f} | {window} | {r['shards_per_step']:.1f} | "
                     f"{r['same_shard_pairs']:.4f} | {r['top_shard_share']:.3f} | {r['neighbour_distance']:.4f} | "
                     f"{r['shard_lifetime_steps']:.1f} ({r['shard_lifetime_share']:.1%}) | {r['open_shards_max']} | "
                     f"{r['order_ms']:.0f} |")
    return "\n".join(lines)


def machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "usable_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "numpy": np.__version__, "load_avg": os.getloadavg()[0]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench-shuffle", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", type=int, help="one case of this many samples instead of the default cases")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (with --samples)")
    p.add_argument("--shards", help="one case with the shard sizes of this format folder (local)")
    p.add_argument("--format", default="wds", choices=tuple(FORMATS), help="with --shards: its format")
    p.add_argument("--batch-size", type=int, default=256, help="per rank (with --samples or --shards)")
    p.add_argument("--world", type=int, default=8, help="ranks (with --samples or --shards)")
    p.add_argument("--blocks", default="1,2,4,8,16", help="comma-separated block sizes (shards) for block")
    p.add_argument("--window", type=int, default=8, help="batches per window of the shards/window figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/shuffle", help="folder for shuffle.json and shuffle.md")
    p.add_argument("--quick", action="store_true", help="one small case, blocks 1 and 4: for tests")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"bench-shuffle: --blocks {args.blocks!r}: give comma-separated integers, e.g. 1,4,16")
    if args.quick:
        cases, blocks, args.window = [("quick", shard_sizes(20_000, 500), 32, 4)], [1, 4], 4
    elif args.shards:
        from pipelines.shardset import ShardSet

        ends = ShardSet(args.shards, args.format).ends.tolist()
        sizes = [b - a for a, b in zip([0] + ends, ends)]
        cases = [(args.shards, sizes, args.batch_size, args.world)]
    elif args.samples:
        cases = [("custom", shard_sizes(args.samples, args.shard_size), args.batch_size, args.world)]
    else:
        cases = [(name, shard_sizes(n, size), b, w) for name, n, size, b, w in CASES]
    modes = [("global", 1)] + [("block", k) for k in blocks]
    results = []
    with tqdm(total=len(cases) * len(modes), desc="plans", unit="plan", file=sys.stderr) as bar:
        for name, sizes, batch, world in cases:
            rows = []
            for mode, k in modes:
                try:
                    rows.append(measure(sizes, batch, world, mode, k, args.window, seed=args.seed))
                except ValueError as e:
                    raise SystemExit(f"bench-shuffle: case {name}: {e}")
                bar.update()
            results.append({"name": name, "samples": sum(sizes), "shards": len(sizes), "batch_size": batch,
                            "world": world, "window": args.window, "rows": rows})
    info = machine()
    command = "python -m tools.bench.bench_shuffle " + " ".join(argv if argv is not None else sys.argv[1:])
    md = "\n\n".join(table(c) for c in results)
    print(f"\n{md}\n\n{info['cpu']}, {info['usable_cores']} cores")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shuffle.json"), "w") as f:
        json.dump({"command": command.strip(), "machine": info, "config": vars(args), "cases": results}, f, indent=1)
    with open(os.path.join(args.out, "shuffle.md"), "w") as f:
        f.write(f"`{command.strip()}` on {info['cpu']}, {info['usable_cores']} cores\n\n{md}\n")
    print(f"wrote {args.out}/shuffle.json and shuffle.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
