"""make-shards end to end on real photos: every format read back by its real third-party reader,
determinism, resume after a kill, corrupt inputs, bad invocations."""
from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kill_harness import check_labels, launch, local_snapshot, twin_dataset
from pipelines.formats import arrow as arrow_fmt
from pipelines.text import clean_text, tokenize
from tools.convert import make_shards, verify_shards

REPO = Path(__file__).resolve().parents[2]


def shards(argv: list[str]) -> int:
    return make_shards.main(argv + ["--quiet"])


@pytest.fixture
def flickr(shared_data, tmp_path):
    """First 24 Flickr8k photos with their 5 captions each, plus a sidecar for the even ones."""
    src = shared_data / "flickr8k-1k"
    with open(src / "captions.txt", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    images = sorted({r["image"] for r in rows})[:24]
    rows = [r for r in rows if r["image"] in images]
    captions = tmp_path / "captions.txt"
    with open(captions, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    sidecar = tmp_path / "syn.jsonl"
    with open(sidecar, "w") as f:
        for i, name in enumerate(images):
            if i % 2 == 0:
                f.write(json.dumps({"image": name, "caption": [f"synthetic {i} a", f"synthetic {i} b"]}) + "\n")
    return {"captions": captions, "images": src / "images", "sidecar": sidecar, "names": images, "rows": rows}


def expected_samples(flickr) -> list[dict]:
    """What --captions-per-image all must produce, in order."""
    out = []
    syn = {n: [f"synthetic {i} a", f"synthetic {i} b"] if i % 2 == 0 else [] for i, n in enumerate(flickr["names"])}
    for name in flickr["names"]:
        for r in (r for r in flickr["rows"] if r["image"] == name):
            txt = clean_text(r["caption"])
            out.append({"key": f"{len(out):09d}", "image": (flickr["images"] / name).read_bytes(),
                        "txt": txt, "syn": syn[name],
                        "tokens": tokenize([txt, *(syn[name] or [txt])])})
    return out


def convert_flickr(flickr, out, *extra) -> int:
    return shards(["--source", "flickr", "--input", str(flickr["captions"]), "--images-root", str(flickr["images"]),
                   "--synthetic-captions", str(flickr["sidecar"]), "--out", str(out), *extra])


def test_every_format_read_back_by_its_real_reader(flickr, tmp_path):
    out = tmp_path / "out"
    assert convert_flickr(flickr, out, "--format", "wds,arrow,rec", "--tokenize",
                          "--samples-per-shard", "45", "--workers", "2") == 0
    want = expected_samples(flickr)
    assert len(want) == 120
    stats = json.loads((out / "wds" / "stats.json").read_text())
    assert stats["read"] == stats["written"] == 120 and stats["with_synthetic_caption"] == 60

    import webdataset as wds_lib
    tars = sorted(str(p) for p in (out / "wds").glob("*.tar"))
    assert len(tars) == 3
    got = list(wds_lib.WebDataset(tars, shardshuffle=False))
    assert [s["__key__"] for s in got] == [w["key"] for w in want]
    for s, w in zip(got, want):
        assert s["jpg"] == w["image"] and s["txt"].decode() == w["txt"]
        assert s["syn.txt"].decode().split("\n") == (w["syn"] or [""])
        np.testing.assert_array_equal(np.load(io.BytesIO(s["tok.npy"])), w["tokens"])
        assert json.loads(s["json"])["image"] in flickr["names"]

    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def wds_pipe():
        return tuple(fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                           ext=["jpg", "txt", "tok.npy"], missing_component_behavior="error",
                                           name="reader"))

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def rec_pipe():
        recs = sorted(str(p) for p in (out / "rec").glob("*.rec"))
        return tuple(fn.readers.mxnet(path=recs, index_path=[str(out / "rec" / "all.idx")], name="reader"))

    for build, check in ((wds_pipe, "wds"), (rec_pipe, "rec")):
        pipe = build()
        pipe.build()
        assert pipe.epoch_size("reader") == 120
        seen = []
        while len(seen) < 120:
            outs = pipe.run()
            for i in range(len(outs[0])):
                seen.append([np.array(o.at(i)) for o in outs])
        for (image, *rest), w in zip(seen[:120], want):
            assert image.tobytes() == w["image"]
            if check == "wds":
                assert rest[0].tobytes().decode() == w["txt"]
                np.testing.assert_array_equal(np.load(io.BytesIO(rest[1].tobytes())), w["tokens"])
            else:  # ALIP's label: 154 float32 token ids
                np.testing.assert_array_equal(rest[0].astype(np.int64), w["tokens"][:2].reshape(-1))
    sidecar = [json.loads(line) for p in sorted((out / "rec").glob("*.jsonl")) for line in p.open()]
    for row, w in zip(sidecar, want):  # token rows 2.. (second and later synthetic captions)
        assert row.get("extra_tokens", []) == w["tokens"][2:].tolist()

    import pyarrow as pa
    rows = []
    for path in sorted((out / "arrow").glob("*.arrow")):
        rows += pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
    assert [r["key"] for r in rows] == [w["key"] for w in want]
    for r, w in zip(rows, want):
        assert r["jpg"] == w["image"] and r["txt"] == w["txt"] and r["syn"] == w["syn"]
        np.testing.assert_array_equal(np.array(r["tokens"]).reshape(2, 77), w["tokens"][:2])
        np.testing.assert_array_equal(np.array(r["extra_tokens"], np.int32).reshape(-1, 77), w["tokens"][2:])
    assert verify_shards.main([str(out), "--quiet"]) == 0


def folder_bytes(out: Path) -> dict[str, bytes]:
    """Every file the conversion wrote except stats.json, which records timings."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "stats.json"}


def test_deterministic_across_runs_and_worker_counts(flickr, tmp_path):
    args = ("--format", "wds,arrow,rec", "--samples-per-shard", "7", "--resize", "96", "--quality", "80")
    runs = []
    for i, workers in enumerate(("1", "2", "2")):
        out = tmp_path / f"run{i}"
        assert convert_flickr(flickr, out, *args, "--workers", workers) == 0
        runs.append(folder_bytes(out))
    assert len(runs[0]) > 40
    assert runs[0] == runs[1] == runs[2]


def test_resume_after_kill_matches_clean_run(flickr, tmp_path):
    args = ["--format", "wds,arrow,rec", "--samples-per-shard", "4", "--resize", "160", "--workers", "1"]
    clean = tmp_path / "clean"
    assert convert_flickr(flickr, clean, *args) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tools.convert.make_shards", "--source", "flickr", "--input", str(flickr["captions"]),
           "--images-root", str(flickr["images"]), "--synthetic-captions", str(flickr["sidecar"]),
           "--out", str(killed), "--quiet", *args]
    proc = subprocess.Popen(cmd, cwd=REPO)
    first = killed / "rec" / ".parts" / "000002.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((killed / "rec" / ".parts").glob("0*.json")))
    assert 0 < done < 30, "the kill should land mid-run"
    assert not (killed / "wds" / "manifest.json").exists()
    assert convert_flickr(flickr, killed, *args) == 2  # neither --resume nor --overwrite: refuse
    assert convert_flickr(flickr, killed, *args, "--resume") == 0
    assert folder_bytes(killed) == folder_bytes(clean)
    stats = json.loads((killed / "wds" / "stats.json").read_text())
    assert stats["shards_reused"] >= done - 1


def write_bad_inputs(root: Path, real_jpg: bytes) -> Path:
    """One good image per bad kind, and a table listing them all."""
    (root / "good.jpg").write_bytes(real_jpg)
    (root / "truncated.jpg").write_bytes(real_jpg[: len(real_jpg) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    Image.new("RGB", (1200, 1000), "red").save(root / "huge.jpg")
    (root / "nocaption.jpg").write_bytes(real_jpg)
    rows = [("good.jpg", "a good photo"), ("truncated.jpg", "cut"), ("empty.jpg", "zero"),
            ("text.jpg", "text"), ("huge.jpg", "too many pixels"), ("nocaption.jpg", ""),
            ("missing.jpg", "no such file"), ("good.jpg", "the same photo again")]
    table = root / "list.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text"])
        w.writerows(rows)
    return table


@pytest.mark.parametrize("resize", [None, "64"])
def test_corrupt_inputs_are_counted_by_reason(shared_data, tmp_path, resize):
    real = sorted((shared_data / "flickr8k-1k" / "images").glob("*.jpg"))[0].read_bytes()
    table = write_bad_inputs(tmp_path, real)
    out = tmp_path / "out"
    argv = ["--source", "table", "--input", str(table), "--image-column", "path", "--caption-column", "text",
            "--format", "wds,arrow", "--out", str(out), "--max-pixels", "1000000", "--workers", "2",
            "--samples-per-shard", "3"]
    assert shards(argv + (["--resize", resize] if resize else [])) == 0
    stats = json.loads((out / "wds" / "stats.json").read_text())
    assert stats["skipped_by_reason"] == {"empty_file": 1, "missing_file": 1, "no_caption": 1,
                                          "not_image": 1, "too_large": 1, "truncated": 1}
    assert stats["read"] == 8 and stats["written"] == 2
    assert stats["read"] == stats["written"] + stats["skipped"]
    assert "truncated.jpg" in stats["skip_examples"]["truncated"]
    assert verify_shards.main([str(out), "--quiet"]) == 0

    keep = tmp_path / "keep"
    assert shards(argv[:-6] + ["--out", str(keep), "--keep-uncaptioned", "--max-pixels", "1000000"]) == 0
    stats = json.loads((keep / "wds" / "stats.json").read_text())
    assert stats["written"] == 3 and "no_caption" not in stats["skipped_by_reason"]


def test_captions_per_image_modes(flickr, tmp_path):
    for mode, n in (("all", 120), ("first", 24), ("random", 24)):
        out = tmp_path / mode
        assert convert_flickr(flickr, out, "--format", "arrow", "--captions-per-image", mode, "--workers", "1") == 0
        rows = [s for p in sorted((out / "arrow").glob("*.arrow")) for s in arrow_fmt.iter_samples(str(p))]
        assert len(rows) == n
        if mode != "all":
            for s in rows:
                assert len(s.meta["other_captions"]) == 4 and s.txt not in s.meta["other_captions"]
    first = [s.txt for s in arrow_fmt.iter_samples(str(next((tmp_path / "first" / "arrow").glob("*.arrow"))))]
    rand = [s.txt for s in arrow_fmt.iter_samples(str(next((tmp_path / "random" / "arrow").glob("*.arrow"))))]
    assert first != rand


def one_line_error(capsys, argv) -> str:
    assert make_shards.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("make-shards: error:")
    return err


def test_bad_invocations_exit_2_with_one_line(flickr, tmp_path, capsys):
    base = ["--source", "flickr", "--images-root", str(flickr["images"]), "--format", "wds", "--quiet"]
    assert "does not exist" in one_line_error(capsys, base + ["--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert "--format" in one_line_error(capsys, base[:-3] + ["--format", "zip", "--input", str(flickr["captions"]),
                                                             "--out", str(tmp_path / "o")])
    table = tmp_path / "t.csv"
    table.write_text("path,text\na.jpg,hello\n")
    err = one_line_error(capsys, ["--source", "table", "--input", str(table), "--image-column", "image",
                                  "--caption-column", "text", "--out", str(tmp_path / "o"), "--quiet"])
    assert "image" in err and "t.csv" in err

    out = tmp_path / "out"
    assert shards(base + ["--input", str(flickr["captions"]), "--out", str(out), "--workers", "1"]) == 0
    assert "--resume" in one_line_error(capsys, base + ["--input", str(flickr["captions"]), "--out", str(out)])
    err = one_line_error(capsys, base + ["--input", str(flickr["captions"]), "--out", str(out), "--resize", "64"])
    assert "resize" in err and "--overwrite" in err
    assert shards(base + ["--input", str(flickr["captions"]), "--out", str(out), "--resize", "64", "--overwrite"]) == 0
    foreign = tmp_path / "foreign"
    (foreign / "wds").mkdir(parents=True)
    (foreign / "wds" / "notes.txt").write_text("mine")
    assert "did not write" in one_line_error(capsys, base + ["--input", str(flickr["captions"]), "--out", str(foreign)])


def test_tools_make_shards_is_the_documented_entry_point():
    """`python -m tools.make_shards` (the path older docs and scripts name) runs make-shards itself."""
    from tools import make_shards as entry

    assert entry.main is make_shards.main
    done = subprocess.run([sys.executable, "-m", "tools.make_shards", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: make-shards") and "--resume" in done.stdout


def test_verify_shards_names_the_bad_shard(flickr, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert_flickr(flickr, out, "--format", "wds,rec", "--samples-per-shard", "50", "--workers", "1") == 0
    assert verify_shards.main([str(out), "--quiet"]) == 0
    tar = out / "wds" / "000001.tar"
    data = bytearray(tar.read_bytes())
    data[5000] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert verify_shards.main([str(out / "wds"), "--quiet"]) == 1
    assert "000001.tar" in capsys.readouterr().err
    (out / "rec" / "000002.idx").unlink()
    assert verify_shards.main([str(out / "rec"), "--quiet"]) == 1
    assert "000002.idx" in capsys.readouterr().err


def test_verify_shards_checks_the_folder_index(flickr, tmp_path, capsys):
    """index.bin must be the one manifest.json names and match an index built afresh."""
    out = tmp_path / "out"
    assert convert_flickr(flickr, out, "--format", "wds", "--samples-per-shard", "100", "--workers", "1") == 0
    index = out / "wds" / "index.bin"
    good = index.read_bytes()
    index.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert verify_shards.main([str(out), "--quiet", "--no-decode"]) == 1
    assert "index.bin: missing, or not the folder index" in capsys.readouterr().err
    index.write_bytes(good)
    assert verify_shards.main([str(out), "--quiet", "--no-decode"]) == 0


def test_workers_do_not_hang_after_the_parent_ran_openmp(tmp_path):
    """A parent that ran a parallel torch op (the demo, a notebook) and then converts with
    --workers 2: the forked workers' tokenizer used to deadlock in libgomp."""
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(2)\n"
        "torch.zeros(4000, 1000).add_(1)  # starts libgomp's thread pool in the parent\n"
        "from tools.convert import make_shards\n"
        "from tools.demo import make_synthetic\n"
        "out = sys.argv[1]\n"
        "make_synthetic.main(['--out', out + '/syn', '--train', '300', '--test', '0', '--size', '32',\n"
        "                     '--workers', '1'])\n"
        "sys.exit(make_shards.main(['--source', 'table', '--input', out + '/syn/train.jsonl',\n"
        "    '--image-column', 'image', '--caption-column', 'caption', '--synthetic-captions',\n"
        "    out + '/syn/train_syn.jsonl', '--tokenize', '--format', 'wds', '--samples-per-shard', '150',\n"
        "    '--out', out + '/shards', '--workers', '2', '--quiet']))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def stem_sidecar(data, path: Path) -> Path:
    """A sidecar keyed by file stem, one line per stem: what caption-shards wrote before images
    had an identity, and what a hand-made sidecar often looks like."""
    stems = dict.fromkeys(Path(n).stem for n in data.names)
    path.write_text("".join(json.dumps({"key": s, "caption": [f"synthetic caption of {s}"]}) + "\n" for s in stems))
    return path


@pytest.mark.parametrize("source", ["table", "yfcc"])
def test_same_file_names_in_two_folders_are_two_images(tmp_path, source, capsys):
    """a/000000001.jpg and b/000000001.jpg: a line by identity reaches its own image only; a line
    by stem reaches both, so it is ambiguous and given to neither, counted and named."""
    data = twin_dataset(tmp_path / "in", pairs=3)
    args = data.make_shards_args()
    if source == "yfcc":
        table = tmp_path / "in" / "yfcc.jsonl"
        table.write_text("".join(json.dumps({"filepath": n, "title": f"a photo named {n}"}) + "\n" for n in data.names))
        args = ["--source", "yfcc", "--input", str(table), "--images-root", str(data.images),
                "--synthetic-captions", str(data.sidecar)]
    assert shards(args + ["--format", "wds", "--out", str(tmp_path / "own"), "--workers", "1"]) == 0
    check_labels(tmp_path / "own", data)
    with_syn = [s for s in wds_samples(tmp_path / "own" / "wds") if s.syn]
    assert len(with_syn) == 5 and len({tuple(s.syn) for s in with_syn}) == 5

    args[args.index("--synthetic-captions") + 1] = str(stem_sidecar(data, tmp_path / "stems.jsonl"))
    capsys.readouterr()
    assert shards(args + ["--format", "wds", "--out", str(tmp_path / "stems"), "--workers", "1"]) == 0
    assert not any(s.syn for s in wds_samples(tmp_path / "stems" / "wds"))
    assert "0 matched, 0 unmatched, 6 ambiguous" in capsys.readouterr().out
    joined = json.loads((tmp_path / "stems" / "wds" / "stats.json").read_text())["synthetic_captions"]
    assert joined["ambiguous"] == 6 and joined["examples"]["ambiguous"][:2] == ["a/000000000.jpg", "b/000000000.jpg"]


def wds_samples(folder: Path) -> list:
    from pipelines.formats import wds

    return [s for tar in sorted(folder.glob("*.tar")) for s in wds.iter_samples(str(tar))]


def test_resume_killed_while_it_rewrites_the_plan(tmp_path):
    data = twin_dataset(tmp_path / "in", pairs=3)
    argv = data.make_shards_args() + ["--format", "wds,arrow", "--samples-per-shard", "2", "--workers", "1", "--quiet"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert make_shards.main(argv + ["--out", str(clean)]) == 0
    assert make_shards.main(argv + ["--out", str(killed)]) == 0
    (killed / "wds" / ".parts" / "000001.json").unlink()  # something left to resume
    plan = killed / "wds" / ".parts" / "plan.json"
    done = launch("tools.convert.make_shards", argv + ["--out", str(killed), "--resume"], tmp_path / "faults",
                  at=f"write {plan}")
    assert done.killed, "the run should die while it rewrites wds/.parts/plan.json"
    assert json.loads(plan.read_text())["source"] == "table"  # the old plan, whole: never a partial one
    assert make_shards.main(argv + ["--out", str(killed), "--resume"]) == 0
    assert local_snapshot(killed) == local_snapshot(clean)
