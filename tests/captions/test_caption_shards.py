"""caption-shards with a tiny randomly initialised BLIP built offline: batching, K captions,
resume after SIGKILL, the degenerate-output filter, a missing model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_synthetic_shards
from tools.captions import caption_shards
from tools.captions.caption_shards import CaptionConfig, degenerate

REPO = Path(__file__).resolve().parents[2]
K = 2
OPTIONS = dict(num_captions=K, num_beams=2, max_new_tokens=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second intra-op thread only waits (10x slower on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """12 synthetic images in 3 shards per format, and a tiny random captioner folder."""
    root = tmp_path_factory.mktemp("caption")
    shards = build_synthetic_shards(root, 12, "wds,arrow,rec", 4)
    model = caption_shards.init_tiny(str(root / "tiny-blip"))
    return root, shards, model


def config(shards, model, fmt="wds") -> CaptionConfig:
    return CaptionConfig(shards=str(shards), model=model, format=fmt, **OPTIONS)


def lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def clean_run(setup):
    root, shards, model = setup
    out = root / "clean.jsonl"
    stats = caption_shards.run(config(shards, model), str(out), batch_size=3, workers=0, progress=False)
    return out, stats


def test_degenerate_filter():
    assert degenerate("a dog on a red couch") is None
    assert degenerate("") == "empty"
    assert degenerate("a dog") == "too_short"
    assert degenerate("a dog", min_words=2) is None
    assert degenerate("a dog dog dog runs") == "repeated"
    assert degenerate("a man on a man on a man on") == "repeated"
    assert degenerate("a dog dog dog runs", max_repeat=0) is None


def test_batching_matches_one_by_one(setup, clean_run):
    root, shards, model = setup
    out, stats = clean_run
    one = root / "one.jsonl"
    caption_shards.run(config(shards, model), str(one), batch_size=1, workers=0, progress=False)
    assert one.read_text() == out.read_text()
    assert len(lines(out)) == 12 and stats["samples"] == 12 and stats["shards"] == 3


def test_k_captions_per_image(clean_run):
    out, stats = clean_run
    rows = lines(out)
    assert all(len(r["caption"]) == K and len(set(r["caption"])) == K for r in rows)
    assert stats["captions"] == K * stats["images"] == K * 12
    assert len({r["image"] for r in rows}) == 12
    # Several images, several different captions: the tiny model looks at its input.
    assert len({r["caption"][0] for r in rows}) > 3


def test_same_captions_from_every_format(setup, clean_run):
    root, shards, model = setup
    out = root / "rec.jsonl"
    caption_shards.run(config(shards, model, "rec"), str(out), batch_size=4, workers=0, progress=False)
    assert out.read_text() == clean_run[0].read_text()


@pytest.mark.slow  # a captioning subprocess (torch and transformers imports), killed, then the rerun: ~5 s
def test_resume_after_sigkill_equals_clean_run(setup, clean_run):
    root, shards, model = setup
    out = root / "killed.jsonl"
    cmd = [sys.executable, "-m", "tools.captions.caption_shards", "--shards", str(shards), "--model", model,
           "--out", str(out), "--num-captions", str(K), "--num-beams", "2", "--max-new-tokens", "8",
           "--batch-size", "3", "--workers", "0", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = Path(str(out) + ".parts") / "000000.tar.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in first.parent.glob("*.tar.json"))
    assert done and "000002.tar.json" not in done, f"killed too late or too early: {done}"
    assert not out.exists()
    assert caption_shards.main(cmd[3:] + ["--resume"]) == 0
    assert out.read_text() == clean_run[0].read_text()
    stats = json.loads((first.parent / "stats.json").read_text())
    assert stats["shards_reused"] == len(done)
    # Finished: another --resume reuses every shard; without --resume the records are protected.
    assert caption_shards.main(cmd[3:] + ["--resume"]) == 0
    assert caption_shards.main(cmd[3:]) == 2


def test_missing_model_names_the_fix(setup, tmp_path, capsys):
    _, shards, _ = setup
    argv = ["--shards", str(shards), "--out", str(tmp_path / "c.jsonl")]
    assert caption_shards.main(argv + ["--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere: no such folder" in err and "never downloads" in err and "--init-tiny" in err
    (tmp_path / "empty").mkdir()
    assert caption_shards.main(argv + ["--model", str(tmp_path / "empty")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "c.jsonl").exists()


def test_nucleus_is_seeded_and_prompt_is_stripped(setup):
    root, shards, model = setup
    cfg = CaptionConfig(shards=str(shards), model=model, format="arrow", num_captions=2, decoding="nucleus",
                        max_new_tokens=6, prompt="a dog on", min_words=1, max_repeat=0, seed=5)
    a, b = root / "nucleus-a.jsonl", root / "nucleus-b.jsonl"
    caption_shards.run(cfg, str(a), batch_size=4, workers=0, progress=False)
    caption_shards.run(cfg, str(b), batch_size=4, workers=0, progress=False)
    assert a.read_text() == b.read_text()
    rows = lines(a)
    assert rows and not any(c.startswith("a dog on") for r in rows for c in r["caption"])


def test_same_file_names_in_two_folders_get_their_own_lines(setup, tmp_path):
    """a/000000001.jpg and b/000000001.jpg (one source key, two images) get a line each, named by
    identity, and attach-captions puts each line on its own image."""
    from kill_harness import twin_dataset
    from tools.captions import attach_captions
    from tools.convert import make_shards
    from pipelines.formats import wds

    _, _, model = setup
    data = twin_dataset(tmp_path / "in", pairs=3)
    shards = tmp_path / "shards"
    assert make_shards.main(data.make_shards_args() + ["--format", "wds", "--samples-per-shard", "4",
                                                       "--out", str(shards), "--workers", "1", "--quiet"]) == 0
    out = tmp_path / "captions.jsonl"
    cfg = CaptionConfig(shards=str(shards), model=model, min_words=1, max_repeat=0, **OPTIONS)
    caption_shards.run(cfg, str(out), batch_size=4, workers=0, progress=False)
    rows = lines(out)
    named = [r.get("image") for r in rows]
    assert len(rows) > 3 and len(set(named)) == len(rows) and set(named) <= set(data.names)  # one line per image
    assert len({tuple(r["caption"]) for r in rows}) > 1
    attached = tmp_path / "attached"
    assert attach_captions.main(["--shards", str(shards), "--captions", str(out), "--out", str(attached),
                                 "--quiet"]) == 0
    want = {r["image"]: r["caption"] for r in rows}
    got = [s for tar in sorted((attached / "wds").glob("*.tar")) for s in wds.iter_samples(str(tar))]
    assert len(got) == 6 and all(s.syn == want[s.meta["image"]] for s in got)
