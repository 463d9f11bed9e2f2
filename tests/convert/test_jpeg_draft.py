"""The JPEG draft path of tools/convert/image_policy.py: a large JPEG decoded at a reduced DCT scale
gets exactly the full decode's output size and pixels within a PSNR bound; small inputs keep their
bytes; make-shards records the choice so that --resume never mixes the two."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from tools.bench import large_photos
from tools.convert import make_shards
from tools.convert.image_policy import DRAFT_MARGIN, ImagePolicy, process_image, target_size


def photo(w: int, h: int, seed: int = 0, exif_orientation: int | None = None) -> bytes:
    """A JPEG (q95) with edges and texture at several scales, as photos have, not white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([127 + 100 * np.sin(x / (9 + 7 * c) + y / (23 - 5 * c)) for c in range(3)], -1)
    arr += (rng.random((h // 16 + 1, w // 16 + 1, 3)) * 60).repeat(16, 0).repeat(16, 1)[:h, :w]
    arr[h // 3: h // 2, w // 4: w // 2] = 30  # a sharp-edged block
    out = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def pixels(stored) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(stored.data)), np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)))


# 2050x1030: the old draft (to the target itself, sizes from the drafted photo) stored 509x256;
# the full decode, and now the draft, 510x256. 1100 px: decoded at 1/2 (4.3x the target short side:
# 1/4 would leave only 1.07x for the bicubic). The rest: odd sides at every DCT scale.
@pytest.mark.parametrize("w,h", [(2050, 1030), (1100, 1500), (2049, 1537), (1031, 4001), (3001, 2003)])
def test_draft_gives_the_full_decodes_size_and_pixels_within_the_bound(w, h):
    data = photo(w, h)
    drafted = process_image(data, ImagePolicy(256, 95))
    full = process_image(data, ImagePolicy(256, 95, jpeg_draft=False))
    assert (drafted.width, drafted.height) == (full.width, full.height) == target_size(w, h, 256)
    assert (drafted.original_width, drafted.original_height) == (w, h)
    assert drafted.data != full.data  # the draft really decoded at a reduced scale...
    assert psnr(pixels(drafted), pixels(full)) >= 38  # ...and the picture is the same


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("backend", ["pillow", "torch"])
def test_every_exif_orientation_comes_out_upright_at_the_full_decodes_size(orientation, backend):
    data = photo(2050, 1030, exif_orientation=orientation)  # 5-8: stored landscape, shown portrait
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    expected = upright.resize(target_size(*upright.size, 256), Image.LANCZOS)
    drafted, full = (process_image(data, ImagePolicy(256, 95, resize_backend=backend, jpeg_draft=d))
                     for d in (True, False))
    assert (drafted.width, drafted.height) == (full.width, full.height) == expected.size
    assert expected.size == ((510, 256) if orientation < 5 else (256, 510))
    # Upright: bicubic against LANCZOS on these hard edges is ~30 dB; a wrong turn or flip is ~12.
    assert psnr(pixels(full), np.asarray(expected, np.float64)) >= 27
    assert psnr(pixels(drafted), pixels(full)) >= 38


def test_small_inputs_are_untouched_by_the_draft():
    fits = photo(320, 256)  # already within the policy: the bytes pass through, never decoded
    assert process_image(fits, ImagePolicy(256, 95)).data == fits
    # Resized, but too small for a DCT scale that keeps DRAFT_MARGIN x the target: the full decode.
    short = int(256 * DRAFT_MARGIN * 2) - 1
    near = photo(short + 100, short)
    assert process_image(near, ImagePolicy(256, 95)).data == \
        process_image(near, ImagePolicy(256, 95, jpeg_draft=False)).data
    png = io.BytesIO()
    Image.open(io.BytesIO(photo(1200, 900))).save(png, "PNG")  # no DCT: the draft is a no-op
    assert process_image(png.getvalue(), ImagePolicy(256)).data == \
        process_image(png.getvalue(), ImagePolicy(256, jpeg_draft=False)).data
    policy = ImagePolicy(256).as_dict()
    assert policy["jpeg_draft"] is True and policy["jpeg_draft_margin"] == DRAFT_MARGIN
    assert ImagePolicy(256, jpeg_draft=False).as_dict()["jpeg_draft_margin"] is None


def test_large_coco_photos_within_the_bound(shared_data, tmp_path):
    """The bench's large photos (COCO tiled to 1,536-3,000 px): every canvas shape >= 38 dB (stored JPEG against stored JPEG)."""
    coco = [shared_data / "coco-mini" / "train2017", shared_data / "coco-mini" / "val2017"]
    paths = large_photos.build(tmp_path / "large", len(large_photos.CANVASES), coco)
    again = large_photos.build(tmp_path / "large", len(paths), coco)
    assert [p.name for p in paths] == [p.name for p in again]
    for path in paths:
        data = path.read_bytes()
        assert min(Image.open(io.BytesIO(data)).size) >= 1024
        drafted, full = (process_image(data, ImagePolicy(256, 95, jpeg_draft=d)) for d in (True, False))
        assert (drafted.width, drafted.height) == (full.width, full.height)
        assert psnr(pixels(drafted), pixels(full)) >= 38, path.name


def test_large_photos_are_built_once_and_deterministically(shared_data, tmp_path):
    coco = [shared_data / "coco-mini" / "val2017"]
    first = large_photos.build(tmp_path / "a", 2, coco)
    again = large_photos.build(tmp_path / "b", 2, coco)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    mtime = first[0].stat().st_mtime_ns
    assert large_photos.build(tmp_path / "a", 3, coco)[:2] == first and first[0].stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match="no JPEG files in .*nope"):
        large_photos.build(tmp_path / "c", 1, [tmp_path / "nope"])


def test_make_shards_records_the_draft_and_resume_never_mixes(tmp_path, capsys):
    (tmp_path / "big.jpg").write_bytes(photo(1100, 900))
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"image": str(tmp_path / "big.jpg"), "caption": "a big photo"}) + "\n")
    out = tmp_path / "out"
    args = ["--source", "table", "--input", str(table), "--image-column", "image", "--caption-column",
            "caption", "--out", str(out), "--resize", "128", "--workers", "1", "--quiet"]
    assert make_shards.main(args + ["--no-jpeg-draft"]) == 0
    manifest = json.loads((out / "wds" / "manifest.json").read_text())
    assert manifest["image_policy"]["jpeg_draft"] is False and manifest["arguments"]["jpeg_draft"] is False
    assert make_shards.main(args + ["--resume"]) == 2  # the default, the draft, is another conversion
    assert "differs in jpeg_draft" in capsys.readouterr().err
    assert make_shards.main(args + ["--no-jpeg-draft", "--resume"]) == 0
    # A plan from before the option: resized with the old draft, so not this conversion...
    plan_path = out / "wds" / ".parts" / "plan.json"
    plan = json.loads(plan_path.read_text())
    del plan["jpeg_draft"]
    plan_path.write_text(json.dumps(plan))
    assert make_shards.main(args + ["--resume"]) == 2
    assert "differs in jpeg_draft" in capsys.readouterr().err
    # ...but one that resized nothing has the same bytes whatever the draft.
    plain = [a for a in args if a not in ("--resize", "128")]
    assert make_shards.main(plain + ["--overwrite"]) == 0
    plan = json.loads(plan_path.read_text())
    del plan["jpeg_draft"]
    plan_path.write_text(json.dumps(plan))
    assert make_shards.main(plain + ["--resume"]) == 0
