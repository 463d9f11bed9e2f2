"""The training run's loader: `data.*` settings → `pipelines.loader.build_loader` for this rank.

Kept apart from the loop so that how a run gets its batches (and the `auto` backend it records)
has one home; the loop only iterates what this returns.
"""
from __future__ import annotations

import dataclasses
import sys

from pipelines.loader import LoaderConfig, build_loader
from pipelines.loader_settings import backend_line
from train.config import TrainConfig
from train.distributed import DistEnv


def train_loader(cfg: TrainConfig, env: DistEnv, loader=None):
    """(cfg with `data.backend` resolved, the loader, the log line naming the `auto` choice or None).
    A given `loader` (benchmarks feed batches from memory) is used as it is."""
    backend_note = None
    if loader is None and cfg.data.backend == "auto":  # the run records what it chose: config.yaml names it
        backend, backend_note = backend_line(cfg.data.backend, cfg.data.device, key="data.")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backend=backend))
        if env.is_main:
            print(f"{cfg.run.name}: {backend_note}", file=sys.stderr)
    # data.* are the loader's settings (DataConfig inherits them); the rest is this rank's
    loader = loader or build_loader(LoaderConfig.from_settings(
        cfg.data, shards=cfg.data.train_shards, device="gpu" if env.device.type == "cuda" else "cpu",
        split="train", seed=cfg.run.seed, rank=env.rank, world_size=env.world_size))
    return cfg, loader, backend_note
