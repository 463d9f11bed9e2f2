"""The torch backend: the fallback where DALI is absent and the baseline of every loader benchmark.

Shaped like open_clip's training loader: a webdataset pipeline of small stages run inside
DataLoader workers (read → PIL decode → torchvision RandomResizedCrop / flip / normalize →
tokenize → batch), `batch_size=None` in the DataLoader because batching happens in the workers.
The differences: the first stage takes this worker's batches of the epoch plan instead of
streaming whole tars, which is what makes ranks disjoint and resume exact; and the crop window and
flip are drawn from (seed, epoch, sample id) (`transforms.crop_windows`, `flips`: torchvision's
RandomResizedCrop algorithm without its RNG), the same draws as the DALI backend's.
"""
from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from pipelines.errors import SampleReadError
from pipelines.faults import BadSamples
from pipelines.augment.images import decode_rgb
from pipelines.parent_watch import watch_in_child
from pipelines.plan.epoch_plan import EpochPlan, mix
from pipelines.priority import lower_process
from pipelines.schema import Batch
from pipelines.shardset import ShardSet, position_of
from pipelines.text import sample_tokens
from pipelines.augment.transforms import CLIP_MEAN, CLIP_STD, AugmentSpec, crop_windows, flips


def torchvision_transform(spec: AugmentSpec) -> T.Compose:
    """torchvision's own transforms, random crops from torch's RNG: the evaluators' and the
    benchmarks' open_clip baseline. The loader trains with `Augment` (same algorithm, keyed draws)."""
    norm = T.Normalize(CLIP_MEAN, CLIP_STD)
    if spec.train:
        ops = [T.RandomResizedCrop(spec.size, scale=spec.area, ratio=spec.aspect,
                                   interpolation=T.InterpolationMode.BICUBIC)]
        if spec.flip:
            ops.append(T.RandomHorizontalFlip())
        return T.Compose(ops + [T.ToTensor(), norm])
    return T.Compose([T.Resize(spec.size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(spec.size), T.ToTensor(), norm])


class Augment:
    """(upright PIL image, sample id) → float [3, S, S]: for training what T.RandomResizedCrop +
    RandomHorizontalFlip + ToTensor + Normalize do, with the window and flip of (seed, epoch, id)."""

    def __init__(self, spec: AugmentSpec, seed: int, epoch: int):
        self.spec, self.seed, self.epoch = spec, seed, epoch
        self.eval = None if spec.train else torchvision_transform(spec)

    def __call__(self, image, gid: int) -> torch.Tensor:
        if self.eval is not None:
            return self.eval(image)
        spec = self.spec
        top, left, height, width = crop_windows(spec, self.seed, self.epoch, [gid], [image.size])[0].tolist()
        image = TF.resized_crop(image, top, left, height, width, [spec.size, spec.size],
                                interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        if flips(spec, self.seed, self.epoch, [gid])[0]:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


def worker_batches(plan: EpochPlan, start: int) -> Iterator[np.ndarray]:
    """Stage 1: this DataLoader worker's share of the plan (batch start + j goes to worker j mod W,
    the order in which the DataLoader collects them), each batch computed when it is read."""
    info = torch.utils.data.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    for b in range(start + wid, plan.num_batches, nw):  # O(batch) each: the epoch is never listed
        yield b, plan.batch(b)


def read_samples(src, shardset: ShardSet, bad: BadSamples, epoch: int):
    """Read each batch's samples; a sample whose bytes cannot be read is bad as an undecodable
    image is (reported, substituted). A storage failure is an error, never a bad sample."""
    for j, ids in src:
        found = len(bad)
        ids = bad.apply(ids)  # bad samples met in earlier epochs or before a resume
        while True:
            try:
                samples = shardset.samples(ids, position_of(epoch, j))
                break
            except SampleReadError as e:
                bad.report(e.gid, shardset.where(e.gid), e)
                ids = bad.apply(ids)
        yield j, ids, samples, found


def decode_augment(src, augment: Augment, shardset: ShardSet, bad: BadSamples):
    """Decode and augment; an image that does not decode is reported (an error under
    on_error="raise") and replaced by its substitute, whose image is decoded in its place (and
    cropped by the substitute's own window). No RNG is used: with workers=0 this runs in the
    training process, whose global RNG stays untouched."""
    for j, ids, samples, found in src:
        images = []
        ids = ids.copy()
        for k, s in enumerate(samples):
            while True:
                try:
                    images.append(augment(decode_rgb(s.image), int(ids[k])))  # EXIF orientation, 16-bit grey
                    break
                except Exception as e:  # noqa: BLE001 - name the sample, whatever broke
                    bad.report(int(ids[k]), shardset.where(int(ids[k])), e)
                    ids[k] = bad.substitute(ids[k])
                    samples[k] = s = shardset.get(int(ids[k]))
        news = dict(list(bad.found.items())[found:])  # what this batch found, for the main process
        yield ids, samples, torch.stack(images), news


def tokenize_batch(src, seed: int, epoch: int):
    for ids, samples, images, news in src:
        raw, syn, has_syn = sample_tokens(samples, ids, seed, epoch)
        yield (images, torch.from_numpy(raw), torch.from_numpy(syn), torch.from_numpy(has_syn),
               [s.key for s in samples], torch.from_numpy(np.asarray(ids, np.int64)), news)


def start_worker(nice: int, worker_id: int) -> None:
    """A DataLoader worker's start: gone within 0.5 s of a killed trainer (`watch_in_child`), and
    decoding `nice` below the training thread (pipelines/priority.py)."""
    watch_in_child(worker_id)
    lower_process(nice)


class TorchBackend:
    """A DataLoader per epoch, as open_clip's loader: workers start with each iteration."""

    def __init__(self, cfg, shardset: ShardSet, bad: BadSamples):
        self.cfg, self.shardset, self.bad = cfg, shardset, bad

    def close(self) -> None:
        pass  # workers end with each epoch's DataLoader

    def iterate(self, plan: EpochPlan, start: int) -> Iterator[Batch]:
        cfg = self.cfg
        pipeline = wds.DataPipeline(
            functools.partial(worker_batches, plan, start),
            wds.pipelinefilter(read_samples)(self.shardset, self.bad, plan.epoch),
            wds.pipelinefilter(decode_augment)(Augment(cfg.augment(), cfg.seed, plan.epoch), self.shardset, self.bad),
            wds.pipelinefilter(tokenize_batch)(cfg.seed, plan.epoch),
        )
        n = plan.num_batches - start
        workers = max(0, min(cfg.workers, n))
        # Own generator: the DataLoader draws its workers' base seed from it on every iter(); from the
        # global RNG that draw would make a resumed run's RNG (one more iter() per resume) diverge.
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                             persistent_workers=False, pin_memory=cfg.device == "gpu",
                                             prefetch_factor=4 if workers else None,
                                             worker_init_fn=functools.partial(start_worker, cfg.decode_nice),
                                             generator=torch.Generator().manual_seed(mix(cfg.seed, plan.epoch)))
        device = torch.device("cuda" if cfg.device == "gpu" else "cpu")
        for j, (images, raw, syn, has_syn, keys, ids, news) in enumerate(loader):
            for gid, message in news.items():  # met in a worker: record it here, where state lives
                self.bad.found.setdefault(gid, message)
            self.bad.count(plan.batch(start + j))  # runs of bad samples, in plan order
            yield Batch(images.to(device, non_blocking=True), raw.to(device, non_blocking=True),
                        syn.to(device, non_blocking=True), has_syn.to(device, non_blocking=True), keys, ids)
