"""What the converter does to each image: check it, optionally resize and re-encode it.

Every rejection raises `SkipSample(reason)`; the converter counts reasons, never crashes on them.
Reasons: missing_file, empty_file, not_image, too_large, truncated, decode_error.

A JPEG that needs resizing is decoded at a reduced DCT scale (libjpeg's 1/2, 1/4 or 1/8, through
Pillow's `draft`): the largest reduction that leaves the short side at least DRAFT_MARGIN × the
target, so the bicubic resize still does the last step. The output size is computed from the
full-size photo, and the resize maps the photo's exact extent in the drafted pixels, so the size is
the same with or without the draft and the pixels differ little (stored JPEGs 40 dB from a full
decode's on average, >= 37 dB, on 100 large photos: docs/benchmarks.md). `jpeg_draft=False`
decodes at full size.

Resize backends (both bicubic, antialiased, after the same Pillow decode and DCT draft, and before the
same EXIF rotation and Pillow JPEG encode):
- pillow: Pillow's scalar `resize(BICUBIC, reducing_gap=3.0)`, the default;
- torch: `torch.nn.functional.interpolate(mode="bicubic", antialias=True)` on the uint8 image,
  torch's vectorised (AVX2) uint8 kernel: several times faster per resize, as close to a LANCZOS
  reference (docs/benchmarks.md), but not the same bytes; deterministic for one torch build and CPU
  instruction set. The backend is part of the policy, so make-shards --resume never mixes them.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image

# Our own pixel limit replaces Pillow's warning/error pair so that the reason is counted, not logged.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
PASSTHROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
RESIZE_BACKENDS = ("pillow", "torch")
# The bicubic after a DCT-scaled decode must still reduce by at least this factor. With no margin a
# 1,080-px photo decodes at 1/4 to 270 px and the bicubic to 256 barely filters the scaled decode's
# block aliasing: 33.7 dB from the full decode. At 1.25 the large-photo set stays >= 41.7 dB for 9 %
# more CPU than no margin; a margin of 2 gives >= 45.9 dB for 29 % more (docs/benchmarks.md).
DRAFT_MARGIN = 1.25
# EXIF orientation → the transpose that shows the photo upright (as ImageOps.exif_transpose).
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                  6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImagePolicy:
    """resize: shorter side in pixels (keep ratio, never upscale), None = keep the bytes as they are.
    quality: JPEG quality when re-encoding. max_pixels: width*height above this is skipped.
    resize_backend: pillow or torch (see the module's docstring). jpeg_draft: decode JPEGs that
    get resized at a reduced DCT scale (see the module's docstring); False decodes at full size."""

    resize: int | None = None
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize_backend: str = "pillow"
    jpeg_draft: bool = True

    def __post_init__(self):
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(f"unknown resize backend {self.resize_backend!r}; use one of {', '.join(RESIZE_BACKENDS)}")
        if self.resize_backend == "torch":
            _torch()  # imported here, in the parent: forked workers inherit it instead of each paying ~2 s

    def as_dict(self) -> dict:
        return {"resize_mode": "keep_ratio" if self.resize else "no", "resize_short_side": self.resize,
                "jpeg_quality": self.quality, "max_pixels": self.max_pixels, "upscale": False,
                "resize_backend": self.resize_backend, "resize_filter": "bicubic, antialiased",
                "jpeg_draft": self.jpeg_draft, "jpeg_draft_margin": DRAFT_MARGIN if self.jpeg_draft else None}


@dataclass
class StoredImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


def _complete(data: bytes, fmt: str) -> bool:
    """Cheap end-of-stream check for pass-through bytes, which are not fully decoded."""
    tail = data.rstrip(b"\0\r\n ")
    if fmt == "JPEG":
        return tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" in data[-32:]
    if fmt == "WEBP":
        return len(data) >= 8 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return True


def _torch():
    import torch  # only for the torch backend: the import costs seconds

    return torch


def torch_resize(im: Image.Image, size: tuple[int, int],
                 box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """RGB image → RGB image of `size` (w, h) by torch's antialiased bicubic uint8 kernel; `box`
    (0, 0, right, bottom) as Pillow's `resize`: the region that maps onto the output."""
    torch = _torch()
    with warnings.catch_warnings():  # Pillow's array is read-only; torch warns, but only reads it
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.asarray(im)).permute(2, 0, 1).unsqueeze(0)
    # Channels-last in (the HWC array as is): the layout torch's vectorised uint8 kernel takes.
    if box is None or tuple(box[2:]) == im.size:
        y = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True)[0].numpy()
    else:
        # A box of fractional sides (a draft's): scaling by it maps pixels as Pillow's box does; the
        # output then has a row or column more than `size`, which lies outside the box.
        y = torch.nn.functional.interpolate(x, scale_factor=(size[1] / box[3], size[0] / box[2]), mode="bicubic",
                                            antialias=True, recompute_scale_factor=False)[0, :, :size[1], :size[0]]
        y = y.contiguous().numpy()
    # Out comes planar (CHW): Pillow merges the three planes ten times faster than a transposing copy.
    return Image.merge("RGB", [Image.fromarray(plane) for plane in y])


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) with the shorter side `short_side`, the ratio kept; of the full-size photo, so a
    drafted decode (whose sides are rounded up at its scale) gets the same size as a full one."""
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def draft_request(short_side: int) -> tuple[int, int]:
    """The size to pass `Image.draft` so that the decoded short side stays >= DRAFT_MARGIN × the target."""
    side = math.ceil(short_side * DRAFT_MARGIN)
    return side, side


def process_image(data: bytes, policy: ImagePolicy) -> StoredImage:
    if not data:
        raise SkipSample("empty_file")
    try:
        im = Image.open(io.BytesIO(data))
        fmt, (w, h) = im.format, im.size
    except Image.UnidentifiedImageError as e:
        raise SkipSample("not_image", str(e)) from e
    except Exception as e:  # noqa: BLE001 - any header failure is a bad file, counted as such
        raise SkipSample("decode_error", str(e)) from e
    if w * h > policy.max_pixels:
        raise SkipSample("too_large", f"{w}x{h} > {policy.max_pixels} pixels")
    needs_resize = policy.resize is not None and min(w, h) > policy.resize
    if not needs_resize and fmt in PASSTHROUGH:
        if not _complete(data, fmt):
            raise SkipSample("truncated")
        return StoredImage(data, PASSTHROUGH[fmt], w, h, w, h)
    try:
        box = None
        if needs_resize and policy.jpeg_draft:
            # The draft rounds the decoded sides up at its scale; `box` is the photo's exact extent
            # in them, so that the resize maps every pixel where a full decode would.
            drafted = im.draft("RGB", draft_request(policy.resize))  # None for other formats
            box = drafted[1] if drafted else None
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        # Convert only when needed: each copy of a decoded 640x480 photo costs about a tenth of the
        # whole conversion, and the pixels (and so the bytes) come out the same.
        if im.mode != "RGB":
            im = im.convert("RGB")
        if needs_resize:
            # Resized as stored and turned upright after: the box needs no turning, and the
            # transpose moves the small image's pixels, not the decoded ones.
            size = target_size(w, h, policy.resize)
            im = torch_resize(im, size, box) if policy.resize_backend == "torch" else \
                im.resize(size, Image.BICUBIC, box=box, reducing_gap=3.0)
        if orientation in EXIF_TRANSPOSE:
            im = im.transpose(EXIF_TRANSPOSE[orientation])
        out = io.BytesIO()
        im.save(out, "JPEG", quality=policy.quality)
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "decode_error"
        raise SkipSample(reason, str(e)) from e
    except Exception as e:  # noqa: BLE001
        raise SkipSample("decode_error", str(e)) from e
    return StoredImage(out.getvalue(), "jpg", im.size[0], im.size[1], w, h)
