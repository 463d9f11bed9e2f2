"""attach-captions: shards → caption-shards → attach → verify-shards and the loader, in every
format; image bytes copied as they were; in place; CLIP scores in meta."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import build_synthetic_shards
from kill_harness import launch, local_snapshot
from pipelines.formats.registry import DATA_SUFFIX, get_format
from pipelines.loader import LoaderConfig, build_loader
from pipelines.text import tokenize
from tools.captions import attach_captions, caption_shards
from tools.convert import make_shards, verify_shards
from tools.captions.caption_shards import CaptionConfig

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
    want = {json.loads(line)["image"]: json.loads(line)["caption"] for line in sidecar.read_text().splitlines()}
    assert len(want) == 8
    for fmt in FORMATS:
        assert verify_shards.verify_folder(str(out / fmt), progress=False)["samples"] == 8
        before, after = samples(shards / fmt, fmt), samples(out / fmt, fmt)
        assert [s.key for s in before] == [s.key for s in after]
        for b, a in zip(before, after):
            assert a.image == b.image and a.txt == b.txt  # bytes copied, not re-encoded
            assert a.syn == want[a.meta["image"]] != b.syn
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
        extra = first["caption"] if a.meta["image"] == first["image"] else []
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
    other = tmp_path / "other.jsonl"
    other.write_text(sidecar.read_text().splitlines()[0] + "\n")
    assert attach_captions.main(["--shards", str(shards), "--captions", str(other), "--out", str(out)]) == 2
    assert "holds another attach (differs in captions, captions_sha256)" in capsys.readouterr().err
    assert attach_captions.main(["--shards", str(shards), "--captions", str(sidecar), "--out", str(shards)]) == 2
    assert "is the input folder; use --in-place" in capsys.readouterr().err


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


def numbered_flat_shards(root: Path) -> tuple[Path, list[str]]:
    """Eight images `000000000.jpg` … `000000007.jpg` converted in reverse order (wds): the sample
    at input position k is the file with stem 7 - k, so every 9-digit sample key is the file stem
    of another image."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    names = [f"{i:09d}.jpg" for i in range(8)]
    for i, name in enumerate(names):
        Image.new("RGB", (24, 24), (30 * i, 255 - 30 * i, 90)).save(images / name)
    table = root / "table.jsonl"
    table.write_text("".join(json.dumps({"image": n, "caption": f"a photo named {n}"}) + "\n" for n in names[::-1]))
    shards = root / "shards"
    assert make_shards.main(["--source", "table", "--input", str(table), "--images-root", str(images),
                             "--image-column", "image", "--caption-column", "caption", "--format", "wds",
                             "--samples-per-shard", "4", "--out", str(shards), "--workers", "1", "--quiet"]) == 0
    return shards, names


def test_a_sample_key_never_fetches_another_images_captions(tmp_path, capsys):
    """A sidecar keyed by file stem (what caption-shards wrote before) with lines for half the
    images: the others must stay unmatched, not take the line whose stem equals their sample key."""
    shards, names = numbered_flat_shards(tmp_path)
    sidecar = tmp_path / "by-stem.jsonl"
    sidecar.write_text("".join(json.dumps({"key": n[:-4], "caption": [f"synthetic caption of {n}"]}) + "\n"
                               for n in names[::2]))
    out = tmp_path / "out"
    argv = ["--shards", str(shards), "--captions", str(sidecar), "--out", str(out), "--quiet"]
    assert attach_captions.main(argv) == 0
    got = samples(out / "wds", "wds")
    assert len(got) == 8
    for s in got:
        own = int(s.meta["image"][:-4]) % 2 == 0
        assert s.syn == ([f"synthetic caption of {s.meta['image']}"] if own else []), (s.key, s.meta["image"], s.syn)
    assert "4 matched, 4 unmatched, 0 ambiguous" in capsys.readouterr().out
    summary = json.loads((out / "wds" / "manifest.json").read_text())["attach_captions"]
    assert (summary["matched"], summary["unmatched"], summary["matched_by"]) == (4, 4, {"key": 4})
    assert summary["examples"]["unmatched"] == ["000000007.jpg", "000000005.jpg", "000000003.jpg", "000000001.jpg"]


def test_a_killed_out_run_is_finished_by_running_it_again(captioned, tmp_path):
    """What a kill during the arrow folder leaves: wds done, arrow half done, rec not begun."""
    _, shards, sidecar, out = captioned
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    shutil.rmtree(killed / "rec")
    for name in ("manifest.json", "stats.json", "000001.arrow"):
        (killed / "arrow" / name).unlink()
    (killed / "arrow" / "000001.arrow.tmp").write_bytes(b"half")
    argv = ["--shards", str(shards), "--captions", str(sidecar), "--out", str(killed), "--quiet"]
    assert attach_captions.main(argv) == 0
    assert local_snapshot(killed) == local_snapshot(out)
    assert attach_captions.main(argv) == 0  # finished: running it again changes nothing
    assert local_snapshot(killed) == local_snapshot(out)


def test_in_place_killed_while_writing_the_manifest(captioned, tmp_path):
    _, shards, sidecar, _ = captioned
    clean, work = tmp_path / "clean", tmp_path / "work"
    shutil.copytree(shards, clean)
    shutil.copytree(shards, work)
    argv = ["--captions", str(sidecar), "--in-place", "--quiet"]
    assert attach_captions.main(["--shards", str(clean), *argv]) == 0
    manifest = work / "wds" / "manifest.json"
    done = launch("tools.captions.attach_captions", ["--shards", str(work), *argv], tmp_path / "faults",
                  at=f"write {manifest}")
    assert done.killed, "the run should die while it writes wds/manifest.json"
    assert json.loads(manifest.read_text())["format"] == "wds"  # the old manifest, whole: never a partial one
    assert attach_captions.main(["--shards", str(work), *argv]) == 0
    assert local_snapshot(work) == local_snapshot(clean)
