"""attach-captions: shards → caption-shards → attach → verify-shards and the loader, in every
format; image bytes copied as they were; in place; CLIP scores in meta."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import build_synthetic_shards
from pipelines.formats.registry import DATA_SUFFIX, get_format
from pipelines.loader import LoaderConfig, build_loader
from pipelines.text import tokenize
from tools import attach_captions, caption_shards, make_shards, verify_shards
from tools.caption_shards import CaptionConfig

FORMATS = ("wds", "arrow", "rec")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second intra-op thread only waits
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Shards in every format, captions of a tiny random BLIP for them, and the attached copy."""
    root = tmp_path_factory.mktemp("attach")
    shards = build_synthetic_shards(root, 8, ",".join(FORMATS), 4)
    model = caption_shards.init_tiny(str(root / "tiny-blip"))
    sidecar = root / "captions.jsonl"
    caption_shards.run(CaptionConfig(shards=str(shards), model=model, num_captions=2, num_beams=2,
                                     max_new_tokens=8), str(sidecar), batch_size=4, workers=0, progress=False)
    out = root / "attached"
    assert attach_captions.main(["--shards", str(shards), "--captions", str(sidecar), "--out", str(out),
                                 "--quiet"]) == 0
    return root, shards, sidecar, out


def samples(folder: Path, fmt: str) -> list:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [s for e in manifest["files"] if e["name"].endswith(DATA_SUFFIX[fmt])
            for s in get_format(fmt).iter_samples(str(folder / e["name"]))]


def test_round_trip_to_the_loader(captioned):
    root, shards, sidecar, out = captioned
    want = {json.loads(line)["key"]: json.loads(line)["caption"] for line in sidecar.read_text().splitlines()}
    assert len(want) == 8
    for fmt in FORMATS:
        assert verify_shards.verify_folder(str(out / fmt), progress=False)["samples"] == 8
        before, after = samples(shards / fmt, fmt), samples(out / fmt, fmt)
        assert [s.key for s in before] == [s.key for s in after]
        for b, a in zip(before, after):
            assert a.image == b.image and a.txt == b.txt  # bytes copied, not re-encoded
            assert a.syn == want[a.meta["source_key"]] != b.syn
            assert {k: v for k, v in a.meta.items()} == b.meta
        stats = json.loads((out / fmt / "stats.json").read_text())
        assert stats["with_synthetic_caption"] == 8 and stats["attach_captions"]["matched"] == 8
        loader = build_loader(LoaderConfig(shards=str(out / fmt), format=fmt, backend="torch", split="eval",
                                           batch_size=4, image_size=64, workers=0))
        keys, seen = {s.key: s for s in after}, 0
        for batch in loader:
            assert bool(batch.has_syn.all())
            for key, syn in zip(batch.keys, batch.syn_tokens.numpy()):
                new = tokenize(keys[key].syn)
                assert any(np.array_equal(syn, row) for row in new)  # one of the new captions
                seen += 1
        assert seen == 8


def test_in_place_add_keeps_unmatched_and_resume(captioned, tmp_path):
    root, shards, sidecar, _ = captioned
    work = tmp_path / "shards"
    shutil.copytree(shards, work)
    first = json.loads(sidecar.read_text().splitlines()[0])
    partial = tmp_path / "one.jsonl"
    partial.write_text(json.dumps(first) + "\n")
    argv = ["--shards", str(work / "wds"), "--captions", str(partial), "--in-place", "--mode", "add", "--quiet"]
    assert attach_captions.main(argv) == 0
    assert attach_captions.main(argv) == 0  # rerunning (a killed run's fix) adds nothing twice
    verify_shards.verify_folder(str(work / "wds"), progress=False)
    before, after = samples(shards / "wds", "wds"), samples(work / "wds", "wds")
    for b, a in zip(before, after):
        extra = first["caption"] if a.meta["source_key"] == first["key"] else []
        assert a.syn == b.syn + extra and a.image == b.image
    # make-shards' completion records follow the new files: --resume keeps every shard.
    stats = make_shards.run(make_shards.config_from_args(make_shards.build_parser().parse_args(
        ["--source", "table", "--input", str(root / "syn" / "train.jsonl"), "--image-column", "image",
         "--caption-column", "caption", "--synthetic-captions", str(root / "syn" / "train_syn.jsonl"),
         "--tokenize", "--format", "wds", "--samples-per-shard", "4", "--out", str(work)])),
        str(work), workers=1, resume=True, progress=False)
    assert stats["shards_reused"] == 2


def test_bad_invocations(captioned, tmp_path, capsys):
    _, shards, sidecar, out = captioned
    assert attach_captions.main(["--shards", str(shards), "--captions", str(sidecar)]) == 2
    assert "exactly one of --out" in capsys.readouterr().err
    assert attach_captions.main(["--shards", str(shards), "--captions", str(tmp_path / "no.jsonl"),
                                 "--in-place"]) == 2
    assert "sidecar not found" in capsys.readouterr().err
    assert attach_captions.main(["--shards", str(shards), "--captions", str(sidecar), "--out", str(out)]) == 2
    assert "already holds shards" in capsys.readouterr().err


@pytest.mark.slow
def test_clip_scores_in_meta(captioned, tmp_path):
    from train.model import build_model, export_open_clip

    _, shards, sidecar, _ = captioned
    ckpt = tmp_path / "clip.pt"
    export_open_clip(build_model("lip-tiny"), str(ckpt))
    out = tmp_path / "scored"
    assert attach_captions.main(["--shards", str(shards / "arrow"), "--captions", str(sidecar), "--out", str(out),
                                 "--clip-score", str(ckpt), "--clip-model", "lip-tiny", "--quiet"]) == 0
    verify_shards.verify_folder(str(out), progress=False)
    for s in samples(out, "arrow"):
        score = s.meta["clip_score"]
        assert len(score["syn"]) == len(s.syn) == 2 and -1 <= score["txt"] <= 1 and score["model"] == "lip-tiny"
