"""bench-train under --quick: every comparison runs, prints its table and writes its JSON."""
from __future__ import annotations

import json

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
