"""bench-train --compare open-clip: lip-train against open_clip's own trainer, end to end, on the
same wds shards, model, batch size and workers, each run a fresh subprocess as a user starts it.

    bench-train --compare open-clip [--bare] --shards bench_out/shards/f5k-500/wds --model lip-tiny \\
        --batch-size 50 --workers 2 --warmup 20 --repeats 3

Rows: `lip-train` (`python -m train.main`, its default loader: `data.backend=auto`, DALI where it
imports), `lip-train torch` (the same with `data.backend=torch`) and `open_clip_train`
(`python -m open_clip_train.main` through tools/bench/open_clip_run.py, which registers the
model's config from a temporary folder with open_clip's `add_model_config` and nothing else).
Each run trains one epoch over every sample of the shards (`--train-num-samples` for open_clip),
`--loss-mode` (default clip-raw: the objective open_clip trains) on the CPU in float32, with the
same optimizer settings (AdamW lr 5e-4, betas 0.9/0.98, eps 1e-6, weight decay 0.2, 10 warm-up
steps, gradient clip 1.0) and a log line every `--log-every` steps on both sides; each
tool keeps its other defaults (lip-train: fused AdamW, TensorBoard, plots, checkpoint and export
at the end; open_clip_train: its webdataset pipeline and shuffle buffers, a checkpoint per epoch).

Two figures per run:
- steady samples/s: samples over the steps after the first `--warmup`, divided by their time, from
  each tool's own log (lip-train: metrics.jsonl's per-line `time`; open_clip_train: the `Batch
  (t)` mean of each log window × its steps);
- wall seconds: launch to exit, start-up, first epoch's loader start and tear-down included.
Medians of `--repeats`; the order of the tools rotates by one per repeat, so load drift and
a warm page cache favour none of them.

`--bare` adds the row `bare loop (DALI)`: `python -m tools.bench.bench_train_e2e` in a subprocess,
lip-train's own default loader (`pipelines.build_loader`, same settings and seed) feeding a loop with
nothing but forward, CLIP loss, backward, clip, AdamW (the trainer's groups, fused) and the scale's
clamp, under the torch threads lip-train picks (train/cpu_threads.py): what the model and the loader
cost together on these cores, so lip-train's distance to it is all that the trainer adds (records,
checkpoints, export, plots, objective).

`--peer-threads N` adds the row `open_clip_train, OMP_NUM_THREADS=N`: open_clip's trainer under a
thread count like the one lip-train picks on a CPU, so what that choice alone buys is visible on its
side too (the plain row stays open_clip_train as it comes).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from importlib import util
from pathlib import Path

import torch

from tools.convert.reaper import reaped
from train.trainer import MAX_LOGIT_SCALE

REPO = Path(__file__).resolve().parents[2]  # the runs' working directory: `python -m train.main` is this tree's
TOOLS = ("lip-train", "lip-train torch", "open_clip_train")
BARE = "bare loop (DALI)"
PEER = "open_clip_train"
PACKAGES = ("torch", "open_clip_torch", "nvidia-dali-cuda120", "webdataset")
# AdamW and schedule settings both tools are given (lip-train's defaults, open_clip's ViT defaults)
LR, BETAS, EPS, WD, CLIP, LR_WARMUP = 5e-4, (0.9, 0.98), 1e-6, 0.2, 1.0, 10
OPEN_CLIP_LOG = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\s*\d+ .*?Batch \(t\): ([\d.]+)")


class BenchError(RuntimeError):
    """A run that failed or logged too little to measure: its figure must not count."""


def check(args: Namespace) -> None:
    if args.device != "cpu":
        raise BenchError("--compare open-clip runs on the CPU (--device cpu): the figures it is for are CPU ones")
    if not args.shards:
        raise BenchError("--compare open-clip needs --shards: a make-shards wds folder made with --tokenize")
    if util.find_spec("open_clip_train") is None:
        raise BenchError("open_clip_train is not installed: pip install '.[test]' (open_clip_torch's trainer)")


def lip_command(args: Namespace, out: str, name: str, backend: str | None) -> list[str]:
    return [sys.executable, "-m", "train.main", f"data.train_shards={args.shards}", "data.format=wds",
            "data.device=cpu", f"data.batch_size={args.batch_size}", f"data.workers={args.workers}",
            f"data.image_size={args.image_size}", f"model.name={args.model}", f"loss.mode={args.loss_mode}",
            "optim.precision=fp32", "optim.epochs=1", f"optim.warmup_steps={LR_WARMUP}", f"optim.lr={LR}",
            f"optim.betas=[{BETAS[0]}, {BETAS[1]}]", f"optim.eps={EPS}", f"optim.weight_decay={WD}",
            f"optim.clip_grad={CLIP}", f"run.out_dir={out}", f"run.name={name}", f"run.log_every={args.log_every}",
            *args.overrides, *([f"data.backend={backend}"] if backend else [])]


def open_clip_command(args: Namespace, out: str, name: str, config_dir: str, tars: list[str],
                      samples: int) -> list[str]:
    return [sys.executable, "-m", "tools.bench.open_clip_run", config_dir,
            "--train-data", "::".join(tars), "--train-num-samples", str(samples), "--dataset-type", "webdataset",
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--epochs", "1",
            "--model", args.model, "--device", "cpu", "--precision", "fp32", "--lr", str(LR),
            "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS), "--wd", str(WD),
            "--warmup", str(LR_WARMUP), "--grad-clip-norm", str(CLIP),
            "--log-every-n-steps", str(args.log_every), "--logs", out, "--name", name, "--seed", "0"]


def steady_rate(windows: list[tuple[int, int, float]], skip: int, batch_size: int) -> float:
    """windows: (first step, last step, seconds) per log window, steps 1-based → samples/s over
    the windows that start after step `skip`."""
    kept = [(last - first + 1, seconds) for first, last, seconds in windows if first > skip]
    if not kept or sum(s for _, s in kept) <= 0:
        raise BenchError(f"no log window starts after step {skip}: lower --warmup or --log-every, or "
                         "give shards with more samples")
    return sum(n for n, _ in kept) * batch_size / sum(s for _, s in kept)


def lip_windows(run_dir: str) -> list[tuple[int, int, float]]:
    """metrics.jsonl's training lines (those with a loss) → windows between consecutive lines."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    return [(a["step"] + 1, b["step"], b["time"] - a["time"]) for a, b in zip(rows, rows[1:])]


def open_clip_windows(log_text: str, batch_size: int) -> list[tuple[int, int, float]]:
    """open_clip_train's `Train Epoch: e [samples/total ...] ... Batch (t): mean` lines: each
    line's mean batch time covers the steps since the previous line."""
    out, last = [], 0
    for samples, mean in OPEN_CLIP_LOG.findall(log_text):
        step = int(samples) // batch_size
        out.append((last + 1, step, float(mean) * (step - last)))
        last = step
    return out


def peer_threads(args: Namespace) -> str:
    """`--peer-threads`' row: open_clip_train with torch's threads set by OMP_NUM_THREADS."""
    return f"{PEER}, OMP_NUM_THREADS={args.peer_threads}"


def timed(command: list[str], log_path: str, env: dict | None = None) -> float:
    """Run one tool to its exit → wall seconds; its stdout and stderr go to `log_path`."""
    start = time.perf_counter()
    with open(log_path, "w") as log, reaped():
        rc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise BenchError(f"{' '.join(command[:4])} ... exited with {rc}; its log {log_path} ends:\n{tail}")
    return wall


def run_tool(tool: str, args: Namespace, work: str, r: int, config_dir: str, tars: list[str],
             samples: int) -> tuple[float, float]:
    """(steady samples/s, wall seconds) of one run of `tool`."""
    name = "-".join((*re.findall(r"[\w.]+", tool), str(r)))  # a folder name: no spaces, commas or "="
    log_path = os.path.join(work, f"{name}.log")
    if tool == BARE:
        times = os.path.join(work, f"{name}.json")
        wall = timed([sys.executable, "-m", "tools.bench.bench_train_e2e", args.shards, str(args.batch_size),
                      str(args.workers), str(args.image_size), args.model, times], log_path)
        with open(times) as f:
            stamps = json.load(f)
        windows = [(step, step, stamps[step - 1] - stamps[step - 2]) for step in range(2, len(stamps) + 1)]
    elif tool.startswith(PEER):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.peer_threads)} if tool != PEER else None
        wall = timed(open_clip_command(args, work, name, config_dir, tars, samples), log_path, env)
        with open(log_path) as f:
            windows = open_clip_windows(f.read(), args.batch_size)
    else:
        wall = timed(lip_command(args, work, name, "torch" if tool.endswith("torch") else None), log_path)
        windows = lip_windows(os.path.join(work, name))
    shutil.rmtree(os.path.join(work, name), ignore_errors=True)  # checkpoints: the disk stays small
    return steady_rate(windows, args.warmup, args.batch_size), wall


def model_config_dir(model: str, work: str) -> str:
    """A folder holding the model's config for open_clip (ours: train/model_configs/<model>.json;
    open_clip's own need none)."""
    folder = os.path.join(work, "model_configs")
    os.makedirs(folder, exist_ok=True)
    from train.model import MODEL_CONFIGS

    ours = Path(MODEL_CONFIGS, f"{model}.json")
    if ours.is_file():
        shutil.copy(ours, folder)
    return folder


def compare_open_clip(args: Namespace) -> dict:
    """Run every tool `args.repeats` times (order rotating), print the table → the report."""
    from pipelines.shardset import ShardSet
    from tools.bench.bench_loader import machine

    check(args)
    shardset = ShardSet(args.shards, "wds")
    tars, samples = list(shardset.paths), len(shardset)
    if len(tars) < args.workers:
        raise BenchError(f"open_clip needs at least one shard per worker: {len(tars)} shards in {args.shards}, "
                         f"{args.workers} workers (make-shards --samples-per-shard lower)")
    tools = TOOLS + ((BARE,) if args.bare else ()) + ((peer_threads(args),) if args.peer_threads else ())
    rates = {t: [] for t in tools}
    walls = {t: [] for t in tools}
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench-train-e2e-") as work:
        config_dir = model_config_dir(args.model, work)
        for r in range(args.repeats):
            for tool in tools[r % len(tools):] + tools[:r % len(tools)]:
                print(f"bench-train: repeat {r + 1}/{args.repeats}: {tool} ...", file=sys.stderr, flush=True)
                rate, wall = run_tool(tool, args, work, r, config_dir, tars, samples)
                rates[tool].append(rate)
                walls[tool].append(wall)
            loads.append(os.getloadavg()[0])
    med_rate = {t: statistics.median(v) for t, v in rates.items()}
    med_wall = {t: statistics.median(v) for t, v in walls.items()}
    report = {
        "compare": "open-clip", "shards": os.path.abspath(args.shards), "samples": samples, "model": args.model,
        "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
        "loss_mode": args.loss_mode, "warmup_steps_excluded": args.warmup, "log_every": args.log_every,
        "repeats": args.repeats, "machine": machine(PACKAGES), "load_avg_after_repeat": loads,
        "samples_per_s": rates, "wall_s": walls, "median_samples_per_s": med_rate, "median_wall_s": med_wall,
        "speedup_steady": {t: med_rate[t] / med_rate[PEER] for t in tools},
        "speedup_wall": {t: med_wall[PEER] / med_wall[t] for t in tools},
    }
    print(f"\n| tool | steady samples/s (median of {args.repeats}) | × {PEER} | wall s | "
          f"× {PEER} (wall) |\n|---|---:|---:|---:|---:|")
    for t in tools:
        print(f"| {t} | {med_rate[t]:.1f} | {report['speedup_steady'][t]:.2f} | {med_wall[t]:.1f} | "
              f"{report['speedup_wall'][t]:.2f} |")
    print(f"\nsteady: steps {args.warmup + 1}–{samples // args.batch_size} of one epoch of {samples} samples; "
          f"wall: launch to exit. lip-train / {PEER}: {report['speedup_steady']['lip-train']:.2f}× steady "
          f"(target ≥ 3×), {report['speedup_wall']['lip-train']:.2f}× wall")
    return report


def bare_step(model, opt, loss_fn, images, tokens, autocast=contextlib.nullcontext, clip: float = 1.0) -> None:
    """One step of the benchmarks' reference loop: forward, CLIP loss, backward, clip, AdamW step, clamp;
    nothing else (`--bare` here; bench-train's bare loop over batches in memory)."""
    with autocast():
        image, raw, _, scale = model(images, tokens)
    loss_fn(image.float(), raw.float(), scale.float()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def bare_loop(shards: str, batch_size: int, workers: int, image_size: int, model_name: str, out: str) -> None:
    """One epoch of `shards` through lip-train's default loader into a bare step; each step's end
    time (`time.time()`) goes to `out` as JSON."""
    from pipelines.loader import LoaderConfig, build_loader
    from train.cpu_threads import cpu_threads, torch_threads
    from train.losses import ClipLoss
    from train.model import build_model
    from train.optim import param_groups
    from train.trainer import seed_everything

    cfg = LoaderConfig(shards=shards, format="wds", device="cpu", batch_size=batch_size, image_size=image_size,
                       workers=workers, seed=0)
    stamps = []
    with torch_threads(cpu_threads(cfg)):  # the threads lip-train picks (run.threads=0)
        seed_everything(0)
        model = build_model(model_name)
        opt = torch.optim.AdamW(param_groups(model, WD, False), lr=LR, betas=BETAS, eps=EPS, fused=True)
        loss_fn = ClipLoss()
        loader = build_loader(cfg)
        for batch in loader:
            bare_step(model, opt, loss_fn, batch.images, batch.raw_tokens, clip=CLIP)
            stamps.append(time.time())
        loader.close()
    with open(out, "w") as f:
        json.dump(stamps, f)


if __name__ == "__main__":
    bare_loop(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
