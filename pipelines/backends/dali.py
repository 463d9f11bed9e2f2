"""The DALI backend: decode and augment on the GPU (`mixed` nvJPEG decode) or, on machines
without one, the same graph on the CPU (`device_id=None`).

Encoded samples enter through an external source that follows the epoch plan: it reads each
sample by offset (the converter's `.idx` for tars and RecordIO, buffer views of memory-mapped
Arrow) and hands DALI one batch as the encoded images plus ONE int32 array of text
(`ShardSet.read_batch`) and the host's augmentation draws. On the CPU graph it runs in the calling
process; on the GPU graph in DALI's worker processes (`reads_in_process`). Keys and ids never
enter the graph: the training process knows the plan and completes the `Batch` itself.

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
import multiprocessing.util
import os
import re
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.tensors import TensorListCPU

from pipelines.errors import SampleReadError, StorageError
from pipelines.faults import BadSamples
from pipelines.augment.images import decode_rgb, oriented_size
from pipelines.parent_watch import watch_in_child, watch_parent
from pipelines.plan.epoch_plan import EpochPlan
from pipelines.priority import DALI_THREADS, lower_named_threads, lower_process, thread_ids
from pipelines.schema import CONTEXT_LENGTH, Batch
from pipelines.shardset import ShardSet, position_of
from pipelines.augment.transforms import CLIP_MEAN, CLIP_STD, AugmentSpec, crop_windows, flips


PREFETCH = 2  # batches DALI prepares ahead of the one it yields
# Where the source reads: None (default) in the calling process on the CPU graph, in worker processes
# on the GPU graph; True / False force either (tests run the workers on the CPU graph).
IN_PROCESS: bool | None = None
START_METHOD: str | None = None  # of the source's workers; None: spawn on the GPU (CUDA cannot fork), else fork


def reads_in_process(cfg) -> bool:
    """Whether the external source runs in the calling process (no worker processes).

    On the CPU graph the decode threads and the reading share the same cores, and reading a
    sample (~40 µs: index, copy, tokens, crop draws) costs less than handing it over from a worker
    process: in-process the loader starts as fast as DALI's own reader (0.06 s to the first batch
    against 0.3 s with forked workers) and keeps no process to outlive it. On the GPU graph the
    calling thread also drives the model's step, so the reading moves to worker processes."""
    return cfg.device == "cpu" if IN_PROCESS is None else IN_PROCESS


def decode_threads(cfg) -> int:
    """DALI's threads. In-process, the calling thread reads the batch after next inside `run()` and
    then waits for the oldest: one thread more than `workers` keeps the cores decoding meanwhile
    (measured on 2 cores: 1.90 cores busy against 1.79, as DALI's own reader with `workers` threads;
    that reader gains nothing from a third thread)."""
    return max(1, cfg.workers) + (1 if reads_in_process(cfg) else 0)


class PlanSource:
    """Batch-mode callback for `fn.external_source(parallel=True)`. Iteration i is the i-th batch
    of the endless sequence that starts at batch `start` of `plan` and goes on through epochs
    plan.epoch + 1, + 2, ... (whole epochs, offset 0). Used by the workers (to read) and by the
    training process (to name what each batch holds), so both agree by construction.

    For training it also draws each sample's augmentation on the host (`transforms.crop_windows`
    from the image's header size, `transforms.flips`), keyed by (seed, epoch, id) as the torch
    backend draws them: the graph holds no random operator, so a pipeline rebuilt anywhere (a
    resume, another world size) crops what the uninterrupted one cropped.

    It reads images as views into the mapped shards and lets them go once DALI holds a copy: a
    worker process's batch is copied into shared memory as it returns; in the calling process
    (`in_process`) the views leave wrapped in one `TensorListCPU` (no copy), which the external
    source copies into DALI's buffers as it is fed (`no_copy=False`), before the source's next
    read. A list of arrays cost 6–8 µs a sample more: DALI checks and wraps each sample in Python,
    and the images had been copied out of the map before.

    Its worker processes die with the training process (`parent_watch`): forked ones from
    multiprocessing's after-fork hook, spawned ones when they unpickle it."""

    def __init__(self, shardset: ShardSet, plan: EpochPlan, start: int, seed: int, bad: BadSamples,
                 spec: AugmentSpec = AugmentSpec(train=False), in_process: bool = False, nice: int = 0):
        self.shardset, self.plan, self.start, self.seed, self.bad = shardset, plan, start, seed, bad
        self.spec, self.in_process, self.nice = spec, in_process, nice  # nice: a worker's, below its parent
        self.first = plan.num_batches - start  # batches left in the first epoch
        self.per_epoch = dataclasses.replace(plan, offset=0).num_batches
        self._later: EpochPlan | None = None  # the plan of the latest later epoch asked for
        self._recent: dict[int, tuple[int, np.ndarray]] = {}  # iteration -> planned(iteration)
        self._pid: int | None = None
        self._owner = os.getpid()
        # Forked workers run this at their start, before they wait on DALI's task queue: a run
        # killed before their first batch must not leave them waiting there for good.
        multiprocessing.util.register_after_fork(self, watch_in_child)

    def __setstate__(self, state):  # in a spawned worker (DALI on the GPU): watch its parent at once
        self.__dict__.update(state)
        if os.getpid() != self._owner:
            watch_parent()

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
        """(epoch, planned sample ids) of iteration i: O(batch), never the whole epoch. The last few
        are kept: in-process, the source reads iteration i and the loader names its batch a few
        `run()`s later; evaluating the permutation twice cost ~1 µs a sample of the host's ~40."""
        hit = self._recent.get(i)
        if hit is None:
            plan, b = self.position(i)
            hit = self._recent[i] = (plan.epoch, plan.batch(b))
            if len(self._recent) > 2 * (PREFETCH + 2):
                del self._recent[min(self._recent)]
        return hit

    def __call__(self, info):
        if self._pid != os.getpid():  # first call in this process
            self._pid = os.getpid()
            if self._pid != self._owner:
                # Shards without stored tokens are tokenized here, with torch ops: one thread, because a
                # forked worker entering an OpenMP region its parent had started deadlocks (libgomp).
                torch.set_num_threads(1)
                watch_parent()  # (already, from the hooks above; idempotent)
                lower_process(self.nice)  # the worker, below the training thread that started it
        epoch, ids = self.planned(info.iteration)
        try:
            ids = self.bad.apply(ids)
            images, text = self.shardset.read_batch(ids, self.seed, epoch,
                                                    position_of(epoch, self.position(info.iteration)[1]), views=True)
            draws = host_draws(self.spec, self.seed, epoch, ids, images) if self.spec.train else ()
            if self.in_process:  # views, wrapped: fed with a copy (build_pipeline: no_copy stays off)
                images = TensorListCPU(images, contiguous=False)
            return images, text, *draws
        except Exception as e:  # noqa: BLE001 - DALI passes on only the text: tag it with batch and cause
            raise RuntimeError(source_error(info.iteration, e)) from None


def host_draws(spec: AugmentSpec, seed: int, epoch: int, ids: np.ndarray, images: list):
    """The training graph's per-sample inputs: int32 anchors [B, 2] (top, left) and shapes [B, 2]
    (height, width) of the crop windows in the upright images, int32 mirror [B]."""
    windows = crop_windows(spec, seed, epoch, ids, header_sizes(images, ids)).astype(np.int32)
    anchors, shapes = np.ascontiguousarray(windows[:, :2]), np.ascontiguousarray(windows[:, 2:])  # DALI: dense only
    return anchors, shapes, flips(spec, seed, epoch, ids).astype(np.int32)


def header_sizes(images: list, ids: np.ndarray) -> np.ndarray:
    """int64 [B, 2]: (width, height) of each upright image, from its header. An image without a
    readable header is a bad sample (the torch backend cannot decode it either)."""
    sizes = np.empty((len(images), 2), np.int64)
    for k, image in enumerate(images):
        try:
            sizes[k] = oriented_size(image)
        except Exception as e:  # noqa: BLE001 - PIL raises several kinds for bytes that are no image
            raise SampleReadError(f"no image header ({type(e).__name__}: {e})", int(ids[k])) from None
    return sizes


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


def augment_graph(jpegs, spec: AugmentSpec, decode_device: str, hw_decoder_load: float,
                  anchors=None, shapes=None, mirror=None):
    """decode (+ fused crop of the host's window: `anchors` (top, left), `shapes` (height, width)
    per sample, in the upright image) → resize → flip (`mirror` per sample) → normalize, CHW float.
    No random operator: every choice arrives from the host. Without `anchors` (DALI's own readers
    in the benchmarks' bound, which have no host to ask) the crop and flip are DALI's random ones."""
    extra = {"hw_decoder_load": hw_decoder_load} if decode_device == "mixed" else {}
    mean = [255 * m for m in CLIP_MEAN]
    std = [255 * s for s in CLIP_STD]
    if spec.train:
        if anchors is None:
            images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                                   random_area=list(spec.area),
                                                   random_aspect_ratio=list(spec.aspect), **extra)
            mirror = fn.random.coin_flip(probability=0.5) if spec.flip else 0
        else:
            images = fn.decoders.image_slice(jpegs, anchors, shapes, axes=[0, 1], device=decode_device,
                                             output_type=types.RGB, **extra)
        images = fn.resize(images, resize_x=spec.size, resize_y=spec.size, antialias=True)
        return fn.crop_mirror_normalize(images, mirror=mirror, mean=mean, std=std,
                                        output_layout="CHW", dtype=types.FLOAT)
    images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **extra)
    images = fn.resize(images, resize_shorter=spec.size, interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.crop_mirror_normalize(images, crop=(spec.size, spec.size), crop_pos_x=0.5, crop_pos_y=0.5,
                                    mean=mean, std=std, output_layout="CHW", dtype=types.FLOAT)


def build_pipeline(cfg, source: PlanSource):
    gpu = cfg.device == "gpu"
    spec = cfg.augment()
    in_process = reads_in_process(cfg)
    workers = {} if in_process else {"py_num_workers": max(1, cfg.workers),
                                     "py_start_method": START_METHOD or ("spawn" if gpu else "fork")}
    # In-process the source hands over views into the maps: DALI must copy them as they are fed.
    parallel = {"no_copy": False} if in_process else {"parallel": True}

    # The seed is fixed: the graph draws nothing (see augment_graph).
    @pipeline_def(batch_size=cfg.batch_size, num_threads=decode_threads(cfg),
                  device_id=torch.cuda.current_device() if gpu else None, seed=cfg.seed,
                  prefetch_queue_depth=PREFETCH, exec_dynamic=True, **workers)
    def pipe():
        device = "mixed" if gpu else "cpu"
        if not spec.train:
            jpegs, text = fn.external_source(source, num_outputs=2, batch=True, batch_info=True,
                                             dtype=[types.UINT8, types.INT32], **parallel)
            return augment_graph(jpegs, spec, device, cfg.hw_decoder_load), text
        jpegs, text, anchors, shapes, mirror = fn.external_source(
            source, num_outputs=5, batch=True, batch_info=True,
            dtype=[types.UINT8, types.INT32, types.INT32, types.INT32, types.INT32], **parallel)
        return augment_graph(jpegs, spec, device, cfg.hw_decoder_load, anchors, shapes, mirror), text

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
        self.others: set[str] = set()  # the process's threads before this pipeline's: not its to lower

    def close(self) -> None:
        self.pipe = self.source = None  # DALI stops its workers when the pipeline goes

    def _at(self, plan: EpochPlan, start: int) -> bool:
        if self.pipe is None or len(self.bad) != self.known_bad:
            return False
        here, b = self.source.position(self.next)
        return (here.epoch, here.offset, b) == (plan.epoch, plan.offset, start)

    def _build(self, plan: EpochPlan, start: int) -> None:
        self.close()
        self.source = PlanSource(self.shardset, plan, start, self.cfg.seed, self.bad, self.cfg.augment(),
                                 reads_in_process(self.cfg), self.cfg.decode_nice)
        self.others = thread_ids()
        self.pipe, self.next, self.known_bad = build_pipeline(self.cfg, self.source), 0, len(self.bad)

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
            if self.next == 0:  # this pipeline's first run(), in which DALI starts the last of its threads
                lower_named_threads(DALI_THREADS, self.cfg.decode_nice, self.others)
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
