"""What the converter does to each image: check it, optionally resize and re-encode it.

Every rejection raises `SkipSample(reason)`; the converter counts reasons, never crashes on them.
Reasons: missing_file, empty_file, not_image, too_large, truncated, decode_error.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

# Our own pixel limit replaces Pillow's warning/error pair so that the reason is counted, not logged.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
PASSTHROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImagePolicy:
    """resize: shorter side in pixels (keep ratio, never upscale), None = keep the bytes as they are.
    quality: JPEG quality when re-encoding. max_pixels: width*height above this is skipped."""

    resize: int | None = None
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS

    def as_dict(self) -> dict:
        return {"resize_mode": "keep_ratio" if self.resize else "no", "resize_short_side": self.resize,
                "jpeg_quality": self.quality, "max_pixels": self.max_pixels, "upscale": False}


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
            im = im.resize(size, Image.BICUBIC, reducing_gap=3.0)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=policy.quality)
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "decode_error"
        raise SkipSample(reason, str(e)) from e
    except Exception as e:  # noqa: BLE001
        raise SkipSample("decode_error", str(e)) from e
    return StoredImage(out.getvalue(), "jpg", im.size[0], im.size[1], w, h)
