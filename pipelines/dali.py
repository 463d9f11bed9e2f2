"""The DALI backend: decode and augment on the GPU (`mixed` nvJPEG decode) or, on machines
without one, the same graph on the CPU (`device_id=None`).

Encoded samples enter through a parallel external source whose worker processes follow the epoch
plan: they read each sample by offset (the converter's `.idx` for tars and RecordIO, row number
for memory-mapped Arrow) and deliver its tokens, so tokenization never runs in the training
process. DALI's own readers (`fn.readers.webdataset`, `fn.readers.mxnet`) sort and shard samples
their own way and cannot follow a global per-epoch permutation, which the rank and resume
guarantees need; they remain the bound to compare against in `tools/bench_loader.py`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipelines.sampling import EpochPlan
from pipelines.schema import Batch
from pipelines.shardset import ShardSet
from pipelines.text import sample_tokens
from pipelines.transforms import CLIP_MEAN, CLIP_STD, AugmentSpec


class PlanSource:
    """Batch-mode callback for `fn.external_source(parallel=True)`: batch i of the plan → encoded
    images, raw tokens, synthetic tokens, has_syn and keys (as uint8 arrays)."""

    def __init__(self, shardset: ShardSet, plan: EpochPlan, start: int, seed: int):
        self.shardset, self.seed, self.epoch = shardset, seed, plan.epoch
        self.batches = plan.batches(start)

    def __call__(self, info):
        if info.iteration >= len(self.batches):
            raise StopIteration
        ids = self.batches[info.iteration]
        samples = [self.shardset.get(int(g)) for g in ids]
        raw, syn, has_syn = sample_tokens(samples, ids, self.seed, self.epoch)
        return ([np.frombuffer(s.image, np.uint8) for s in samples], list(raw), list(syn),
                [np.array(h, np.uint8) for h in has_syn],
                [np.frombuffer(s.key.encode(), np.uint8) for s in samples])


def augment_graph(jpegs, spec: AugmentSpec, decode_device: str, hw_decoder_load: float):
    """decode (+ fused random crop) → resize → flip → normalize, CHW float."""
    extra = {"hw_decoder_load": hw_decoder_load} if decode_device == "mixed" else {}
    mean = [255 * m for m in CLIP_MEAN]
    std = [255 * s for s in CLIP_STD]
    if spec.train:
        images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                               random_area=list(spec.area),
                                               random_aspect_ratio=list(spec.aspect), **extra)
        images = fn.resize(images, resize_x=spec.size, resize_y=spec.size, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5) if spec.flip else 0
        return fn.crop_mirror_normalize(images, mirror=mirror, mean=mean, std=std,
                                        output_layout="CHW", dtype=types.FLOAT)
    images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **extra)
    images = fn.resize(images, resize_shorter=spec.size, interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.crop_mirror_normalize(images, crop=(spec.size, spec.size), crop_pos_x=0.5, crop_pos_y=0.5,
                                    mean=mean, std=std, output_layout="CHW", dtype=types.FLOAT)


def build_pipeline(cfg, source: PlanSource):
    gpu = cfg.device == "gpu"

    @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
                  device_id=torch.cuda.current_device() if gpu else None, seed=cfg.seed + 7919 * source.epoch,
                  py_num_workers=max(1, cfg.workers), py_start_method="spawn" if gpu else "fork",
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        jpegs, raw, syn, has_syn, keys = fn.external_source(source, num_outputs=5, batch=True,
                                                            batch_info=True, parallel=True,
                                                            dtype=[types.UINT8, types.INT64, types.INT64,
                                                                   types.UINT8, types.UINT8])
        images = augment_graph(jpegs, cfg.augment(), "mixed" if gpu else "cpu", cfg.hw_decoder_load)
        return images, raw, syn, has_syn, keys

    return pipe()


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    if hasattr(tl, "as_cpu") and device.type == "cuda":
        out = torch.empty(tl.as_tensor().shape(), dtype=torch.float32, device=device)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        feed_ndarray(tl.as_tensor(), out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.asarray(tl.as_tensor()))


def iterate_dali(cfg, shardset: ShardSet, plan: EpochPlan, start: int) -> Iterator[Batch]:
    source = PlanSource(shardset, plan, start, cfg.seed)
    if not source.batches:
        return
    pipe = build_pipeline(cfg, source)
    pipe.build()
    device = torch.device("cuda" if cfg.device == "gpu" else "cpu")
    try:
        for _ in range(len(source.batches)):
            images, raw, syn, has_syn, keys = pipe.run()
            yield Batch(_to_torch(images, device),
                        torch.from_numpy(np.asarray(raw.as_tensor())).to(device),
                        torch.from_numpy(np.asarray(syn.as_tensor())).to(device),
                        torch.from_numpy(np.asarray(has_syn.as_tensor()).astype(bool)).to(device),
                        [bytes(np.asarray(keys.at(i))).decode() for i in range(len(keys))])
    finally:
        del pipe
