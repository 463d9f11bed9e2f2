"""tools/bench/bench_loader.py at --quick's sizes: every CPU backend measured on real shards, ratios filled."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import build_synthetic_shards
from tools.bench import bench_loader

CPU_BACKENDS = ("dali-cpu", "torch", "openclip", "dali-native")
# --quick's settings (checked in test_dali_gpu_is_skipped_without_cuda) with 0.5-s measurements
# instead of 2-s ones: the assertions need a rate from each loader, not an accurate one.
QUICK = ["--seconds", "0.5", "--repeats", "1", "--batch-size", "32", "--image-size", "64"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """96 synthetic photos with synthetic captions, tokenized, in 4 tars (one per worker at least,
    as open_clip requires) and RecordIO."""
    return build_synthetic_shards(tmp_path_factory.mktemp("bench_loader"), 96, "wds,rec", 24)


@pytest.mark.slow  # seven loader starts (worker processes) and measurements: ~6 s
def test_quick_run_measures_every_backend(shards, tmp_path, capsys):
    out = tmp_path / "loader.json"
    argv = ["--shards", str(shards), "--format", "wds,rec", "--backends", ",".join(CPU_BACKENDS),
            "--workers", "2", *QUICK, "--out", str(out)]
    assert bench_loader.main(argv) == 0
    report = json.loads(out.read_text())
    rows = {(r["backend"], r["format"]): r for r in report["results"]}
    assert set(rows) == {(b, "wds") for b in CPU_BACKENDS} | {("dali-cpu", "rec"), ("torch", "rec"),
                                                               ("dali-native", "rec")}
    for (backend, fmt), r in rows.items():
        assert len(r["rates"]) == 1 and r["median"] > 0 and r["min"] <= r["median"] <= r["max"]
        assert r["ratio_torch"] == pytest.approx(r["median"] / rows["torch", fmt]["median"])
        if fmt == "wds":
            assert r["ratio_openclip"] == pytest.approx(r["median"] / rows["openclip", "wds"]["median"])
        else:
            assert r["ratio_openclip"] is None
    assert rows["torch", "wds"]["ratio_torch"] == pytest.approx(1.0)
    assert rows["dali-cpu", "wds"]["tokens"] == "raw + syn" and rows["dali-native", "wds"]["tokens"] == "none"
    assert {(s["backend"], s["format"]) for s in report["skipped"]} == {("openclip", "rec")}
    machine = report["machine"]
    assert machine["nproc"] >= 1 and machine["cpu"] and machine["versions"]["torch"]
    assert report["config"]["batch_size"] == 32 and report["config"]["image_size"] == 64
    printed = capsys.readouterr().out
    assert "| backend | format | images/s (median)" in printed and "| dali-cpu | wds |" in printed


def test_dali_gpu_is_skipped_without_cuda(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_loader.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert bench_loader.main(["--shards", str(shards / "wds"), "--backends", "dali-gpu",
                              "--hw-decoder-load", "0.5,0.9", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {k: report["config"][k] for k in ("seconds", "repeats", "batch_size", "image_size")} == \
        {"seconds": 2.0, "repeats": 1, "batch_size": 32, "image_size": 64}  # what --quick sets
    assert report["results"] == []
    assert [s["backend"] for s in report["skipped"]] == ["dali-gpu (hw 0.5)", "dali-gpu (hw 0.9)"]
    assert all("no CUDA device" in s["reason"] for s in report["skipped"])


def test_unknown_backend_is_a_usage_error(shards, capsys):
    assert bench_loader.main(["--shards", str(shards), "--backends", "dali,torch", "--quick"]) == 2
    assert "unknown backend" in capsys.readouterr().err


@pytest.mark.slow  # one measurement plus an epoch per stage, per format: ~8 s
def test_stages_report_cpu_per_stage_and_the_epoch_boundary(shards, tmp_path, capsys):
    out = tmp_path / "stages.json"
    assert bench_loader.main(["--shards", str(shards), "--format", "wds,rec", "--backends", "dali-cpu",
                              "--workers", "2", *QUICK, "--stages", "--out", str(out)]) == 0
    rows = {r["format"]: r for r in json.loads(out.read_text())["stages"]}
    assert set(rows) == {"wds", "rec"}
    for r in rows.values():
        assert r["samples"] == 96
        assert 0 < r["plan_us"] < r["read_us"] < r["graph_us"] and r["loader_us"] > 0 and r["native_us"] > 0
        assert 0 < r["header_us"] < r["draws_us"] < r["graph_us"]
        assert r["loader_first_batch_s"] > 0 and "loader_boundary_ms" in r and "native_boundary_ms" in r
        assert r["host_per_cpu_s"] > 1e6 / r["graph_us"]  # the host side outruns the decode it feeds
    assert "| format | samples | plan | read | draws (header) | host side, no decode (samples per CPU-s) | graph |" \
        in capsys.readouterr().out


def test_mix_rows_and_the_host_side(shards, tmp_path, capsys):
    """--mix: the same samples as two sources beside the one folder; --host: the host side alone."""
    halves = [build_synthetic_shards(tmp_path / name, 48, "wds", 24) for name in ("a", "b")]
    mix = ",".join(str(h) for h in halves)
    out = tmp_path / "mix.json"
    assert bench_loader.main(["--shards", str(shards), "--backends", "dali-cpu", "--mix", mix, *QUICK,
                              "--workers", "1", "--out", str(out)]) == 0
    labels = [r["label"] for r in json.loads(out.read_text())["results"]]
    assert labels == ["dali-cpu", "dali-cpu (mix of 2)"]
    assert bench_loader.main(["--shards", str(shards), "--format", "wds,rec", "--mix", mix, "--host", *QUICK,
                              "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["host"]
    assert [(r["format"], r["data"]) for r in rows] == [("wds", "one folder"), ("wds", "mix of 2"),
                                                        ("rec", "one folder")]  # the halves hold no rec
    assert all(r["per_cpu_s"] > 1000 for r in rows)
    assert "| wds | mix of 2 |" in capsys.readouterr().out
    # --host-workers: the GPU graph's way as well, the source in a DALI worker process
    assert bench_loader.main(["--shards", str(shards), "--format", "wds", "--host", "--host-workers", "1", *QUICK,
                              "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["host"]
    assert row["workers_per_cpu_s"] > 500 and row["workers_main_per_cpu_s"] >= row["workers_per_cpu_s"]
    assert "source in 1 DALI worker(s)" in capsys.readouterr().out


@pytest.mark.slow  # the peers' exports, four loader starts and measurements, three resume checks: ~6 s
def test_quick_run_measures_peers_and_their_resume(shards, tmp_path, capsys):
    """Mosaic Streaming and LitData read the same wds samples (exported once); every loader,
    ours included, resumes mid-epoch exactly from its state_dict."""
    pytest.importorskip("streaming")
    pytest.importorskip("litdata")
    out = tmp_path / "peers.json"
    assert bench_loader.main(["--shards", str(shards), "--format", "wds,rec", "--backends", "torch,mosaic,litdata",
                              "--workers", "2", *QUICK, "--resume-check", "--peers-dir", str(tmp_path / "peers"),
                              "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["backend"], r["format"]): r for r in report["results"]}
    assert set(rows) == {("torch", "wds"), ("mosaic", "wds"), ("litdata", "wds"), ("torch", "rec")}
    for backend in ("mosaic", "litdata"):
        r = rows[backend, "wds"]
        assert r["median"] > 0 and r["first_batch_s"][0] > 0 and r["tokens"] == "raw"
        assert r["ratio_torch"] == pytest.approx(r["median"] / rows["torch", "wds"]["median"])
        assert (tmp_path / "peers" / backend / "index.json").exists()
    assert {(s["backend"], s["format"]) for s in report["skipped"]} == {("mosaic", "rec"), ("litdata", "rec")}
    resume = {r["backend"]: r for r in report["resume"]}
    assert set(resume) == {"torch", "mosaic", "litdata"}
    for r in resume.values():
        assert r["epoch_samples"] == 96 and r["before_stop"] == 32 and r["after_restore"] == 64
        assert r["exact"] and r["repeated"] == 0 and r["missing"] == 0
    printed = capsys.readouterr().out
    assert "| mosaic | wds |" in printed and "Mid-epoch resume" in printed and "| litdata | 96 |" in printed


@pytest.mark.slow  # a moto server, uploads, three measurements and three resume checks: ~11 s
def test_s3_rows_read_from_a_loopback_server(shards, tmp_path, capsys):
    """--s3: our loader (s3:// + cache) and both peers read the same data from moto on 127.0.0.1."""
    pytest.importorskip("moto")
    out = tmp_path / "s3.json"
    before = os.environ.get("AWS_ENDPOINT_URL")
    assert bench_loader.main(["--shards", str(shards), "--backends", "torch,mosaic,litdata,openclip",
                              "--workers", "2", *QUICK, "--s3", "--resume-check", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    labels = {r["label"]: r for r in report["results"]}
    assert set(labels) == {"torch (s3)", "mosaic (s3)", "litdata (s3)"}
    assert all(r["median"] > 0 for r in labels.values())
    assert report["skipped"] == [{"backend": "openclip (s3)", "format": "wds",
                                  "reason": "reads local files only (--s3)"}]
    assert all(r["exact"] for r in report["resume"]) and len(report["resume"]) == 3
    assert os.environ.get("AWS_ENDPOINT_URL") == before  # the server's variables are gone
