"""The DALI backend: decode and augment on the GPU (`mixed` nvJPEG decode) or, on machines
without one, the same graph on the CPU (`device_id=None`).

Encoded samples enter through a parallel external source whose worker processes follow the epoch
plan: they read each sample by offset (the converter's `.idx` for tars and RecordIO, buffer views
of memory-mapped Arrow) and hand DALI one batch as the encoded images plus ONE int32 array of
text (`ShardSet.read_batch`). Keys and ids never enter the graph: the training process knows the
plan and completes the `Batch` itself.

One pipeline serves the loader's whole life. Its source is endless: after the planned epoch it
runs on into the next ones, so DALI prefetches across epoch boundaries and an epoch costs nothing
to start (DALI's own readers work the same way). The pipeline is rebuilt only when the caller
jumps (a resume, `set_epoch` out of order) or a bad image broke a batch.

DALI's own readers (`fn.readers.webdataset`, `fn.readers.mxnet`) shard and shuffle their own way
and cannot follow a global per-epoch permutation, which the rank and resume guarantees need; they
remain the bound in `tools/bench/bench_loader.py`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipelines.faults import BadSamples
from pipelines.images import decode_rgb
from pipelines.sampling import EpochPlan
from pipelines.schema import CONTEXT_LENGTH, Batch
from pipelines.shardset import SampleReadError, ShardSet, position_of
from pipelines.storage import StorageError
from pipelines.transforms import CLIP_MEAN, CLIP_STD, AugmentSpec


PREFETCH = 2  # batches DALI prepares ahead of the one it yields


class PlanSource:
    """Batch-mode callback for `fn.external_source(parallel=True)`. Iteration i is the i-th batch
    of the endless sequence that starts at batch `start` of `plan` and goes on through epochs
    plan.epoch + 1, + 2, ... (whole epochs, offset 0). Used by the workers (to read) and by the
    training process (to name what each batch holds), so both agree by construction."""

    def __init__(self, shardset: ShardSet, plan: EpochPlan, start: int, seed: int, bad: BadSamples):
        self.shardset, self.plan, self.start, self.seed, self.bad = shardset, plan, start, seed, bad
        self.first = plan.num_batches - start  # batches left in the first epoch
        self.per_epoch = dataclasses.replace(plan, offset=0).num_batches
        self._later: EpochPlan | None = None  # the plan of the latest later epoch asked for
        self._pid: int | None = None

    def position(self, i: int) -> tuple[EpochPlan, int]:
        """(plan of the epoch, batch index in it) of iteration i."""
        if i < self.first:
            return self.plan, self.start + i
        epochs, batch = divmod(i - self.first, self.per_epoch)
        epoch = self.plan.epoch + 1 + epochs
        if self._later is None or self._later.epoch != epoch:  # one plan per epoch: it caches its layout
            self._later = dataclasses.replace(self.plan, epoch=epoch, offset=0)
        return self._later, batch

    def planned(self, i: int) -> tuple[int, np.ndarray]:
        """(epoch, planned sample ids) of iteration i: O(batch), never the whole epoch."""
        plan, b = self.position(i)
        return plan.epoch, plan.batch(b)

    def __call__(self, info):
        if self._pid != os.getpid():  # first call in this worker process
            # Shards without stored tokens are tokenized here, with torch ops: one thread, because a
            # forked worker entering an OpenMP region its parent had started deadlocks (libgomp).
            torch.set_num_threads(1)
            self._pid = os.getpid()
        epoch, ids = self.planned(info.iteration)
        try:
            return self.shardset.read_batch(self.bad.apply(ids), self.seed, epoch,
                                            position_of(epoch, self.position(info.iteration)[1]))
        except Exception as e:  # noqa: BLE001 - DALI passes on only the text: tag it with batch and cause
            raise RuntimeError(source_error(info.iteration, e)) from None


# DALI re-raises a worker's error as text, when the pipeline reaches that iteration, which may be
# after batches prefetched before it: the tag says which iteration failed and why.
_TAG = re.compile(r"\[lip-source iteration=(\d+) kind=(\w+)(?: id=(\d+))?\] ([^\n]*)")


def source_error(iteration: int, e: BaseException) -> str:
    """An external-source failure as one tagged line: a storage failure (never a bad sample), a
    sample whose bytes cannot be read (`SampleReadError`: that sample is bad), or another error."""
    message = f"{type(e).__name__}: {e}".replace("\n", " ")
    if isinstance(e, StorageError):
        return f"[lip-source iteration={iteration} kind=storage] {e}".replace("\n", " ")
    if isinstance(e, SampleReadError):
        return f"[lip-source iteration={iteration} kind=sample id={e.gid}] {e}".replace("\n", " ")
    return f"[lip-source iteration={iteration} kind=other] {message}"


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


def build_pipeline(cfg, source: PlanSource, seed: int):
    gpu = cfg.device == "gpu"

    @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
                  device_id=torch.cuda.current_device() if gpu else None, seed=seed,
                  py_num_workers=max(1, cfg.workers), py_start_method="spawn" if gpu else "fork",
                  prefetch_queue_depth=PREFETCH, exec_dynamic=True)
    def pipe():
        jpegs, text = fn.external_source(source, num_outputs=2, batch=True, batch_info=True,
                                         parallel=True, dtype=[types.UINT8, types.INT32])
        return augment_graph(jpegs, cfg.augment(), "mixed" if gpu else "cpu", cfg.hw_decoder_load), text

    p = pipe()
    p.build()
    return p


def to_torch(tensors, device: torch.device) -> torch.Tensor:
    """A DALI output batch (CPU or GPU TensorList) as one torch tensor on `device`."""
    if hasattr(tensors, "as_cpu") and device.type == "cuda":
        out = torch.empty(tensors.as_tensor().shape(), dtype=torch.float32, device=device)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        feed_ndarray(tensors.as_tensor(), out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.asarray(tensors.as_tensor()))


def find_bad(shardset: ShardSet, ids: np.ndarray) -> list[tuple[int, str]]:
    """After DALI failed a batch (it does not say which sample): the samples that do not decode
    on the CPU path (the torch backend's decoder, so both backends call the same samples bad)."""
    bad = []
    for gid in ids:
        try:
            decode_rgb(shardset.get(int(gid)).image)
        except Exception as e:  # noqa: BLE001 - any failure makes the sample bad
            bad.append((int(gid), str(e)))
    return bad


class DaliBackend:
    """Owns the loader's one pipeline and knows which iteration its next `run()` yields."""

    def __init__(self, cfg, shardset: ShardSet, bad: BadSamples):
        self.cfg, self.shardset, self.bad = cfg, shardset, bad
        self.device = torch.device("cuda" if cfg.device == "gpu" else "cpu")
        self.pipe = self.source = None
        self.next = 0  # the source iteration the pipeline's next output holds
        self.known_bad = 0  # len(bad) when the pipeline was built: its workers know those

    def close(self) -> None:
        self.pipe = self.source = None  # DALI stops its workers when the pipeline goes

    def _at(self, plan: EpochPlan, start: int) -> bool:
        if self.pipe is None or len(self.bad) != self.known_bad:
            return False
        here, b = self.source.position(self.next)
        return (here.epoch, here.offset, b) == (plan.epoch, plan.offset, start)

    def _build(self, plan: EpochPlan, start: int) -> None:
        self.close()
        self.source = PlanSource(self.shardset, plan, start, self.cfg.seed, self.bad)
        # Crops come from DALI's RNG, seeded per (seed, epoch, batch) of the build.
        seed = (self.cfg.seed * 1_000_003 + plan.epoch * 7919 + start) % (2 ** 31)
        self.pipe, self.next, self.known_bad = build_pipeline(self.cfg, self.source, seed), 0, len(self.bad)

    def iterate(self, plan: EpochPlan, start: int) -> Iterator[Batch]:
        for b in range(start, plan.num_batches):
            if not self._at(plan, b):
                self._build(plan, b)
            while True:
                try:
                    images, text = self.pipe.run()
                    break
                except Exception as e:  # noqa: BLE001 - DALI reports decode errors as RuntimeError
                    self._recover(e)  # marks ≥ 1 sample bad or raises
                    self._build(plan, b)
            _, planned = self.source.planned(self.next)
            self.next += 1
            ids = self.bad.apply(planned)
            self.bad.count(planned)
            text = torch.from_numpy(np.asarray(text.as_tensor()))
            yield Batch(to_torch(images, self.device),
                        text[:, :CONTEXT_LENGTH].to(self.device, torch.int64),
                        text[:, CONTEXT_LENGTH:-1].to(self.device, torch.int64),
                        text[:, -1].to(self.device, torch.bool),
                        self.shardset.keys(ids), torch.from_numpy(ids))

    def _recover(self, error: Exception) -> None:
        """After `run()` failed: the source's tagged error names its batch and cause; a decode
        failure inside the graph does not, so the batches that can be in flight are searched for
        samples that do not decode (the output batch first, then those prefetched after it)."""
        source = self.source
        self.close()  # a pipeline that raised is no longer valid
        tag = _TAG.search(str(error))
        if tag is not None:
            iteration, kind, gid, message = int(tag[1]), tag[2], tag[3], tag[4]
            if kind == "storage":
                raise StorageError(message) from None
            if kind == "sample":
                self.bad.report(int(gid), self.shardset.where(int(gid)), message)
                return
            _, planned = source.planned(iteration)
            raise RuntimeError(f"reading batch {iteration} (from {self.shardset.where(int(planned[0]))}, ...) "
                               f"failed: {message}") from None
        for i in range(self.next, self.next + PREFETCH + 1):
            found = find_bad(self.shardset, self.bad.apply(source.planned(i)[1]))
            for gid, message in found:
                self.bad.report(gid, self.shardset.where(gid), message)
            if found:
                return
        planned = self.bad.apply(source.planned(self.next)[1])
        keys = ", ".join(self.shardset.where(int(g)) for g in planned[:4])
        raise RuntimeError(f"DALI failed a batch holding {keys}, ...: {error}") from error
