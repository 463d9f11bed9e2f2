"""bench-train --compare open-clip under --quick: lip-train (DALI and torch loaders) and open_clip's own
trainer each run end to end as a subprocess on the same tiny shards, the table and JSON come out; the
`--bare` row's loop (in-process here: a subprocess more would take the test past 30 s)."""
from __future__ import annotations

import json

import pytest

from conftest import build_synthetic_shards
from tools.bench import bench_train, bench_train_e2e


def test_open_clip_windows_parse_its_log_lines():
    log = ("2026-12-07,12:00:00 | INFO | Train Epoch: 0 [  50/5000 (1%)] Data (t): 0.500 Batch (t): 2.000, 25/s\n"
           "2026-12-07,12:00:01 | INFO | Train Epoch: 0 [ 550/5000 (11%)] Data (t): 0.001 Batch (t): 0.100, 500/s\n"
           "2026-12-07,12:00:02 | INFO | Train Epoch: 0 [1050/5000 (21%)] Data (t): 0.001 Batch (t): 0.050, 1e3/s\n")
    windows = bench_train_e2e.open_clip_windows(log, 50)
    assert windows == [(1, 1, 2.0), (2, 11, pytest.approx(1.0)), (12, 21, pytest.approx(0.5))]
    assert bench_train_e2e.steady_rate(windows, 1, 50) == pytest.approx(20 * 50 / 1.5)
    with pytest.raises(bench_train_e2e.BenchError, match="no log window starts after step 21"):
        bench_train_e2e.steady_rate(windows, 21, 50)


def test_open_clip_compare_needs_shards(capsys):
    assert bench_train.main(["--compare", "open-clip", "--device", "cpu"]) == 2
    assert "needs --shards" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_synthetic_shards(tmp_path_factory.mktemp("e2e"), 48, "wds", per_shard=12) / "wds"


def test_bare_loop_stamps_every_step(shards, tmp_path):
    out = tmp_path / "stamps.json"
    bench_train_e2e.bare_loop(str(shards), 8, 0, 64, "lip-tiny", str(out))
    stamps = json.loads(out.read_text())
    assert len(stamps) == 48 // 8 and stamps == sorted(stamps)


@pytest.mark.slow  # ~21 s on 2 cores: three trainers start as subprocesses (torch and open_clip imports each)
def test_bench_train_open_clip_quick(shards, tmp_path, capsys):
    pytest.importorskip("open_clip_train", reason="open_clip_train (open_clip_torch's trainer) is not installed")
    out = tmp_path / "e2e.json"
    assert bench_train.main(["--compare", "open-clip", "--quick", "--device", "cpu", "--shards", str(shards),
                             "--batch-size", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["median_samples_per_s"]) == set(bench_train_e2e.TOOLS)
    assert all(v > 0 for v in report["median_samples_per_s"].values())
    assert all(v > 0 for v in report["median_wall_s"].values())
    assert report["speedup_steady"]["open_clip_train"] == 1.0
    table = capsys.readouterr().out
    assert all(f"| {t} |" in table for t in bench_train_e2e.TOOLS)


def test_peer_threads_row_runs_open_clip_train_under_omp_num_threads(tmp_path, monkeypatch):
    """`--peer-threads N`: one more row, open_clip_train started with OMP_NUM_THREADS=N (the plain row's
    environment untouched), named in the table and its run folder named without spaces or '='."""
    from argparse import Namespace

    calls = []

    def fake_timed(command, log_path, env=None):
        calls.append((command, env))
        with open(log_path, "w") as f:
            f.writelines(f"Train Epoch: 0 [{50 * k}/500 (1%)] Data (t): 0.001 Batch (t): 0.100, 500/s\n"
                         for k in range(1, 11))
        return 1.0

    monkeypatch.setattr(bench_train_e2e, "timed", fake_timed)
    args = Namespace(peer_threads=1, batch_size=50, warmup=2, workers=2, model="lip-tiny", log_every=1)
    row = bench_train_e2e.peer_threads(args)
    assert row == "open_clip_train, OMP_NUM_THREADS=1"
    for tool in ("open_clip_train", row):
        rate, wall = bench_train_e2e.run_tool(tool, args, str(tmp_path), 0, "cfg", ["a.tar"], 500)
        assert rate == pytest.approx(500) and wall == 1.0
    (plain, plain_env), (threaded, env) = calls
    assert plain_env is None and env["OMP_NUM_THREADS"] == "1"
    assert "open_clip_train-OMP_NUM_THREADS-1-0" in threaded and "open_clip_train-0" in plain
