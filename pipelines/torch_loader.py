"""The torch backend: the fallback where DALI is absent and the baseline of every loader benchmark.

Shaped like open_clip's training loader: a webdataset pipeline of small stages run inside
DataLoader workers (read → PIL decode → torchvision RandomResizedCrop / flip / normalize →
tokenize → batch), `batch_size=None` in the DataLoader because batching happens in the workers.
The only difference is the first stage: it takes this worker's batches of the epoch plan instead
of streaming whole tars, which is what makes ranks disjoint and resume exact.
"""
from __future__ import annotations

import functools
import io
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from pipelines.sampling import EpochPlan, mix
from pipelines.schema import Batch
from pipelines.shardset import ShardSet
from pipelines.text import sample_tokens
from pipelines.transforms import CLIP_MEAN, CLIP_STD, AugmentSpec


def torchvision_transform(spec: AugmentSpec) -> T.Compose:
    norm = T.Normalize(CLIP_MEAN, CLIP_STD)
    if spec.train:
        ops = [T.RandomResizedCrop(spec.size, scale=spec.area, ratio=spec.aspect,
                                   interpolation=T.InterpolationMode.BICUBIC)]
        if spec.flip:
            ops.append(T.RandomHorizontalFlip())
        return T.Compose(ops + [T.ToTensor(), norm])
    return T.Compose([T.Resize(spec.size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(spec.size), T.ToTensor(), norm])


def worker_batches(plan: EpochPlan, start: int) -> Iterator[np.ndarray]:
    """Stage 1: this DataLoader worker's share of the plan (batch j goes to worker j mod W, the
    order in which the DataLoader collects them)."""
    info = torch.utils.data.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    for j, ids in enumerate(plan.batches(start)):
        if j % nw == wid:
            yield start + j, ids


def read_samples(src, shardset: ShardSet):
    for j, ids in src:
        yield j, ids, [shardset.get(int(g)) for g in ids]


def decode_augment(src, transform, seed: int, epoch: int):
    for j, ids, samples in src:
        # Crops depend on (seed, epoch, batch), not on which worker runs the batch or when the
        # DataLoader was created: a resumed run sees the same augmentation. fork_rng: with
        # workers=0 this runs in the training process, whose global RNG must stay untouched.
        images = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix(seed, epoch, j))
            for s in samples:
                try:
                    images.append(transform(Image.open(io.BytesIO(s.image)).convert("RGB")))
                except Exception as e:  # noqa: BLE001 - name the sample, whatever broke
                    raise ValueError(f"sample {s.key}: image does not decode ({e})") from e
        yield ids, samples, torch.stack(images)


def tokenize_batch(src, seed: int, epoch: int):
    for ids, samples, images in src:
        raw, syn, has_syn = sample_tokens(samples, ids, seed, epoch)
        yield (images, torch.from_numpy(raw), torch.from_numpy(syn), torch.from_numpy(has_syn),
               [s.key for s in samples])


def iterate_torch(cfg, shardset: ShardSet, plan: EpochPlan, start: int) -> Iterator[Batch]:
    pipeline = wds.DataPipeline(
        functools.partial(worker_batches, plan, start),
        wds.pipelinefilter(read_samples)(shardset),
        wds.pipelinefilter(decode_augment)(torchvision_transform(cfg.augment()), cfg.seed, plan.epoch),
        wds.pipelinefilter(tokenize_batch)(cfg.seed, plan.epoch),
    )
    n = plan.num_batches - start
    workers = max(0, min(cfg.workers, n))
    # Own generator: the DataLoader draws its workers' base seed from it on every iter(); from the
    # global RNG that draw would make a resumed run's RNG (one more iter() per resume) diverge.
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                         persistent_workers=False, pin_memory=cfg.device == "gpu",
                                         prefetch_factor=4 if workers else None,
                                         generator=torch.Generator().manual_seed(mix(cfg.seed, plan.epoch)))
    device = torch.device("cuda" if cfg.device == "gpu" else "cpu")
    for images, raw, syn, has_syn, keys in loader:
        yield Batch(images.to(device, non_blocking=True), raw.to(device, non_blocking=True),
                    syn.to(device, non_blocking=True), has_syn.to(device, non_blocking=True), keys)
