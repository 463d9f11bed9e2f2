"""What the converter does to each image: check it, optionally resize and re-encode it.

Every rejection raises `SkipSample(reason)`; the converter counts reasons, never crashes on them.
Reasons: missing_file, empty_file, not_image, too_large, truncated, decode_error.

Resize backends (both bicubic, antialiased, after the same Pillow decode, DCT draft and EXIF
rotation, and before the same Pillow JPEG encode):
- pillow: Pillow's scalar `resize(BICUBIC, reducing_gap=3.0)`, the default;
- torch: `torch.nn.functional.interpolate(mode="bicubic", antialias=True)` on the uint8 image,
  torch's vectorised (AVX2) uint8 kernel: several times faster per resize, as close to a LANCZOS
  reference (docs/benchmarks.md), but not the same bytes; deterministic for one torch build and CPU
  instruction set. The backend is part of the policy, so make-shards --resume never mixes them.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Our own pixel limit replaces Pillow's warning/error pair so that the reason is counted, not logged.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
PASSTHROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
RESIZE_BACKENDS = ("pillow", "torch")


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImagePolicy:
    """resize: shorter side in pixels (keep ratio, never upscale), None = keep the bytes as they are.
    quality: JPEG quality when re-encoding. max_pixels: width*height above this is skipped.
    resize_backend: pillow or torch (see the module's docstring)."""

    resize: int | None = None
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize_backend: str = "pillow"

    def __post_init__(self):
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(f"unknown resize backend {self.resize_backend!r}; use one of {', '.join(RESIZE_BACKENDS)}")
        if self.resize_backend == "torch":
            _torch()  # imported here, in the parent: forked workers inherit it instead of each paying ~2 s

    def as_dict(self) -> dict:
        return {"resize_mode": "keep_ratio" if self.resize else "no", "resize_short_side": self.resize,
                "jpeg_quality": self.quality, "max_pixels": self.max_pixels, "upscale": False,
                "resize_backend": self.resize_backend, "resize_filter": "bicubic, antialiased"}


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


def torch_resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """RGB image → RGB image of `size` (w, h) by torch's antialiased bicubic uint8 kernel."""
    torch = _torch()
    with warnings.catch_warnings():  # Pillow's array is read-only; torch warns, but only reads it
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.asarray(im)).permute(2, 0, 1).unsqueeze(0)
    # Channels-last in (the HWC array as is): the layout torch's vectorised uint8 kernel takes.
    y = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True)[0].numpy()
    # Out comes planar (CHW): Pillow merges the three planes ten times faster than a transposing copy.
    return Image.merge("RGB", [Image.fromarray(plane) for plane in y])


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
        if needs_resize:
            # JPEG DCT scaling decodes at 1/2..1/8 when that still covers the target short side.
            im.draft("RGB", (policy.resize, policy.resize))
        # In place and convert only when needed: each copy of a decoded 640x480 photo costs about
        # a tenth of the whole conversion, and the pixels (and so the bytes) come out the same.
        ImageOps.exif_transpose(im, in_place=True)
        if im.mode != "RGB":
            im = im.convert("RGB")
        short = min(im.size)
        if needs_resize and short > policy.resize:
            scale = policy.resize / short
            size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
            im = torch_resize(im, size) if policy.resize_backend == "torch" else \
                im.resize(size, Image.BICUBIC, reducing_gap=3.0)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=policy.quality)
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "decode_error"
        raise SkipSample(reason, str(e)) from e
    except Exception as e:  # noqa: BLE001
        raise SkipSample("decode_error", str(e)) from e
    return StoredImage(out.getvalue(), "jpg", im.size[0], im.size[1], w, h)
