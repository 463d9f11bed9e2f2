"""tools/demo/make_synthetic.py: identical output, noise labels as ground truth, clean test split."""
from __future__ import annotations

import json
import re
from pathlib import Path

import ftfy
import numpy as np
import pytest
from PIL import Image

from tools.demo import make_synthetic as ms

N_TRAIN, N_TEST, SIZE = 60, 20, 64
ARGS = ["--train", str(N_TRAIN), "--test", str(N_TEST), "--size", str(SIZE)]
FRACTIONS = {"swap": 0.3, "truncate": 0.1, "offtopic": 0.1, "hashtag": 0.2, "mojibake": 0.1}


def _run(out: Path, *extra: str) -> Path:
    assert ms.main(["--out", str(out), *ARGS, *extra]) == 0
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _colors_in(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) & set(ms.COLORS)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("syn") / "a", "--workers", "2")


@pytest.fixture(scope="module")
def train(out) -> list[dict]:
    return _jsonl(out / "train.jsonl")


@pytest.fixture(scope="module")
def test_rows(out) -> list[dict]:
    return _jsonl(out / "test.jsonl")


def test_byte_identical_across_runs_and_workers(out, tmp_path):
    reference = _tree(out)
    assert len([k for k in reference if k.endswith(".jpg")]) == N_TRAIN + N_TEST
    assert _tree(_run(tmp_path / "again", "--workers", "2")) == reference
    assert _tree(_run(tmp_path / "serial", "--workers", "1")) == reference
    other = _tree(_run(tmp_path / "seed1", "--workers", "1", "--seed", "1"))
    assert other["train.jsonl"] != reference["train.jsonl"]
    assert other["images/train/000000000.jpg"] != reference["images/train/000000000.jpg"]


def test_layout_and_metadata(out, train, test_rows):
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["images", "train.jsonl", "train_syn.jsonl", "test.jsonl", "test_karpathy.json",
         "synthetic.json"])
    assert [r["key"] for r in train] == [f"syn_train_{i:09d}" for i in range(N_TRAIN)]
    assert [r["image"] for r in train] == [f"images/train/{i:09d}.jpg" for i in range(N_TRAIN)]
    assert [r["key"] for r in test_rows] == [f"syn_test_{i:09d}" for i in range(N_TEST)]
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["version"] == ms.SYNTHETIC_VERSION
    assert meta["counts"] == {"train": N_TRAIN, "test": N_TEST}
    assert meta["args"]["fractions"] == FRACTIONS and meta["args"]["size"] == SIZE
    assert meta["noise"] == {k: sum(r["noise"] == k for r in train) for k in meta["noise"]}
    assert sum(meta["noise"].values()) == N_TRAIN


def test_noise_fractions_respected(train):
    counts = {k: sum(r["noise"] == k for r in train) for k in (*ms.NOISE_KINDS, "clean")}
    for kind, frac in FRACTIONS.items():
        assert abs(counts[kind] - frac * N_TRAIN) <= 1, counts
    assert counts["clean"] == N_TRAIN - sum(counts[k] for k in ms.NOISE_KINDS)


@pytest.mark.parametrize("n", [1, 2, 7, 59, 1000])
def test_plan_noise_exact_counts(n):
    labels = ms.plan_noise(n, FRACTIONS, seed=3)
    assert len(labels) == n and set(labels) <= {*ms.NOISE_KINDS, "clean"}
    for kind, frac in FRACTIONS.items():
        assert abs(labels.count(kind) - frac * n) < 1
    assert ms.plan_noise(n, FRACTIONS, seed=3) == labels


def test_noise_labels_match_raw_text(train):
    for i, r in enumerate(train):
        cap, before, kind = r["caption"], r["caption_before_noise"], r["noise"]
        assert (r["swapped_with"] is not None) == (kind == "swap"), r
        if kind == "swap":
            j = r["swapped_with"]
            assert j != i and cap == train[j]["caption_before_noise"]
            own = {(s["color"], s["kind"]) for s in r["shapes"]}
            assert own.isdisjoint((s["color"], s["kind"]) for s in train[j]["shapes"])
        elif kind == "mojibake":
            assert cap != before and not before.isascii()
            assert ftfy.fix_text(cap) == before
        elif kind == "truncate":
            assert 1 <= len(cap.split()) <= 3 and len(cap) < len(before)
            assert before.startswith(cap)
        elif kind == "offtopic":
            assert all(part in ms.OFFTOPIC for part in cap.split(" - "))
            assert not _colors_in(cap)
        elif kind == "hashtag":
            assert cap.startswith(before + " ")
            tags = cap[len(before):].split()
            assert 2 <= len(tags) <= 4 and all(t.startswith("#") for t in tags)
        else:
            assert kind == "clean" and cap == before


def test_every_mojibake_template_is_repaired_by_ftfy():
    for template in ms.ACCENT_TEMPLATES:
        text = template.format(x="two red circles", n=1234, t="striped")
        for codec in ("cp1252", "latin-1"):
            broken = text.encode("utf-8").decode(codec)
            assert broken != text and ftfy.fix_text(broken) == text


def test_texts_before_noise_are_accurate(train, out):
    syn = _jsonl(out / "train_syn.jsonl")
    assert [s["key"] for s in syn] == [r["key"] for r in train]
    for r, s in zip(train, syn):
        present = {g["color"] for g in r["shapes"]}
        assert _colors_in(r["caption_before_noise"]) <= present
        assert _colors_in(r["description"]) == present
        assert 1 <= len(s["caption"]) <= 2 and len(set(s["caption"])) == len(s["caption"])
        for caption in s["caption"]:
            assert all(g["color"] in caption and g["kind"] in caption for g in r["shapes"])


def test_images_decode_and_match_shapes(out, train, test_rows):
    palette = np.array(list(ms.COLORS.values()))
    names = list(ms.COLORS)
    for r in train + test_rows:
        with Image.open(out / r["image"]) as im:
            assert im.format == "JPEG" and im.size == (r["width"], r["height"])
            pixels = np.asarray(im.convert("RGB"), dtype=np.int64)
        assert SIZE <= r["width"] <= 1.5 * SIZE and SIZE <= r["height"] <= 1.5 * SIZE
        assert 1 <= sum(g["count"] for g in r["shapes"]) <= 3
        for g in r["shapes"]:
            assert len(g["centers"]) == g["count"]
            assert g["kind"] in ms.KINDS and g["size"] in ("small", "large")
            for cx, cy in g["centers"]:
                assert ms.position_of(cx / r["width"], cy / r["height"]) == g["position"]
                nearest = names[int(np.argmin(((palette - pixels[int(cy), int(cx)]) ** 2).sum(1)))]
                assert nearest == g["color"], (r["key"], g)


def test_test_split_captions_are_clean(out, test_rows):
    for r in test_rows:
        caps = r["caption"]
        assert r["noise"] == "clean" and r["swapped_with"] is None
        assert 1 <= len(caps) <= 5 and len(set(caps)) == len(caps) and caps[0] == r["description"]
        for caption in caps:
            assert caption.isascii() and "#" not in caption
            assert all(g["color"] in caption and g["kind"] in caption for g in r["shapes"])
    every = [c for r in test_rows for c in r["caption"]]
    assert len(set(every)) == len(every)  # no caption belongs to two test images
    karpathy = json.loads((out / "test_karpathy.json").read_text())
    assert karpathy == [{"image": r["image"], "caption": r["caption"]} for r in test_rows]
    assert all((out / k["image"]).is_file() for k in karpathy)


def test_test_captions_unique_by_redraw_and_drop():
    recs = [{"description": "a", "captions": ["a", "p", "q"]},
            {"description": "a", "captions": ["a", "p"]},
            {"description": "b", "captions": ["b", "q", "r"]}]
    ms.unique_test_captions(recs, lambda i, redraw: {"description": f"new{redraw}",
                                                      "captions": [f"new{redraw}", "p"]})
    assert [r["captions"] for r in recs] == [["a"], ["new1"], ["b", "r"]]


@pytest.mark.parametrize("bad", [["--swap-fraction", "0.9"], ["--hashtag-fraction", "-0.1"],
                                 ["--train", "1"], ["--workers", "0"]])
def test_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(SystemExit):
        ms.main(["--out", str(tmp_path / "x"), *ARGS, *bad])


def test_plain_alt_style_names_every_group_and_changes_only_the_raw_texts(out, train, tmp_path):
    plain_out = _run(tmp_path / "plain", "--workers", "1", "--alt-style", "plain")
    plain = _jsonl(plain_out / "train.jsonl")
    assert [r["noise"] for r in plain] == [r["noise"] for r in train]
    assert [r["description"] for r in plain] == [r["description"] for r in train]
    assert (plain_out / "images/train/000000007.jpg").read_bytes() == (out / "images/train/000000007.jpg").read_bytes()
    for r in plain:
        alt = r["caption_before_noise"]
        assert _colors_in(alt) == {s["color"] for s in r["shapes"]}, alt  # every group, nothing false
        assert not re.search(r"\d", alt), alt  # no camera file names
    assert json.loads((plain_out / "synthetic.json").read_text())["args"]["alt_style"] == "plain"


def test_caption_alt_style_is_a_paraphrase_other_than_the_synthetic_captions(tmp_path):
    out = _run(tmp_path / "caption", "--workers", "1", "--alt-style", "caption")
    syn = {r["key"]: r["caption"] for r in _jsonl(out / "train_syn.jsonl")}
    for r in _jsonl(out / "train.jsonl"):
        alt = r["caption_before_noise"]
        assert alt not in syn[r["key"]] and _colors_in(alt) == {s["color"] for s in r["shapes"]}, alt
        if r["noise"] == "clean":
            assert alt == r["caption"] and alt.endswith(".")
