"""Decoding an image for the model outside DALI, with DALI's result: the torch backend and the
evaluation's file reader use it, so a photo reaches the model the same way whichever path reads it.
"""
from __future__ import annotations

import io
import os
import struct
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


# EXIF orientations 5-8 turn the stored image by 90°: width and height swap once it is upright.
_TURNED = (5, 6, 7, 8)
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...), not DHT/JPG/DAC.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def oriented_size(src: bytes | bytearray | memoryview | np.ndarray) -> tuple[int, int]:
    """(width, height) of the image `decode_rgb` makes from these encoded bytes (EXIF orientation
    applied), read from the header only: what a crop window is drawn for before DALI decodes.
    JPEG: its markers are walked here (about a microsecond: no PIL object, no copy of a numpy
    view); other formats: PIL's header parse. Raises `ValueError` (or PIL's errors) for bytes
    without a readable header."""
    buf = memoryview(src).cast("B") if not isinstance(src, (bytes, bytearray)) else src
    if len(buf) > 3 and buf[0] == 0xFF and buf[1] == 0xD8:
        size = _jpeg_size(buf)
        if size is not None:
            return size
    im = Image.open(io.BytesIO(buf))  # header only: pixels load on first access, never here
    w, h = im.size
    return (h, w) if im.getexif().get(0x0112) in _TURNED else (w, h)


def _jpeg_size(buf) -> tuple[int, int] | None:
    """Walk the markers up to the frame header; the first APP1 Exif segment gives the orientation
    (the one PIL reads). None where the walk cannot tell (PIL decides then)."""
    pos, n, orientation = 2, len(buf), 1
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
            pos += 2
            continue
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        seg = pos + 4
        if marker in _SOF:
            if seg + 5 > n:
                return None
            height, width = struct.unpack_from(">HH", buf, seg + 1)
            if not height or not width:  # height given later (DNL): rare enough for PIL
                return None
            return (height, width) if orientation in _TURNED else (width, height)
        if marker == 0xE1 and orientation == 1 and bytes(buf[seg:seg + 6]) == b"Exif\0\0":
            orientation = _exif_orientation(buf, seg + 6, min(n, pos + 2 + length))
        pos += 2 + length
    return None


def _exif_orientation(buf, tiff: int, end: int) -> int:
    """The Orientation tag (0x0112) of IFD0 in the TIFF structure at `tiff`; 1 where absent."""
    if tiff + 8 > end:
        return 1
    order = bytes(buf[tiff:tiff + 2])
    e = "<" if order == b"II" else ">" if order == b"MM" else None
    if e is None:
        return 1
    ifd = tiff + struct.unpack_from(e + "I", buf, tiff + 4)[0]
    if ifd + 2 > end:
        return 1
    count = struct.unpack_from(e + "H", buf, ifd)[0]
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > end:
            break
        tag, kind = struct.unpack_from(e + "HH", buf, entry)
        if tag == 0x0112:
            if kind == 3:  # SHORT, as the standard has it
                return struct.unpack_from(e + "H", buf, entry + 8)[0]
            return struct.unpack_from(e + "I", buf, entry + 8)[0] if kind == 4 else 1  # LONG: PIL reads it too
    return 1
