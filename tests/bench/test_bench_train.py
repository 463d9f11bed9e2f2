"""bench-train under --quick: every comparison runs, prints its table and writes its JSON."""
from __future__ import annotations

import json
from argparse import Namespace

import pytest

from tools.bench import bench_train


@pytest.mark.parametrize("compare,extra,rows", [
    ("modes", [], {"bare loop (clip-raw)", "trainer clip-raw", "trainer clip-both", "trainer alip"}),
    ("tuning", [], {"full", "lit", "lilt", "elip"}),
    ("pruning", ["--set", "model.token_pruning.layers=[1]", "--set", "model.token_pruning.keep=[0.5]"],
     {"no pruning", "token pruning"}),
])
def test_bench_train_quick(tmp_path, capsys, compare, extra, rows):
    out = tmp_path / "bench.json"
    assert bench_train.main(["--quick", "--batch-size", "8", "--compare", compare, "--out", str(out), *extra]) == 0
    report = json.loads(out.read_text())
    assert set(report["median_seconds_per_step"]) == rows
    assert all(v > 0 for v in report["median_seconds_per_step"].values())
    assert all(p is None or p > 0 for p in report["peak_bytes"].values())
    table = capsys.readouterr().out
    assert all(f"| {r} |" in table for r in rows)


def test_timed_window_holds_no_checkpoint(monkeypatch):
    """The trainer checkpoints at each epoch's end: bench-train's in-memory epochs are longer than the
    run, so its timed window holds training steps only, as the bare loop's does (with 16-batch epochs
    two checkpoints fell into a 30-step window and added 11 % to every trainer row)."""
    import torch

    from train import checkpoint

    saved = []
    real = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda folder, step, *a: saved.append(step) or real(folder, step, *a))
    args = Namespace(batch_size=4, image_size=64, model="lip-tiny", steps=6, warmup=2, precision="auto", overrides=[])
    batches = bench_train.make_batches(3, args.batch_size, args.image_size, torch.device("cpu"))
    seconds, _ = bench_train.trainer_time("clip-raw", args, batches, torch.device("cpu"))
    assert seconds > 0
    assert saved == [args.steps + 1]  # the run's last step only, outside the window

    loader = bench_train.MemoryLoader(batches, per_epoch=7)
    assert len(loader) == 7 and [b.keys[0] for b in loader] == ["0-0", "1-0", "2-0"] * 2 + ["0-0"]
    assert loader.epoch == 1 and len(loader) == 7


def test_repeats_rotate_the_order(monkeypatch, capsys):
    """Each repeat starts one loop later, so no loop always runs last in a repeat (with the order fixed,
    `alip`, always last, measured 1.42–1.44× `clip-raw` where rotating gives 1.31–1.32×)."""
    monkeypatch.setattr(bench_train, "bare_time", lambda *a: 0.01)
    monkeypatch.setattr(bench_train, "trainer_time", lambda mode, *a, **k: (0.01, None))
    assert bench_train.main(["--steps", "3", "--warmup", "1", "--repeats", "3", "--batch-size", "4"]) == 0
    runs = [line.split(": ", 2)[2].rstrip(" .") for line in capsys.readouterr().err.splitlines()
            if line.startswith("bench-train: repeat")]
    loops = ["bare loop (clip-raw)", "trainer clip-raw", "trainer clip-both", "trainer alip"]
    assert runs == loops + loops[1:] + loops[:1] + loops[2:] + loops[:2]
