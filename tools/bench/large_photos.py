"""Large photos for bench-convert: >= 1,024 px on the short side, built from the COCO samples.

Real datasets (CC12M, YFCC, LAION) hold camera-sized photos, and the shared samples are thumbnails
(<= 640 px). Upsampling a thumbnail would give smooth pixels that decode faster than a real large
photo; tiling keeps a photo's detail per pixel: each large photo is a grid of COCO photos, each
fitted (scaled and centre-cropped, Pillow LANCZOS) into a cell of 400-640 px, saved as JPEG quality
95 (4:2:0, as cameras write). Canvas sizes cycle over common camera and phone shapes, landscape and
portrait, from 1.5 to 6 megapixels.

Photo i is a function of i and the sorted source files alone, so the set is built once per folder
and extended, never rebuilt, when a larger one is asked for; `recipe.json` names what it was built
from, and a folder built by another recipe is rebuilt.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageOps

RECIPE_VERSION = 1
# (width, height): 3:2, 4:3 and 16:9 photos, both orientations; short sides 1,024 to 2,000 px.
CANVASES = ((1536, 1024), (2048, 1536), (1080, 1920), (3000, 2000), (1440, 1080), (1536, 2048))
CELL = 560  # target cell edge: a COCO photo keeps most of its own pixels
QUALITY = 95


def _grid(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(columns, rows, cell width, cell height) covering `size` with cells of about CELL px."""
    cols, rows = max(1, round(size[0] / CELL)), max(1, round(size[1] / CELL))
    return cols, rows, size[0] // cols, size[1] // rows


def make_photo(i: int, sources: list[Path]) -> Image.Image:
    """Large photo number i: a grid of source photos drawn by a generator seeded with i."""
    size = CANVASES[i % len(CANVASES)]
    cols, rows, cw, ch = _grid(size)
    rng = random.Random(i)
    canvas = Image.new("RGB", size)
    for r in range(rows):
        for c in range(cols):
            with Image.open(sources[rng.randrange(len(sources))]) as src:
                tile = ImageOps.fit(ImageOps.exif_transpose(src).convert("RGB"), (cw, ch), Image.LANCZOS)
            canvas.paste(tile, (c * cw, r * ch))
    # The grid's remainder (a few px at the right and bottom edges): the last cells stretched over it.
    if (cols * cw, rows * ch) != size:
        canvas = canvas.crop((0, 0, cols * cw, rows * ch)).resize(size, Image.LANCZOS)
    return canvas


def build(folder: Path, count: int, source_dirs: list[Path]) -> list[Path]:
    """The first `count` large photos in `folder`, making those not there yet. → their paths."""
    sources = sorted(p for d in source_dirs if d.is_dir() for p in d.iterdir()
                     if p.suffix.lower() in (".jpg", ".jpeg"))
    if not sources:
        raise FileNotFoundError(f"no JPEG files in {', '.join(map(str, source_dirs))} to build large photos "
                                "from; pass bench-convert --large-from with the COCO folders (shared/data/coco-mini)")
    recipe = {"version": RECIPE_VERSION, "canvases": CANVASES, "cell": CELL, "quality": QUALITY,
              "sources": [p.name for p in sources]}
    recipe = json.loads(json.dumps(recipe))  # tuples as lists, as they read back
    marker = folder / "recipe.json"
    if marker.exists() and json.loads(marker.read_text()) != recipe:
        for old in folder.glob("large_*.jpg"):
            old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(recipe) + "\n")
    paths = []
    for i in range(count):
        w, h = CANVASES[i % len(CANVASES)]
        path = folder / f"large_{i:05d}_{w}x{h}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            make_photo(i, sources).save(tmp, "JPEG", quality=QUALITY)
            tmp.rename(path)  # a killed build leaves no half-written photo under the final name
        paths.append(path)
    return paths
