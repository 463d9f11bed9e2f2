"""torch's CPU threads for a lip-train run (`run.threads`), picked by the entry point.

On a CPU the loader's decoding (DALI's CPU graph: its thread pool; the torch backend: its worker
processes) and torch's intra-op threads share the cores. torch starts a thread per core, and each of
its parallel regions waits for its slowest thread, which a decoder may be holding off its core: on 2
cores (lip-tiny, batch 50, 64 px, 2 workers; docs/benchmarks.md, "lip-train vs open_clip_train") one
torch thread instead of two gave lip-train +7 % samples/s with DALI's CPU graph and +47 % with the
torch backend. So a run on the CPU gives torch the cores its loader's decoding leaves, never fewer than
half of them (decoders do not run all the time; a model short of threads would leave cores idle), and
never more than torch would start by itself.

`OMP_NUM_THREADS`, when set, wins (torchrun sets it to 1 where a node runs several ranks); a
`run.threads` > 0 is taken as given; on a GPU torch keeps its default (its threads mostly launch
kernels). `train()` holds `run.threads` > 0 for its duration and restores the caller's setting after.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from pipelines.loader import LoaderConfig, decode_threads
from train.config import TrainConfig


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroup cpusets), shared by the
    ranks torchrun started on this node."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def cpu_threads(loader: LoaderConfig) -> int:
    """torch's threads beside a loader built from `loader`, on this process's cores; 0 (torch's own
    setting stays) where OMP_NUM_THREADS is set or the loader runs on a GPU."""
    return _pick(loader)[0]


def _pick(loader: LoaderConfig) -> tuple[int, int, int]:
    """(torch's threads or 0, the usable cores, the loader's decode threads)."""
    if os.environ.get("OMP_NUM_THREADS") or loader.device != "cpu":
        return 0, 0, 0
    cores, decoders = usable_cores(), decode_threads(loader)
    return min(torch.get_num_threads(), max(1, cores // 2, cores - decoders)), cores, decoders


def resolve_threads(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """(cfg with `run.threads` set where lip-train picks it, the line the run logs; None where it
    leaves torch's default: a GPU, OMP_NUM_THREADS set, or `run.threads` given)."""
    if cfg.run.threads:
        return cfg, None
    loader = LoaderConfig.from_settings(cfg.data, shards=cfg.data.train_shards)
    threads, cores, decoders = _pick(loader)
    if not threads:
        return cfg, None
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, threads=threads))
    return cfg, (f"run.threads=0 -> {threads} (torch's CPU threads: {cores} cores, the loader "
                 f"({loader.backend}) decodes in {decoders})")


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's CPU threads at `threads` for the block (0: as they are), the caller's again after."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
