"""tools/bench/bench_convert.py --quick: every tool and peer really converts the shared photos and gets
timed; the torch resize backend it compares is checked here too (tools/convert/image_policy.py)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.bench import bench_convert
from tools.convert import make_shards
from tools.convert.image_policy import ImagePolicy, process_image

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FOLDERS = [DATA / "flickr8k-1k" / "images", DATA / "coco-mini" / "train2017", DATA / "coco-mini" / "val2017"]


@pytest.mark.slow  # start-ups dominate (img2dataset ~10 s, each peer its own): ~20 s, 60 images as 200
@pytest.mark.skipif(not all(f.is_dir() for f in FOLDERS),
                    reason=f"shared photos absent ({DATA}; see shared/data/README.md)")
def test_quick_run_times_every_tool_and_peer(tmp_path, capsys):
    pytest.importorskip("img2dataset", reason="img2dataset is the baseline: pip install -e '.[test]'")
    out = tmp_path / "convert.json"
    scratch = tmp_path / "scratch"
    assert bench_convert.main(["--quick", "--images", *map(str, FOLDERS), "--out", str(out),
                               "--scratch", str(scratch), "--quality-check", "3"]) == 0
    res = json.loads(out.read_text())
    assert set(res["tools"]) == {"make-shards", "make-shards (torch)", "img2dataset", "mds", "litdata"}
    for name, r in res["tools"].items():
        assert r["images"] == 200, name
        assert r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0, name
        assert r["ratio_to_img2dataset"] > 0, name
    assert res["tools"]["img2dataset"]["ratio_to_img2dataset"] == 1.0
    assert res["ratio"] == res["tools"]["make-shards"]["ratio_to_img2dataset"]
    bound = res["bound"]
    assert bound["images_per_cpu_s"] > 0 and bound["resized"] + bound["passed_through"] == 200
    assert set(res["bounds"]) == {"pillow", "torch"} and res["bounds"]["pillow"] == bound
    q = res["quality_check"]
    assert q["photos"] == 3 and q["decode_ms_median"] > 0 and q["encode_ms_median"] > 0
    assert q["backends"]["pillow"]["stored_vs_pillow"] == 99.0  # identical to itself
    for b in ("pillow", "torch"):  # both bicubic: close to LANCZOS, and to each other
        assert q["backends"][b]["vs_lanczos"] > 38 and q["backends"][b]["resize_ms_median"] > 0
    assert q["backends"]["torch"]["stored_vs_pillow"] > 40
    assert res["machine"]["nproc"] >= 1 and res["machine"]["packages"]["img2dataset"]
    # The shuffled prefix mixes both sets: Flickr thumbnails pass through, COCO photos get resized.
    assert bound["resized"] > 0 and bound["passed_through"] > 0
    # Both outputs really hold the 200 images (the tool checks it; this checks what it checked).
    assert json.loads((scratch / "ms_out" / "wds" / "stats.json").read_text())["written"] == 200
    assert sum(json.loads(p.read_text())["successes"]
               for p in (scratch / "i2d_out").glob("*_stats.json")) == 200
    assert json.loads((scratch / "ms_out_torch" / "wds" / "stats.json").read_text())["written"] == 200
    assert json.loads((scratch / "ms_out_torch" / "wds" / "manifest.json").read_text()
                      )["image_policy"]["resize_backend"] == "torch"
    assert (scratch / "mds_out" / "index.json").exists() and (scratch / "litdata_out" / "index.json").exists()
    table = capsys.readouterr().out
    assert "| make-shards | 200 |" in table and "img2dataset (threads=16)" in table
    assert "| Mosaic MDSWriter | 200 |" in table and "| LitData optimize | 200 |" in table
    assert "Bound, pillow resize" in table and "| torch |" in table


def test_missing_image_folder_is_an_error(tmp_path, capsys):
    assert bench_convert.main(["--quick", "--images", str(tmp_path / "nope"),
                               "--out", str(tmp_path / "x.json")]) == 1
    assert "no such image folder" in capsys.readouterr().err


def test_unknown_peer_or_backend_is_a_usage_error(tmp_path, capsys):
    assert bench_convert.main(["--quick", "--peers", "webdataset", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown resize backend or peer ['webdataset']" in capsys.readouterr().err


def photo(w: int = 640, h: int = 480, seed: int = 0) -> bytes:
    """A JPEG with detail at every scale (noise over gradients), so resize filters differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", quality=95)
    return out.getvalue()


def test_torch_resize_backend_matches_pillow_quality_and_is_deterministic():
    data = photo()
    pil = process_image(data, ImagePolicy(256, 95))
    tor = process_image(data, ImagePolicy(256, 95, resize_backend="torch"))
    assert (tor.width, tor.height) == (pil.width, pil.height) == (341, 256) and tor.ext == "jpg"
    assert tor.data != pil.data  # another resampler: other bytes...
    a, b = (np.asarray(Image.open(io.BytesIO(x.data)), np.float64) for x in (pil, tor))
    assert 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)) > 35  # ...but the same picture
    assert process_image(data, ImagePolicy(256, 95, resize_backend="torch")).data == tor.data
    small = photo(200, 150)  # nothing to resize: passed through whatever the backend
    assert process_image(small, ImagePolicy(256, resize_backend="torch")).data == small
    assert ImagePolicy(256, resize_backend="torch").as_dict()["resize_backend"] == "torch"
    with pytest.raises(ValueError, match="unknown resize backend 'cv2'"):
        ImagePolicy(256, resize_backend="cv2")


def test_make_shards_records_the_resize_backend_and_resume_never_mixes(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(photo(seed=i))
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"image": str(tmp_path / f"{i}.jpg"), "caption": f"photo {i}"}) + "\n"
                             for i in range(3)))
    args = ["--source", "table", "--input", str(table), "--image-column", "image", "--caption-column",
            "caption", "--out", str(tmp_path / "out"), "--resize", "128", "--workers", "1", "--quiet"]
    assert make_shards.main(args + ["--resize-backend", "torch"]) == 0
    manifest = json.loads((tmp_path / "out" / "wds" / "manifest.json").read_text())
    assert manifest["image_policy"]["resize_backend"] == "torch"
    assert manifest["arguments"]["resize_backend"] == "torch"
    assert make_shards.main(args + ["--resume"]) == 2  # the default, pillow, is another conversion
    assert "differs in resize_backend" in capsys.readouterr().err
    assert make_shards.main(args + ["--resize-backend", "torch", "--resume"]) == 0


@pytest.mark.slow  # ~12 s on 2 cores: img2dataset's start-up (~9 s) and building 12 large photos
@pytest.mark.skipif(not all(f.is_dir() for f in FOLDERS[1:]),
                    reason=f"shared photos absent ({DATA}; see shared/data/README.md)")
def test_quick_large_photos_run_builds_the_set_once_and_times_both_tools(tmp_path, capsys):
    pytest.importorskip("img2dataset", reason="img2dataset is the baseline: pip install -e '.[test]'")
    out = tmp_path / "convert.json"
    argv = ["--quick", "--photos", "large", "--large-from", *map(str, FOLDERS[1:]), "--out", str(out),
            "--peers", "none", "--resize-backends", "pillow", "--quality-check", "2"]
    assert bench_convert.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["config"]["photos"] == "large" and res["config"]["count"] == 40
    assert res["config"]["distinct_images"] == 12 and set(res["tools"]) == {"make-shards", "img2dataset"}
    assert res["bound"]["resized"] == 40  # every large photo gets resized
    built = sorted((tmp_path / "large_photos").glob("large_*.jpg"))
    assert len(built) == 12 and all(min(Image.open(p).size) >= 1024 for p in built)
    d = res["quality_check"]["draft"]
    # Both decodes are timed; which is faster is the benchmark's claim (docs/benchmarks.md), not a test's.
    assert d["decode_full_ms_median"] > 0 and res["quality_check"]["decode_ms_median"] > 0
    assert d["stored_vs_full_decode_min"] >= 38
    assert "JPEG draft on 2 photos" in capsys.readouterr().out
