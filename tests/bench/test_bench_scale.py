"""bench-scale --quick: replication by hard links, the per-rank probe, the S3 rows and the report
run end to end in seconds (the real sizes are docs/benchmarks.md's)."""
from __future__ import annotations

import json

import pytest

from tools.bench import bench_scale


@pytest.mark.slow  # seven probes, each a fresh interpreter importing torch (~4 s), and a moto server: ~38 s
@pytest.mark.timeout(600)
def test_bench_scale_quick(tmp_path):
    assert bench_scale.main(["--quick", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "scale.json").read_text())
    rows = report["local"]
    assert {(r["format"], r["samples"]) for r in rows} == {("wds", 2000), ("rec", 2000), ("wds", 20000), ("rec", 20000)}
    for r in rows:
        main_fds, main_maps = r["after"]["main"]
        # max_open_shards (64) mapped, plus the shards whose image views a worker's batch in flight
        # still holds (a closed map goes with its last view): bounded, whatever the shard count.
        assert main_maps == 0 and all(m <= 64 + 64 for _, m in r["after"]["workers"])
        assert r["plan_s"] < 1 and r["resume_s"] > 0
    (s3,) = report["s3"]
    assert s3["requests_first_open"] == 2 and s3["requests_next_open"] == 1
    assert s3["node_epoch"]["downloads"] == s3["shards"] and s3["node_epoch"]["samples"] >= 200
    assert "| wds | 20,000 | 200 |" in (tmp_path / "out" / "scale.md").read_text()
    mix = report["mix"]  # four hard-linked copies of the 20,000-sample folder, opened as one mixture
    assert mix["sources"] == 4 and mix["many"]["samples"] == 4 * mix["one"]["samples"] == 80_000
    assert mix["many"]["shards"] == 4 * mix["one"]["shards"] and mix["many"]["resume_s"] > 0
    assert "| 4 | 80,000 |" in (tmp_path / "out" / "scale.md").read_text()
