"""caption-shards --resume and a rerun of attach-captions --out onto shards converted again since
they began are refused, naming what changed (issue 26, fault 6: their plans named the shards by
path, so the finished shards' captions or samples of the old conversion were kept, exit 0)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import synthetic_input
from tools.captions import attach_captions, caption_shards
from tools.convert import make_shards


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def source(tmp_path):
    """8 synthetic samples in 2 wds shards, and `convert(tag)` that converts them again in place
    with every raw caption prefixed by `tag`: same shard names, other content."""
    args = synthetic_input(tmp_path / "syn", 8)
    table = tmp_path / "syn" / "train.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    out = tmp_path / "shards"

    def convert(tag: str) -> Path:
        table.write_text("".join(json.dumps({**r, "caption": f"{tag} {r['caption']}"}) + "\n" for r in rows))
        assert make_shards.main(args + ["--tokenize", "--format", "wds", "--samples-per-shard", "4", "--overwrite",
                                        "--out", str(out), "--workers", "1", "--quiet"]) == 0
        return out / "wds"
    return convert


def test_caption_shards_resume_onto_reconverted_shards_is_refused(source, tmp_path, capsys):
    shards = source("one")
    model = caption_shards.init_tiny(str(tmp_path / "tiny-blip"))
    out = tmp_path / "captions.jsonl"
    argv = ["--shards", str(shards), "--model", model, "--out", str(out), "--num-captions", "1",
            "--num-beams", "1", "--max-new-tokens", "4", "--batch-size", "4", "--workers", "0", "--quiet"]
    assert caption_shards.main(argv) == 0
    (Path(str(out) + ".parts") / "000001.tar.json").unlink()  # what a kill leaves to resume
    source("two")
    code = caption_shards.main(argv + ["--resume"])
    assert code == 2, "resumed onto shards converted again since: shard 0's captions are of the old ones"
    err = capsys.readouterr().err
    assert f"--shards {shards / 'manifest.json'} changed" in err and "--overwrite" in err, err
    assert caption_shards.main(argv + ["--overwrite"]) == 0


def test_attach_captions_out_rerun_onto_reconverted_shards_is_refused(source, tmp_path, capsys):
    from pipelines.formats import wds

    shards = source("one")
    sidecar = tmp_path / "syn" / "train_syn.jsonl"
    out = tmp_path / "attached"
    argv = ["--shards", str(shards), "--captions", str(sidecar), "--out", str(out), "--quiet"]
    assert attach_captions.main(argv) == 0
    source("two")
    code = attach_captions.main(argv)
    texts = [s.txt for tar in sorted(out.glob("*.tar")) for s in wds.iter_samples(str(tar))]
    assert not (code == 0 and any(t.startswith("one ") for t in texts)), "the old shards' samples kept, exit 0"
    err = capsys.readouterr().err
    assert code == 2 and f"--shards {shards / 'manifest.json'} changed" in err and f"delete {out}" in err, err
