"""Augmentation that resumes (issue 26, fault 10): every random choice of both backends is a pure
function of (seed, epoch, sample id) and the image's size, drawn on the host.

1. `crop_windows` is torchvision's RandomResizedCrop algorithm fed keyed draws; a window does not
   depend on the batch it is computed in; flips are a fair coin per (seed, epoch, id).
2. `oriented_size` reads from the header what `decode_rgb` decodes (EXIF orientation applied).
3. The backends crop the same windows of the same samples (their pixels differ by resampling
   only), and a DALI loader resumed mid-epoch, at another world size or with other workers, gives
   every sample the very pixels the uninterrupted epoch gave it.
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.augment.images import decode_rgb, oriented_size
from pipelines.loader import LoaderConfig, build_loader
from pipelines.augment.transforms import TRIES, AugmentSpec, _uniform, _CROP, crop_windows, flips
from tools.convert import make_shards

SPEC = AugmentSpec(size=32)


def torchvision_window(seed: int, epoch: int, gid: int, width: int, height: int, spec: AugmentSpec):
    """torchvision's `RandomResizedCrop.get_params`, line for line, with its RNG calls replaced by
    the keyed draws (`torch.empty(1).uniform_(a, b)` = a + (b - a)·u, `randint(0, n)` = ⌊u·n⌋)."""
    def u(t, k):
        return float(_uniform(seed, epoch, np.array([gid]), _CROP, t, k)[0])

    area = height * width
    log_ratio = (math.log(spec.aspect[0]), math.log(spec.aspect[1]))
    for t in range(TRIES):
        target_area = area * (spec.area[0] + (spec.area[1] - spec.area[0]) * u(t, 0))
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u(t, 1))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return math.floor(u(t, 2) * (height - h + 1)), math.floor(u(t, 3) * (width - w + 1)), h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(spec.aspect):
        w, h = width, int(round(width / min(spec.aspect)))
    elif in_ratio > max(spec.aspect):
        h, w = height, int(round(height * max(spec.aspect)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# --- 1. the draws -----------------------------------------------------------------------------------

def test_crop_windows_are_torchvisions_algorithm():
    rng = np.random.default_rng(0)
    # Ordinary photos, squares (often need several tries), and extreme shapes (the fallback).
    sizes = np.concatenate([rng.integers(16, 800, (300, 2)), np.full((20, 2), 64),
                            [[1000, 10], [10, 1000], [1, 1], [3, 2], [2, 3], [500, 499]]])
    ids = rng.integers(0, 2 ** 40, len(sizes))
    for spec in (SPEC, AugmentSpec(area=(0.08, 1.0), aspect=(3 / 4, 4 / 3))):
        got = crop_windows(spec, 5, 3, ids, sizes)
        want = [torchvision_window(5, 3, int(g), int(w), int(h), spec) for g, (w, h) in zip(ids, sizes)]
        assert got.tolist() == [list(x) for x in want]
        top, left, h, w = got.T
        assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
        assert (top + h <= sizes[:, 1]).all() and (left + w <= sizes[:, 0]).all()
    fallback = crop_windows(SPEC, 5, 3, [7, 8], [[1000, 10], [10, 1000]])
    assert fallback.tolist() == [[0, 494, 10, 12], [494, 0, 12, 10]]  # centred, aspect clamped


def test_a_window_depends_on_seed_epoch_id_and_size_only():
    ids = np.arange(50, 114)
    sizes = np.stack([300 + ids % 7 * 20, 280 + ids % 5 * 20], axis=1)  # photo-like: no fallback
    whole = crop_windows(SPEC, 1, 2, ids, sizes)
    one_by_one = np.concatenate([crop_windows(SPEC, 1, 2, ids[k:k + 1], sizes[k:k + 1]) for k in range(len(ids))])
    reversed_ = crop_windows(SPEC, 1, 2, ids[::-1], sizes[::-1])[::-1]
    assert np.array_equal(whole, one_by_one) and np.array_equal(whole, reversed_)
    for other in (crop_windows(SPEC, 2, 2, ids, sizes), crop_windows(SPEC, 1, 3, ids, sizes)):
        assert (other != whole).any(axis=1).mean() > 0.9  # another seed or epoch: other windows


def test_flips_are_a_fair_coin_per_sample_and_off_when_asked():
    ids = np.arange(4000)
    f = flips(SPEC, 0, 0, ids)
    assert f.dtype == bool and abs(f.mean() - 0.5) < 0.03
    assert np.array_equal(f[100:200], flips(SPEC, 0, 0, ids[100:200]))
    assert (f != flips(SPEC, 0, 1, ids)).mean() > 0.4
    assert not flips(AugmentSpec(flip=False), 0, 0, ids).any()
    assert not flips(AugmentSpec(train=False), 0, 0, ids).any()


# --- 2. image sizes from the header -----------------------------------------------------------------

def encoded(fmt: str, mode: str = "RGB", orientation: int | None = None, size=(40, 24), **kw) -> bytes:
    im = Image.new(mode, size, 90 if mode in ("L", "I;16") else None)
    if mode == "RGB":
        im.paste((200, 10, 10), (0, 0, 8, 4))  # a corner mark: orientation visible in the pixels
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


CASES = {
    **{f"jpeg-orientation-{o}": encoded("JPEG", orientation=o) for o in range(1, 9)},
    "jpeg-progressive": encoded("JPEG", progressive=True),
    "jpeg-grey": encoded("JPEG", "L"),
    "jpeg-cmyk": encoded("JPEG", "CMYK"),
    "jpeg-odd-size": encoded("JPEG", size=(333, 17)),
    "png": encoded("PNG"),
    "png-orientation-6": encoded("PNG", orientation=6),
    "png-16bit-grey": encoded("PNG", "I;16"),
    "webp": encoded("WEBP"),
}


@pytest.mark.parametrize("case", CASES)
def test_oriented_size_is_the_decoded_size(case):
    data = CASES[case]
    assert oriented_size(data) == decode_rgb(data).size
    view = np.frombuffer(b"\0" * 5 + data, np.uint8)[5:]  # the loader passes numpy views of mapped shards
    assert oriented_size(view) == decode_rgb(data).size


def test_oriented_size_rejects_what_is_no_image():
    for junk in (b"", b"not an image at all", b"\xff\xd8\xff\xe0\x00\x10JFIF"):
        with pytest.raises(Exception):
            oriented_size(junk)


# --- 3. both backends, and DALI's resume --------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(shared_data, tmp_path_factory) -> str:
    """The first 48 Flickr8k photos (mixed sizes and aspects), first caption each, 8 per wds shard."""
    root = tmp_path_factory.mktemp("augment_photos")
    src = shared_data / "flickr8k-1k"
    with open(src / "captions.txt", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    first = {}
    for r in rows:
        first.setdefault(r["image"], r["caption"])
    with open(root / "captions.txt", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([name, first[name]] for name in sorted(first)[:48])
    assert make_shards.main(["--source", "flickr", "--input", str(root / "captions.txt"), "--images-root",
                             str(src / "images"), "--format", "wds", "--out", str(root / "out"), "--tokenize",
                             "--samples-per-shard", "8", "--workers", "1", "--quiet"]) == 0
    return str(root / "out" / "wds")


def epoch_images(folder: str, backend: str, epoch: int = 1, **kw) -> tuple[list[int], torch.Tensor]:
    kw = {"batch_size": 4, "image_size": 48, "workers": 1, "seed": 3, **kw}
    loader = build_loader(LoaderConfig(shards=folder, format="wds", backend=backend, device="cpu", **kw))
    loader.set_epoch(epoch)
    batches = list(loader)
    loader.close()
    return [int(g) for b in batches for g in b.ids], torch.cat([b.images for b in batches])


def test_backends_crop_the_same_windows(photos):
    """Same samples, same windows and flips: the images differ by resampling only. Measured on these
    48 photos at 48 px: mean |DALI - torch| 0.031, worst image 0.065 (normalized units; DALI resizes
    with its linear antialiasing filter, torchvision with PIL's bicubic); the same sample under
    another seed (another window, another flip) differs by 0.48 on average."""
    ids, dali = epoch_images(photos, "dali")
    ids_t, tv = epoch_images(photos, "torch")
    assert ids == ids_t
    mad = (dali - tv).abs().mean(dim=(1, 2, 3))
    assert mad.mean() < 0.05 and mad.max() < 0.1, (mad.mean(), mad.max())
    ids_o, other = epoch_images(photos, "torch", seed=4)
    by_id = dict(zip(ids_o, other))
    far = torch.stack([(dali[k] - by_id[g]).abs().mean() for k, g in enumerate(ids)])
    assert far.mean() > 4 * mad.mean() and far.mean() > 0.15, far.mean()


def test_dali_resume_gives_every_sample_its_pixels(photos):
    """Mid-epoch resume (a new pipeline at batch 3), another world size (elastic: 1 → 2 ranks),
    other worker counts: each sample's image is bit-identical to the uninterrupted epoch's."""
    ids, full = epoch_images(photos, "dali", workers=2)
    want = dict(zip(ids, full))
    cfg = LoaderConfig(shards=photos, format="wds", backend="dali", device="cpu", batch_size=4, image_size=48,
                       workers=2, seed=3)
    first = build_loader(cfg)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    it.close()
    first.close()
    got = {int(g): im for b in head for g, im in zip(b.ids, b.images)}
    for rank in range(2):
        resumed = build_loader(LoaderConfig(**{**cfg.__dict__, "rank": rank, "world_size": 2, "workers": 1,
                                               "drop_last": None, "shuffle": None}))
        resumed.load_state_dict(state)
        for b in resumed:
            got.update({int(g): im for g, im in zip(b.ids, b.images)})
        resumed.close()
    assert set(got) <= set(want) and len(got) >= len(want) - 8  # elastic: a remainder may drop
    for g, im in got.items():
        assert torch.equal(im, want[g]), g


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_an_image_without_a_header_is_a_bad_sample(tmp_path, backend):
    """DALI's workers read each size from the header before anything decodes: bytes that are no
    image are a bad sample there too (named, substituted under skip), as the torch backend finds."""
    import tarfile

    from pipelines.errors import SampleError
    from test_loader_faults import N, PER_TAR, epoch, expected, jpeg, loader

    folder = tmp_path / "wds"
    folder.mkdir()
    for t in range(N // PER_TAR):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(t * PER_TAR, (t + 1) * PER_TAR):
                for ext, payload in (("jpg", b"no image here" if i == 13 else jpeg(4 * i)), ("txt", b"photo")):
                    info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    skip = loader(folder, backend, on_error="skip")
    want = expected(skip, {13})
    assert epoch(skip) == want and sorted(skip.bad.found) == [13]
    assert "no image header" in skip.bad.found[13] or backend == "torch"
    with pytest.raises(SampleError, match=r"00001\.tar: sample s0013: image does not decode"):
        epoch(loader(folder, backend, shuffle=False))
