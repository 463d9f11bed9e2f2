"""`make-shards --resume` onto an input that changed since the run began is refused, naming what
changed (issue 26, fault 6: the plan recorded the input's path only, so a table grown from 10 to
16 rows kept the old short last shard as finished, rows 10–11 were never converted, exit 0)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import synthetic_input
from tools.convert import make_shards


@pytest.fixture
def grown(tmp_path):
    """A 16-row table and its sidecar; `table` holds its first 10 rows until the test grows it."""
    args = synthetic_input(tmp_path / "syn", 16)
    full = tmp_path / "syn" / "train.jsonl"
    rows = full.read_text().splitlines(keepends=True)
    table = tmp_path / "table.jsonl"
    table.write_text("".join(rows[:10]))
    args[args.index("--input") + 1] = str(table)
    args += ["--images-root", str(tmp_path / "syn"), "--format", "wds,arrow", "--samples-per-shard", "4",
             "--workers", "1", "--quiet"]
    return args, table, rows


def keys(out: Path) -> list[str]:
    from pipelines.formats import wds

    return [s.key for tar in sorted((out / "wds").glob("*.tar")) for s in wds.iter_samples(str(tar))]


def killed_run(args: list[str], out: Path) -> None:
    """A finished 10-row run with shard 1's record gone: what a kill leaves for --resume to finish."""
    assert make_shards.main(args + ["--out", str(out)]) == 0
    for fmt in ("wds", "arrow"):
        (out / fmt / ".parts" / "000001.json").unlink()
        (out / fmt / "manifest.json").unlink()


def test_resume_onto_a_grown_table_is_refused_naming_it(grown, tmp_path, capsys):
    args, table, rows = grown
    out = tmp_path / "out"
    killed_run(args, out)
    table.write_text("".join(rows))  # 10 -> 16 rows between the kill and the resume
    code = make_shards.main(args + ["--out", str(out), "--resume"])
    err = capsys.readouterr().err
    # before: exit 0 with rows 10-11 missing (the old 2-row shard 2 kept as finished)
    assert not (code == 0 and len(keys(out)) < 16), f"silently partial: {len(keys(out))} of 16 rows"
    assert code == 2 and f"--input {table} changed" in err and "--overwrite" in err, err
    assert make_shards.main(args + ["--out", str(out), "--overwrite"]) == 0
    assert keys(out) == [f"{i:09d}" for i in range(16)]


def test_resume_onto_an_edited_sidecar_is_refused(grown, tmp_path, capsys):
    args, _, _ = grown
    out = tmp_path / "out"
    killed_run(args, out)
    sidecar = Path(args[args.index("--synthetic-captions") + 1])
    lines = sidecar.read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    sidecar.write_text(json.dumps({**first, "caption": "another caption"}) + "\n" + "".join(lines[1:]))
    assert make_shards.main(args + ["--out", str(out), "--resume"]) == 2
    assert f"--synthetic-captions {sidecar} changed" in capsys.readouterr().err


def test_resume_onto_the_same_content_resumes(grown, tmp_path):
    """A touched or copied-back input (new mtime, same bytes) is the same input."""
    args, table, _ = grown
    out, clean = tmp_path / "out", tmp_path / "clean"
    assert make_shards.main(args + ["--out", str(clean)]) == 0
    killed_run(args, out)
    st = os.stat(table)
    os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert make_shards.main(args + ["--out", str(out), "--resume"]) == 0
    assert keys(out) == keys(clean) == [f"{i:09d}" for i in range(10)]
    plan = json.loads((out / "wds" / ".parts" / "plan.json").read_text())
    assert plan["inputs"]["--input"]["mtime_ns"] == st.st_mtime_ns + 10**9  # the next resume skips hashing


def test_a_plan_without_identities_resumes_with_a_warning(grown, tmp_path, capsys):
    """Plans written before identities were recorded still resume (nothing to check them by)."""
    args, _, _ = grown
    out = tmp_path / "out"
    killed_run(args, out)
    for fmt in ("wds", "arrow"):
        path = out / fmt / ".parts" / "plan.json"
        plan = json.loads(path.read_text())
        del plan["inputs"]
        path.write_text(json.dumps(plan))
    assert make_shards.main(args + ["--out", str(out), "--resume"]) == 0
    assert "written before make-shards recorded its inputs' identity" in capsys.readouterr().err
    assert keys(out) == [f"{i:09d}" for i in range(10)]
    assert "inputs" in json.loads((out / "wds" / ".parts" / "plan.json").read_text())


def test_folder_inputs_by_listing_and_file_inputs_by_content(tmp_path):
    """img2dataset output (a folder) is known by its files' names, sizes and mtimes; a JSON or
    table by its bytes: each change is named, a touched file with the same bytes is not one."""
    from tools.convert import input_identity

    folder, coco = tmp_path / "i2d", tmp_path / "captions.json"
    (folder / "00000").mkdir(parents=True)
    (folder / "00000" / "a.tar").write_bytes(b"x" * 100)
    coco.write_text('{"images": [], "annotations": []}')
    paths = {"--input": str(folder), "--captions": str(coco), "--synthetic-captions": None}
    recorded = input_identity.identities(paths)
    assert input_identity.compare(recorded, paths)[0] == []
    (folder / "00000" / "b.tar").write_bytes(b"y")
    coco.write_text('{"images": [1], "annotations": []}')
    changed, _ = input_identity.compare(recorded, paths)
    assert changed == [f"--input {folder} changed (1 files, 100 bytes → 2 files, 101 bytes, or files rewritten)",
                       f"--captions {coco} changed (33 → 34 bytes, other content)"]
    recorded = input_identity.identities(paths)
    st = os.stat(folder / "00000" / "a.tar")
    os.utime(folder / "00000" / "a.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # rewritten in place
    assert input_identity.compare(recorded, paths)[0] == [
        f"--input {folder} changed (2 files, 101 bytes → 2 files, 101 bytes, or files rewritten)"]
    coco.unlink()
    assert f"--captions {coco} is gone" in input_identity.compare(recorded, paths)[0]
