"""Decoding an image for the model outside DALI, with DALI's result: the torch backend and the
evaluation's file reader use it, so a photo reaches the model the same way whichever path reads it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# PIL's modes for 16-bit greyscale ("I": what older Pillows, and some TIFFs, give for it).
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_rgb(src: bytes | bytearray | memoryview | np.ndarray | str | os.PathLike) -> Image.Image:
    """Encoded image bytes (or a file path) → an upright 8-bit RGB PIL image, as DALI's
    `fn.decoders.image(output_type=RGB)` decodes it:
    - the EXIF orientation tag (1–8) is applied, as DALI's `adjust_orientation` does by default;
    - 16-bit greyscale is scaled, round(v · 255 / 65535), where PIL's `convert("RGB")` clips
      every value above 255 to white;
    - greyscale, palette, CMYK, RGBA and LA come out as PIL converts them (alpha dropped, not
      composited), which is what DALI gives (checked in tests/test_images_cli.py).
    Raises PIL's errors (`UnidentifiedImageError`, `OSError`) for bytes that do not decode.
    """
    if isinstance(src, (str, os.PathLike)):
        src = Path(src).read_bytes()  # bytes, not a file: nothing stays open after decoding
    im = Image.open(io.BytesIO(src))
    ImageOps.exif_transpose(im, in_place=True)  # loads the pixels; a no-op without the tag
    if im.mode in _WIDE_GREY:
        grey = np.asarray(im).astype(np.int64).clip(0, 65535)
        grey = ((grey + 128) // 257).astype(np.uint8)  # = round(v / 257): DALI's rounding, exactly
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if im.mode == "PA":  # PIL has no direct PA → RGB
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")
