"""bench-train: training step time of `alip` against `clip-raw` on the same model and batches,
and the trainer's overhead against a bare forward/backward/step loop over the same batches;
`--compare tuning` (full vs LiT vs LilT vs ELIP adapters) and `--compare pruning` (ELIP token pruning vs none)
time the seed variants against full training, with peak memory; `--compare open-clip` runs lip-train
and open_clip's own trainer end to end on the same shards (tools/bench/bench_train_e2e.py).

    bench-train --model lip-tiny --image-size 64 --batch-size 64 --steps 30 [--device cpu|gpu] [--quick]
    bench-train --compare pruning --model ViT-B-16 --image-size 224 --batch-size 16 --steps 8 --warmup 3
    bench-train --compare open-clip --shards DIR/wds --batch-size 50 --workers 2 --warmup 20 --repeats 3

Peak memory: on the GPU `torch.cuda.max_memory_allocated`; on the CPU the process's peak resident
set (Linux VmHWM, reset before each run through /proc/self/clear_refs), which includes what the
process held before the run (the batches in memory): compare the variants with each other.

Batches come from memory (random images and tokens), so only model, loss and loop are timed.
Per-step time is the wall clock over steps (warmup, steps], from the trainer's own step
timestamps, so set-up and tear-down (model build, the last step's checkpoint, export) are excluded
from both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from pipelines.schema import Batch
from tools.bench.bench_train_e2e import BenchError, bare_step, compare_open_clip
from train.config import load_config
from train.losses import ClipLoss
from train.model import build_model
from train.trainer import autocast_for, seed_everything, train


# The seed variants against full training, same model and batches (clip-raw loss).
COMPARISONS = {
    "tuning": {"full": (), "lit": ("model.tuning=lit",), "lilt": ("model.tuning=lilt",),
               "elip": ("model.tuning=elip",)},
    "pruning": {"no pruning": (), "token pruning": ("model.token_pruning.enabled=true",)},
}


class MemoryLoader:
    """The `pipelines.loader.Loader` interface over batches held in memory, cycled through epochs of
    `per_epoch` batches (default: each batch once). The trainer checkpoints at every epoch's end: a
    timed window must hold no epoch end, or it times checkpoints (a 16-batch epoch put two in a
    30-step window: +11 % on lip-tiny) where the bare loop has none."""

    def __init__(self, batches: list[Batch], per_epoch: int | None = None):
        self.batches, self.epoch, self.batches_yielded = batches, 0, 0
        self.per_epoch = per_epoch or len(batches)

    @property
    def batches_per_epoch(self) -> int:
        return self.per_epoch

    epoch_batches = batches_per_epoch

    def __len__(self) -> int:  # batches left in this epoch
        return self.per_epoch - self.batches_yielded

    def __iter__(self):
        for i in range(self.batches_yielded, self.per_epoch):
            self.batches_yielded += 1
            yield self.batches[i % len(self.batches)]
        self.epoch, self.batches_yielded = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_yielded = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict, accum_steps: int = 1) -> None:
        self.epoch, self.batches_yielded = state["epoch"], state["batches_yielded"]


def make_batches(n: int, batch_size: int, image_size: int, device: torch.device) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        tokens = torch.randint(1, 49406, (2, batch_size, 77), generator=g)
        tokens[:, :, 0], tokens[:, :, 20], tokens[:, :, 21:] = 49406, 49407, 0
        out.append(Batch(torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
                         tokens[0].to(device), tokens[1].to(device),
                         torch.ones(batch_size, dtype=torch.bool, device=device),
                         [f"{i}-{j}" for j in range(batch_size)]))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set


def peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
        return int(kib) * 1024
    except (OSError, StopIteration):
        return None


def trainer_time(mode: str, args, batches, device: torch.device, extra: tuple[str, ...] = ()) -> tuple[float, int | None]:
    """(seconds per step over steps (warmup, steps], each window end a logged step (logging
    synchronizes), peak memory of the run). The run takes one step more: the checkpoint, export
    and log of its last step (tens of ms on lip-tiny) fall outside the window."""
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            "data.train_shards=memory", f"data.device={'gpu' if device.type == 'cuda' else 'cpu'}",
            f"data.batch_size={args.batch_size}", f"data.image_size={args.image_size}",
            f"model.name={args.model}", f"loss.mode={mode}", f"optim.max_steps={args.steps + 1}",
            "optim.epochs=1000", "optim.warmup_steps=1", f"optim.precision={args.precision}",
            f"run.out_dir={out}", "run.plots=false", "run.ckpt_every=1000000",
            f"run.log_every={args.warmup}", *args.overrides, *extra])
        reset_peak(device)
        times = train(cfg, loader=MemoryLoader(batches, per_epoch=args.steps + 1))["step_times"]
    return (times[args.steps - 1] - times[args.warmup - 1]) / (args.steps - args.warmup), peak_bytes(device)


def bare_time(args, batches, device: torch.device) -> float:
    """The reference: forward, CLIP loss, backward, clip, AdamW step, clamp; nothing else.
    Timed over the same window of steps as the trainer."""
    seed_everything(0)
    model = build_model(args.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))  # as the trainer
    loss_fn = ClipLoss()
    _, autocast = autocast_for(args.precision, device)
    for i in range(args.steps):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        b = batches[i % len(batches)]
        bare_step(model, opt, loss_fn, b.images, b.raw_tokens, autocast)
    sync(device)
    return (time.perf_counter() - start) / (args.steps - args.warmup)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lip-tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=10, help="steps excluded from the timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="seconds: 6 steps, 1 repeat")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer override for every run, e.g. --set model.token_pruning.layers=[1]")
    p.add_argument("--compare", choices=("modes", *COMPARISONS, "open-clip"), default="modes",
                   help="modes: alip vs clip vs a bare loop; tuning: full vs lit vs lilt vs elip; "
                        "pruning: token pruning (model.token_pruning defaults) vs none; open-clip: lip-train "
                        "(DALI and torch loaders) vs open_clip_train end to end, one epoch of --shards each")
    e2e = p.add_argument_group("--compare open-clip")
    e2e.add_argument("--shards", help="a make-shards wds folder made with --tokenize")
    e2e.add_argument("--workers", type=int, default=2, help="loader workers of each tool")
    e2e.add_argument("--loss-mode", default="clip-raw", help="lip-train's loss.mode (open_clip trains CLIP)")
    e2e.add_argument("--log-every", type=int, default=10, help="steps per log line, both tools")
    e2e.add_argument("--bare", action="store_true",
                     help="add a bare loop (forward, loss, backward, AdamW) over lip-train's default loader")
    e2e.add_argument("--peer-threads", type=int, default=0, metavar="N",
                     help="add open_clip_train with OMP_NUM_THREADS=N: its figure under a thread count "
                          "like the one lip-train picks on a CPU (run.threads)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 6, 2, 1
        args.log_every = 1 if args.compare == "open-clip" else args.log_every
    if not 0 < args.warmup < args.steps:
        p.error("need 0 < --warmup < --steps")
    if args.compare == "open-clip":
        try:
            return write_report(args, compare_open_clip(args))
        except BenchError as e:
            print(f"bench-train: {e}", file=sys.stderr)
            return 2
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    batches = make_batches(min(args.steps, 16), args.batch_size, args.image_size, device)
    if args.compare == "modes":
        runs = {"bare loop (clip-raw)": lambda: (bare_time(args, batches, device), None),
                **{f"trainer {m}": (lambda m=m: trainer_time(m, args, batches, device))
                   for m in ("clip-raw", "clip-both", "alip")}}
    else:
        runs = {name: (lambda extra=extra: trainer_time("clip-raw", args, batches, device, extra))
                for name, extra in COMPARISONS[args.compare].items()}
    results = {k: [] for k in runs}
    peaks = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.repeats):
        # interleaved, the order rotating by one per repeat: drift in machine load hits every loop
        # alike, and no loop always runs last in a repeat
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = runs[name]
            print(f"bench-train: repeat {r + 1}/{args.repeats}: {name} ...", file=sys.stderr, flush=True)
            seconds, peak = fn()
            results[name].append(seconds)
            peaks[name].append(peak)
    med = {k: statistics.median(v) for k, v in results.items()}
    peak = {k: max(v) if None not in v else None for k, v in peaks.items()}
    report = {
        "compare": args.compare, "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "seconds_per_step": results, "median_seconds_per_step": med,
        "peak_bytes": peak,
    }
    first = next(iter(med))
    print(f"\n| loop | ms/step (median of {args.repeats}) | × {first} | peak memory MiB |\n|---|---:|---:|---:|")
    for k, v in med.items():
        mib = "–" if peak[k] is None else f"{peak[k] / 2**20:.0f}"
        print(f"| {k} | {1000 * v:.1f} | {v / med[first]:.2f} | {mib} |")
    if args.compare == "modes":
        report["alip_over_clip"] = med["trainer alip"] / med["trainer clip-raw"]
        report["trainer_overhead"] = med["trainer clip-raw"] / med["bare loop (clip-raw)"] - 1
        print(f"\nALIP / CLIP step time: {report['alip_over_clip']:.3f}× (target ≤ 1.35×)")
        print(f"trainer overhead vs bare loop: {100 * report['trainer_overhead']:+.1f} % (target ≤ 3 %)")
    return write_report(args, report)


def write_report(args, report: dict) -> int:
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
