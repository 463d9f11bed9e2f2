"""The one entry point: `build_loader(LoaderConfig)` → an iterable of `Batch`es.

Every backend (DALI on GPU or CPU, torch DataLoader) follows the same `EpochPlan`, so a caller
cannot tell them apart except by speed. The loader's state is (epoch, batches yielded in it,
the plan's offset, seed) plus the bad samples met so far: enough to resume mid-epoch with exactly
the samples not yet yielded, at the same or at another world size and batch size (elastic).
The state also names the plan version that ordered the epoch (`sampling.PLAN_VERSION`): a state
saved mid-epoch under another version cannot say which samples are left, and loading it is an
error naming the way out; one saved at an epoch's end loads under any version.

The data is one folder or a mixture of sources (`shards` a list: pipelines/sources.py, the plan's
side in pipelines/plan/mixing.py). The state names each source's samples, weight, shard layout and data
version (`sources.fingerprint`): a resume onto other data (a source added, removed, re-weighted,
re-sharded or re-converted) is refused with an error naming what changed, since the rest of the
epoch would be other samples; with `remix_at_epoch` the new data applies from the next epoch's start
instead. A state saved before mixing (no sources) loads as a one-source mixture.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Iterator

import numpy as np
import torch

from pipelines.faults import BadSamples
from pipelines.loader_settings import CHOICES, LoaderSettings, resolve_backend, resolve_device
from pipelines.plan.mixing import Mix, per_epoch
from pipelines.plan.epoch_plan import PLAN_VERSION, EpochPlan, shuffle_mode
from pipelines.priority import resolve_nice
from pipelines.schema import Batch
from pipelines.shardset import ShardSet
from pipelines.sources import Mixture, differences, fingerprint, open_sources, parse_sources
from pipelines.storage.remote import parse_size
from pipelines.augment.transforms import AugmentSpec

log = logging.getLogger("pipelines")


@dataclass
class LoaderConfig(LoaderSettings):
    # a format folder (shards/<dataset>/<format>), an s3:// url, or a list of sources, each a folder/url
    # or {shards, weight, format, name} (pipelines/sources.py). Keyword-only: the settings' fields come
    # first, so a positional `shards` would land in `format`.
    shards: str | list = field(kw_only=True)
    split: str = "train"  # train | eval
    seed: int = 0  # the epoch plan's and the augmentations' (lip-train: run.seed)
    rank: int = 0  # this process's rank (lip-train: the process group's)
    world_size: int = 1  # ranks that share each epoch
    on_error: str = "raise"  # raise | skip: bad shards when opening, bad images mid-epoch (substituted)
    max_bad_in_a_row: int = 100  # under skip: a longer run of undecodable images is an error
    drop_last: bool | None = None  # default: True for train, False for eval

    @classmethod
    def from_settings(cls, settings: LoaderSettings, **call) -> "LoaderConfig":
        """A loader config holding `settings` (any LoaderSettings, such as lip-train's `data`), plus
        the call's own fields (`shards`, `split`, `seed`, `rank`, ...) and any setting replaced."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(LoaderSettings)} | call)

    def __post_init__(self):
        for name, allowed in (*CHOICES.items(), ("split", ("train", "eval"))):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"loader {name} must be one of {allowed}, not {value!r}")
        # auto: the backend is chosen with the device as asked (auto or set), then the device resolved
        self.backend = resolve_backend(self.backend, self.device)[0]
        self.device = resolve_device(self.device)
        train = self.split == "train"
        self.drop_last = train if self.drop_last is None else self.drop_last
        self.shuffle = shuffle_mode(train if self.shuffle is None else self.shuffle)
        if self.shuffle_block_shards < 1:
            raise ValueError(f"loader shuffle_block_shards must be ≥ 1, not {self.shuffle_block_shards}")
        self.cache_limit = parse_size(self.cache_limit)
        self.decode_nice = resolve_nice(self.decode_nice, self.device)
        parse_sources(self.shards, self.format)  # malformed sources fail here, naming the entry

    def augment(self) -> AugmentSpec:
        return AugmentSpec(size=self.image_size, train=self.split == "train", flip=self.flip)


class Loader:
    def __init__(self, cfg: LoaderConfig, shardset: ShardSet | None = None):
        self.cfg = cfg
        self.sources = parse_sources(cfg.shards, cfg.format)
        if shardset is None and isinstance(cfg.shards, str):
            shardset = ShardSet(cfg.shards, cfg.format, cfg.on_error, cfg.cache_dir, cfg.cache_limit,
                                cfg.max_open_shards)
        elif shardset is None:
            shardset = Mixture(self.sources, open_sources(self.sources, cfg.on_error, cfg.cache_dir, cfg.cache_limit,
                                                          cfg.max_open_shards))
        self.shardset = shardset
        sets = shardset.sets if isinstance(shardset, Mixture) else [shardset]
        self.sources = shardset.sources if isinstance(shardset, Mixture) else self.sources[:1]
        self.fingerprints = [fingerprint(src, s) for src, s in zip(self.sources, sets)]
        self.mix = Mix(tuple(len(s) for s in sets), tuple(src.weight for src in self.sources),
                       tuple(len(s.ends) for s in sets))
        self.length = self.mix.length  # samples of an epoch (a mixture's: Σ round(weight × samples))
        if self.mix.identity:
            self.mix = None  # one plan for one folder, as before mixing
        elif cfg.drop_last and self.length < cfg.world_size * cfg.batch_size:
            raise ValueError(f"the mixture's epoch holds {self.length} samples "
                             f"({', '.join('%s: %d' % (r['name'], r['per_epoch']) for r in self.describe())}), fewer "
                             f"than one batch of {cfg.batch_size} for each of {cfg.world_size} ranks; lower the "
                             "batch size or raise the weights")
        # samples per shard: what shuffle="block" permutes by
        self.shard_sizes = tuple(np.diff(self.shardset.ends, prepend=0).tolist())
        self.epoch = 0
        self.batches_yielded = 0
        self.offset = 0  # samples of this epoch consumed under another world/batch size (elastic)
        self.bad = BadSamples(len(self.shardset), cfg.on_error, cfg.max_bad_in_a_row,
                              shardset.bounds() if isinstance(shardset, Mixture) else None)
        if cfg.backend == "dali":
            from pipelines.backends.dali import DaliBackend as Backend
        else:
            from pipelines.backends.torch_loader import TorchBackend as Backend
        self._backend = Backend(cfg, self.shardset, self.bad)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        c = self.cfg
        epoch = self.epoch if epoch is None else epoch
        return EpochPlan(total=self.length, batch_size=c.batch_size, seed=c.seed, epoch=epoch,
                         rank=c.rank, world_size=c.world_size, shuffle=c.shuffle, drop_last=c.drop_last,
                         offset=self.offset if epoch == self.epoch else 0, block_shards=c.shuffle_block_shards,
                         shard_sizes=self.shard_sizes, mix=self.mix)

    def describe(self) -> list[dict]:
        """Each source as resolved: name, shards, format, samples, weight, samples per epoch."""
        return [{k: f[k] for k in ("name", "shards", "format", "samples", "weight")}
                | {"per_epoch": per_epoch(f["samples"], f["weight"])} for f in self.fingerprints]

    @property
    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch at this world size and batch size."""
        return self.plan(self.epoch + 1).num_batches

    @property
    def epoch_batches(self) -> int:
        """Batches of the current epoch, those already yielded included (fewer than
        `batches_per_epoch` in an epoch resumed at another world size)."""
        return self.plan().num_batches

    def __len__(self) -> int:
        """Batches the next iteration yields: the rest of the current epoch."""
        return self.epoch_batches - self.batches_yielded

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_yielded, self.offset = epoch, 0, 0

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; afterwards the loader moves on to the next epoch."""
        plan = self.plan()
        self.shardset.follow(plan, self.batches_yielded)  # object storage: the cache fetches ahead of it
        mixture = isinstance(self.shardset, Mixture)
        for batch in self._backend.iterate(plan, self.batches_yielded):
            self.batches_yielded += 1
            batch.sources = torch.from_numpy(self.shardset.source_of(batch.ids.numpy())) if mixture \
                else torch.zeros(len(batch), dtype=torch.int64)
            self.shardset.follow(plan, self.batches_yielded)
            yield batch
        self.epoch, self.batches_yielded, self.offset = self.epoch + 1, 0, 0

    def close(self) -> None:
        """Stop the backend's worker processes now rather than when the loader is collected."""
        self._backend.close()
        self.shardset.close()

    def state_dict(self) -> dict:
        c = self.cfg
        return {"plan": PLAN_VERSION, "epoch": self.epoch, "batches_yielded": self.batches_yielded, "offset": self.offset,
                "seed": c.seed, "world_size": c.world_size, "batch_size": c.batch_size,
                "samples": len(self.shardset), "shuffle": c.shuffle, "shuffle_block_shards": c.shuffle_block_shards,
                "bad_samples": self.bad.state_dict(), "sources": self.fingerprints}

    def load_state_dict(self, state: dict, accum_steps: int = 1) -> None:
        """Continue where `state` left off. At the world size and batch size it was saved with,
        exactly the batches not yet yielded follow; at others (elastic), the samples of the
        epoch no rank has yielded yet are split across this loader's ranks, then epochs follow
        the plan for this world size. `accum_steps`: batches the caller takes together (the
        trainer's gradient accumulation), so an epoch with fewer left than that is over."""
        here = self.state_dict()
        if state["seed"] == here["seed"] and self._remixed(state):
            return
        for k in ("seed", "samples"):
            if state[k] != here[k]:
                raise ValueError(f"loader state has {k}={state[k]} but this loader has {here[k]}: "
                                 "resume with the same data and seed")
        if "shuffle" in state:  # absent from states saved before shuffle modes: nothing to compare
            saved, now = (_shuffle_label(d["shuffle"], d.get("shuffle_block_shards")) for d in (state, here))
            if saved != now:
                raise ValueError(f"loader state was saved with shuffle={saved} but this loader has shuffle={now}: "
                                 "the epoch's order differs; resume with the saved shuffle setting")
        self.epoch, self.offset = state["epoch"], state.get("offset", 0)
        self.batches_yielded = state["batches_yielded"]
        self.bad.load_state_dict(state.get("bad_samples", {}))
        before = EpochPlan(total=self.length, batch_size=state["batch_size"], seed=state["seed"],
                           epoch=self.epoch, world_size=state["world_size"], shuffle=self.cfg.shuffle,
                           drop_last=self.cfg.drop_last, offset=self.offset,
                           block_shards=self.cfg.shuffle_block_shards, shard_sizes=self.shard_sizes, mix=self.mix)
        version = state.get("plan", 1)  # states without it predate the versions: numpy's permutations
        if version != PLAN_VERSION:
            # Nothing of the epoch yielded, or all of it: its order does not matter. Between, it does.
            over = self.batches_yielded >= before.num_batches // accum_steps * accum_steps
            if not over and (self.batches_yielded or self.offset):
                raise ValueError(
                    f"loader state was saved mid-epoch (epoch {self.epoch}, batch {self.batches_yielded} of "
                    f"{before.num_batches}) under epoch plan version {version}, but this loader orders epochs "
                    f"by version {PLAN_VERSION}, so the samples that epoch has left are unknown here. Resume "
                    "from a checkpoint saved at an epoch's end (the trainer writes one at every epoch end), or "
                    "finish this epoch with the version that saved the state")
            if over:
                self.set_epoch(self.epoch + 1)
            return
        if (state["world_size"], state["batch_size"]) != (here["world_size"], here["batch_size"]):
            self.offset, self.batches_yielded = before.consumed(self.batches_yielded), 0
            if self.epoch_batches == 0:  # too few samples left for one batch per rank: next epoch
                self.set_epoch(self.epoch + 1)


    def _remixed(self, state: dict) -> bool:
        """True when the state was saved on other sources and `remix_at_epoch` starts a new epoch
        on these; raises when they differ without it. A state without sources (saved before
        mixing) is one folder's: the sample count check follows."""
        saved = state.get("sources")
        changed = differences(saved, self.fingerprints) if saved is not None else []
        if not changed:
            return False
        at_start = state["batches_yielded"] == 0 and not state.get("offset", 0)
        epoch = state["epoch"] if at_start else state["epoch"] + 1
        if not self.cfg.remix_at_epoch:
            raise ValueError(f"loader state was saved on other data: {'; '.join(changed)}. Resume on the data it "
                             f"was saved with, or set remix_at_epoch (lip-train: data.remix_at_epoch=true) to "
                             f"continue from epoch {epoch}'s start with the data as it is now")
        log.warning("data changed since the checkpoint (%s): epoch %d starts with the new data%s", "; ".join(changed),
                    epoch, "" if at_start else f" (the rest of epoch {state['epoch']} is skipped)")
        self.epoch, self.batches_yielded, self.offset = epoch, 0, 0
        return True  # bad samples met on the old data are forgotten: their ids may name others now


def _shuffle_label(mode: str, block_shards: int | None) -> str:
    return f"block/{block_shards} shards" if mode == "block" else mode


def build_loader(cfg: LoaderConfig) -> Loader:
    return Loader(cfg)


def decode_threads(cfg: LoaderConfig) -> int:
    """The CPU threads or processes a loader built from `cfg` decodes images in, beside the thread
    that iterates it: DALI's CPU graph its thread pool, the torch backend its worker processes (none
    with `workers` 0: the calling thread decodes); the GPU graph none (nvJPEG decodes). What a
    trainer on the CPU leaves these cores for (train/cpu_threads.py)."""
    if cfg.backend == "torch":
        return cfg.workers
    if cfg.device == "gpu":
        return 0
    from pipelines.backends.dali import decode_threads as dali_threads

    return dali_threads(cfg)


__all__ = ["LoaderConfig", "Loader", "build_loader", "decode_threads"]
