"""tools/bench_convert.py --quick: both tools really convert the shared photos and get timed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import bench_convert

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FOLDERS = [DATA / "flickr8k-1k" / "images", DATA / "coco-mini" / "train2017", DATA / "coco-mini" / "val2017"]


@pytest.mark.slow  # img2dataset alone spends ~10 s starting its interpreters
@pytest.mark.skipif(not all(f.is_dir() for f in FOLDERS),
                    reason=f"shared photos absent ({DATA}; see shared/data/README.md)")
def test_quick_run_times_both_tools(tmp_path, capsys):
    pytest.importorskip("img2dataset", reason="img2dataset is the baseline: pip install -e '.[test]'")
    out = tmp_path / "convert.json"
    scratch = tmp_path / "scratch"
    assert bench_convert.main(["--quick", "--images", *map(str, FOLDERS), "--out", str(out),
                               "--scratch", str(scratch)]) == 0
    res = json.loads(out.read_text())
    assert set(res["tools"]) == {"make-shards", "img2dataset"}
    for name, r in res["tools"].items():
        assert r["images"] == 200, name
        assert r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0, name
        assert r["ratio_to_img2dataset"] > 0, name
    assert res["tools"]["img2dataset"]["ratio_to_img2dataset"] == 1.0
    assert res["ratio"] == res["tools"]["make-shards"]["ratio_to_img2dataset"]
    bound = res["bound"]
    assert bound["images_per_cpu_s"] > 0 and bound["resized"] + bound["passed_through"] == 200
    assert res["machine"]["nproc"] >= 1 and res["machine"]["packages"]["img2dataset"]
    # The shuffled prefix mixes both sets: Flickr thumbnails pass through, COCO photos get resized.
    assert bound["resized"] > 0 and bound["passed_through"] > 0
    # Both outputs really hold the 200 images (the tool checks it; this checks what it checked).
    assert json.loads((scratch / "ms_out" / "wds" / "stats.json").read_text())["written"] == 200
    assert sum(json.loads(p.read_text())["successes"]
               for p in (scratch / "i2d_out").glob("*_stats.json")) == 200
    table = capsys.readouterr().out
    assert "| make-shards | 200 |" in table and "img2dataset (threads=16)" in table
    assert "Pillow bound" in table


def test_missing_image_folder_is_an_error(tmp_path, capsys):
    assert bench_convert.main(["--quick", "--images", str(tmp_path / "nope"),
                               "--out", str(tmp_path / "x.json")]) == 1
    assert "no such image folder" in capsys.readouterr().err
