"""The one entry point: `build_loader(LoaderConfig)` → an iterable of `Batch`es.

Every backend (DALI on GPU or CPU, torch DataLoader) follows the same `EpochPlan`, so a caller
cannot tell them apart except by speed. The loader's state is (epoch, batches yielded in it,
seed): enough to resume mid-epoch with exactly the batches not yet yielded, in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from pipelines.sampling import EpochPlan
from pipelines.schema import Batch
from pipelines.shardset import ShardSet
from pipelines.transforms import AugmentSpec

BACKENDS = ("dali", "torch")


@dataclass
class LoaderConfig:
    shards: str  # a format folder: shards/<dataset>/<format>
    format: str = "wds"  # wds | arrow | rec
    backend: str = "dali"  # dali | torch
    device: str = "cpu"  # gpu | cpu
    split: str = "train"  # train | eval
    batch_size: int = 256
    image_size: int = 224
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    workers: int = 2
    flip: bool = True
    hw_decoder_load: float = 0.65  # DALI mixed decode: share of JPEGs sent to the hardware decoder
    on_error: str = "raise"  # raise | skip (bad shards/samples found when opening the folder)
    drop_last: bool | None = None  # default: True for train, False for eval
    shuffle: bool | None = None  # default: True for train, False for eval

    def __post_init__(self):
        for name, value, allowed in (("format", self.format, ("wds", "arrow", "rec")),
                                     ("backend", self.backend, BACKENDS),
                                     ("device", self.device, ("gpu", "cpu")),
                                     ("split", self.split, ("train", "eval"))):
            if value not in allowed:
                raise ValueError(f"loader {name} must be one of {allowed}, not {value!r}")
        train = self.split == "train"
        self.drop_last = train if self.drop_last is None else self.drop_last
        self.shuffle = train if self.shuffle is None else self.shuffle

    def augment(self) -> AugmentSpec:
        return AugmentSpec(size=self.image_size, train=self.split == "train", flip=self.flip)


class Loader:
    def __init__(self, cfg: LoaderConfig, shardset: ShardSet | None = None):
        self.cfg = cfg
        self.shardset = shardset or ShardSet(cfg.shards, cfg.format, cfg.on_error)
        self.epoch = 0
        self.batches_yielded = 0
        if cfg.backend == "dali":
            from pipelines.dali import iterate_dali as iterate
        else:
            from pipelines.torch_loader import iterate_torch as iterate
        self._iterate = iterate

    def plan(self, epoch: int | None = None) -> EpochPlan:
        c = self.cfg
        return EpochPlan(total=len(self.shardset), batch_size=c.batch_size, seed=c.seed,
                         epoch=self.epoch if epoch is None else epoch, rank=c.rank,
                         world_size=c.world_size, shuffle=c.shuffle, drop_last=c.drop_last)

    def __len__(self) -> int:
        return self.plan().num_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_yielded = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; afterwards the loader moves on to the next epoch."""
        plan = self.plan()
        for batch in self._iterate(self.cfg, self.shardset, plan, self.batches_yielded):
            self.batches_yielded += 1
            yield batch
        self.epoch, self.batches_yielded = self.epoch + 1, 0

    def state_dict(self) -> dict:
        c = self.cfg
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "seed": c.seed,
                "world_size": c.world_size, "batch_size": c.batch_size, "samples": len(self.shardset)}

    def load_state_dict(self, state: dict) -> None:
        here = self.state_dict()
        for k in ("seed", "world_size", "batch_size", "samples"):
            if state[k] != here[k]:
                raise ValueError(f"loader state has {k}={state[k]} but this loader has {here[k]}: "
                                 "resume with the same data, seed, batch size and world size")
        self.epoch, self.batches_yielded = state["epoch"], state["batches_yielded"]


def build_loader(cfg: LoaderConfig) -> Loader:
    return Loader(cfg)


__all__ = ["LoaderConfig", "Loader", "build_loader"]
