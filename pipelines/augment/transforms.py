"""The augmentation spec both backends implement (DALI in pipelines/backends/dali.py, torchvision in
pipelines/backends/torch_loader.py), and its random choices.

Every random choice is a pure function of (seed, epoch, sample id) and the image's size: the crop
window (`crop_windows`, torchvision's RandomResizedCrop algorithm driven by keyed hashes instead
of an RNG) and the flip (`flips`). Both backends compute them on the host with the same function,
so they crop the same window of the same sample, and a run resumed at any batch, world size or
worker count draws what the uninterrupted run drew (no RNG state to carry, none to re-seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.plan.epoch_plan import mix_array

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TRIES = 10  # RandomResizedCrop's attempts before its centre-crop fallback
# Domain tags of the hashes: crop draws, flips and the caption choice (text.choose_caption, which
# hashes (seed, epoch, id) alone) never share a key.
_CROP, _FLIP = 0x63726F70, 0x666C6970
_UNIT = 2.0 ** -53
_PAIR = np.arange(2)  # the last key of two draws made in one call: (area, aspect), then (top, left)


@dataclass(frozen=True)
class AugmentSpec:
    """train: random-resized crop (area, aspect), resize to `size`, optional flip, normalize.
    eval: shorter side to `size` (bicubic), centre crop `size`, normalize."""

    size: int = 224
    train: bool = True
    area: tuple[float, float] = (0.7, 1.0)  # ALIP's crop scale
    aspect: tuple[float, float] = (0.8, 1.25)
    flip: bool = True  # off when captions say "left"/"right"


def _uniform(seed: int, epoch: int, ids: np.ndarray, *tags) -> np.ndarray:
    """float64 in [0, 1), one per id (broadcast with tags): the top 53 bits of a keyed hash."""
    return (mix_array(seed, epoch, ids, *tags) >> np.uint64(10)).astype(np.float64) * _UNIT


def crop_windows(spec: AugmentSpec, seed: int, epoch: int, ids, sizes) -> np.ndarray:
    """RandomResizedCrop's window for each sample: int64 [B, 4] as (top, left, height, width) in
    the upright image. `ids`: int [B] global sample ids; `sizes`: int [B, 2] (width, height) of
    the upright images (`images.oriented_size`, or the decoded image's size).

    torchvision's algorithm (`RandomResizedCrop.get_params`): up to TRIES draws of an area share
    uniform in `spec.area` and an aspect log-uniform in `spec.aspect`, the first whose rounded
    (w, h) fits is placed uniformly; none fits: the centre crop of the aspect clamped into range.
    The draws are hashes of (seed, epoch, id, try), never an RNG. Bit-exact whatever the batch:
    the hashes are integer arithmetic, the rest IEEE +, ×, /, √ (correctly rounded, in numpy as in
    C) and `math.exp` per element (one libm call, never numpy's vectorised exp, whose last bit may
    differ with the array's length or alignment)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    width, height = sizes[:, :1].astype(np.float64), sizes[:, 1:].astype(np.float64)  # [B, 1]
    tries = np.arange(TRIES)[None, :]
    lo_area, hi_area = spec.area
    lo_log, hi_log = math.log(spec.aspect[0]), math.log(spec.aspect[1])
    # One hash call per stage, not per draw (a call costs ~15 µs a batch in numpy's small-array
    # overhead): the hash is element-wise, so each draw equals its own call's.
    draws = _uniform(seed, epoch, ids[:, None, None], _CROP, tries[..., None], _PAIR)
    share = lo_area + (hi_area - lo_area) * draws[..., 0]
    log_ratio = lo_log + (hi_log - lo_log) * draws[..., 1]
    ratio = np.fromiter(map(math.exp, log_ratio.ravel().tolist()), np.float64, log_ratio.size).reshape(log_ratio.shape)
    target = width * height * share
    w = np.rint(np.sqrt(target * ratio))  # rint: half to even, as Python's round in torchvision
    h = np.rint(np.sqrt(target / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(len(ids))
    found = fits[rows, first]
    w, h = w[rows, first].astype(np.int64), h[rows, first].astype(np.int64)
    place = _uniform(seed, epoch, ids[:, None], _CROP, first[:, None], _PAIR + 2)
    u_top, u_left = place[:, 0], place[:, 1]
    width, height = sizes[:, 0], sizes[:, 1]
    top = np.floor(u_top * (height - h + 1)).astype(np.int64)
    left = np.floor(u_left * (width - w + 1)).astype(np.int64)
    # The fallback: the whole image cut to the nearest allowed aspect, centred.
    lo_ratio, hi_ratio = spec.aspect
    in_ratio = width / np.maximum(height, 1)
    fw = np.where(in_ratio < lo_ratio, width, np.where(in_ratio > hi_ratio, np.rint(height * hi_ratio), width))
    fh = np.where(in_ratio < lo_ratio, np.rint(width / lo_ratio), height)
    fw, fh = fw.astype(np.int64), fh.astype(np.int64)
    out = np.stack([top, left, h, w], axis=1)
    fallback = np.stack([(height - fh) // 2, (width - fw) // 2, fh, fw], axis=1)
    return np.where(found[:, None], out, fallback)


def flips(spec: AugmentSpec, seed: int, epoch: int, ids) -> np.ndarray:
    """bool [B]: which samples are mirrored (p = 0.5; never with `spec.flip` off)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if not (spec.train and spec.flip):
        return np.zeros(len(ids), bool)
    return _uniform(seed, epoch, ids, _FLIP) < 0.5
