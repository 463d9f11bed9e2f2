"""The training run's loader: `data.*` settings → `pipelines.loader.build_loader` for this rank.

Kept apart from the loop so that how a run gets its batches (and the `auto` backend it records)
has one home; the loop only iterates what this returns.
"""
from __future__ import annotations

import dataclasses
import sys

from pipelines.loader import LoaderConfig, build_loader
from train.config import TrainConfig, backend_line
from train.distributed import DistEnv


def train_loader(cfg: TrainConfig, env: DistEnv, loader=None):
    """(cfg with `data.backend` resolved, the loader, the log line naming the `auto` choice or None).
    A given `loader` (benchmarks feed batches from memory) is used as it is."""
    backend_note = None
    if loader is None and cfg.data.backend == "auto":  # the run records what it chose: config.yaml names it
        backend, backend_note = backend_line(cfg.data.backend, cfg.data.device)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backend=backend))
        if env.is_main:
            print(f"{cfg.run.name}: {backend_note}", file=sys.stderr)
    loader = loader or build_loader(LoaderConfig(
        shards=cfg.data.train_shards, format=cfg.data.format, backend=cfg.data.backend,
        device="gpu" if env.device.type == "cuda" else "cpu", split="train",
        batch_size=cfg.data.batch_size, image_size=cfg.data.image_size, seed=cfg.run.seed,
        rank=env.rank, world_size=env.world_size, workers=cfg.data.workers, flip=cfg.data.flip,
        hw_decoder_load=cfg.data.hw_decoder_load, cache_dir=cfg.data.cache_dir, cache_limit=cfg.data.cache_limit,
        max_open_shards=cfg.data.max_open_shards, remix_at_epoch=cfg.data.remix_at_epoch,
        shuffle=cfg.data.shuffle, shuffle_block_shards=cfg.data.shuffle_block_shards))
    return cfg, loader, backend_note
