"""make-shards on Ray (one local 2-CPU Ray per module) against the local pool, byte for byte; retries
of a killed task; resume; and no worker outliving a SIGKILLed make-shards, on both distributors."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import synthetic_input
from kill_harness import marked_pids
from tools.convert import make_shards
from tools.convert.shard_worker import FAULT_DIR_ENV

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--format", "wds,arrow,rec", "--tokenize", "--samples-per-shard", "4", "--quiet"]
TIMINGS = ("seconds", "samples_per_second")  # stats.json: wall-clock figures, legitimately different


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    """36 synthetic images with synthetic captions: make-shards' input arguments (no --out)."""
    return synthetic_input(tmp_path_factory.mktemp("syn"), 36, size=48)


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def ray_session(fault_dir):
    """One local Ray for the module; the fault folder is set first so Ray's workers inherit it."""
    os.environ[FAULT_DIR_ENV] = str(fault_dir)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
    os.environ.pop(FAULT_DIR_ENV, None)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert make_shards.main(dataset + ARGS + ["--out", str(out), "--workers", "2"]) == 0
    return out


def folder_bytes(out: Path) -> dict[str, bytes]:
    """Every file of the conversion; stats.json without its timings."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "stats.json":
                stats = json.loads(data)
                data = json.dumps({k: v for k, v in stats.items() if k not in TIMINGS + ("shards_reused",)})
            files[str(p.relative_to(out))] = data
    return files


def test_ray_output_equals_local_pool_byte_for_byte(dataset, reference, ray_session, tmp_path):
    out = tmp_path / "ray"
    assert make_shards.main(dataset + ARGS + ["--out", str(out), "--distributor", "ray"]) == 0
    want = folder_bytes(reference)
    assert {Path(k).suffix for k in want} >= {".tar", ".arrow", ".rec", ".idx", ".jsonl", ".json"}
    assert len([k for k in want if k.endswith(".tar")]) == 9
    assert folder_bytes(out) == want
    assert json.loads((out / "wds" / "stats.json").read_text())["written"] == 36


def test_ray_resume_redoes_only_unfinished_shards(dataset, reference, ray_session, tmp_path):
    out = tmp_path / "ray"
    argv = dataset + ARGS + ["--out", str(out), "--distributor", "ray"]
    assert make_shards.main(argv) == 0
    # What an interrupted run leaves: shards without completion records, a shard cut short, tmp files.
    (out / "arrow" / ".parts" / "000003.json").unlink()
    (out / "rec" / ".parts" / "000005.json").unlink()
    (out / "wds" / "000006.tar").write_bytes(b"cut")
    (out / "wds" / "000007.tar.tmp").write_bytes(b"half")
    (out / "rec" / ".parts" / "000007.json.tmp").write_bytes(b"{")
    assert make_shards.main(argv) == 2  # neither --resume nor --overwrite
    assert make_shards.main(argv + ["--resume"]) == 0
    assert folder_bytes(out) == folder_bytes(reference)
    assert json.loads((out / "wds" / "stats.json").read_text())["shards_reused"] == 9 - 3


def test_ray_retries_a_task_whose_worker_was_killed(dataset, reference, ray_session, fault_dir, tmp_path):
    (fault_dir / "kill-000002").touch()
    (fault_dir / "kill-000005").touch()
    out = tmp_path / "ray"
    assert make_shards.main(dataset + ARGS + ["--out", str(out), "--distributor", "ray"]) == 0
    assert (fault_dir / "kill-000002.fired").exists() and (fault_dir / "kill-000005.fired").exists()
    assert folder_bytes(out) == folder_bytes(reference)


def test_ray_missing_or_misused_is_one_clear_line(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when it is not installed
    assert make_shards.main(dataset + ARGS + ["--out", str(tmp_path / "a"), "--distributor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install '.[ray]'" in err
    assert make_shards.main(dataset + ARGS + ["--out", str(tmp_path / "b"), "--ray-address", "auto"]) == 2
    assert "--distributor ray" in capsys.readouterr().err


def describe(pid: int) -> str:
    """pid, command line, and which run markers it carries: what a failure needs to say."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return f"{pid} (gone)"
    marks = [e.decode() for e in env if e.startswith(b"MAKE_SHARDS_")]
    return f"{pid} {cmd!r} {marks}"


def kill_mid_run(dataset, out: Path, *extra: str) -> None:
    """Start make-shards, SIGKILL it once its first shard is done and its workers are up (shard 1
    is held, so the run cannot finish first however slow the machine); then no process it started
    may live on (checked for 15 s: Ray's own processes take a moment to go)."""
    mark = f"LIP_TEST_RUN={uuid.uuid4().hex}"
    faults = out.parent / f"{out.name}-faults"
    faults.mkdir()
    (faults / "hold-000001").touch()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[mark.split("=")[0]] = mark.split("=")[1]
    env[FAULT_DIR_ENV] = str(faults)
    proc = subprocess.Popen([sys.executable, "-m", "tools.convert.make_shards", *dataset, *ARGS, "--out", str(out),
                             "--samples-per-shard", "2", *extra], cwd=REPO, env=env)
    first = out / "rec" / ".parts" / "000000.json"
    deadline = time.time() + 180
    while not (first.exists() and len(marked_pids(mark)) >= 3) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "make-shards ended before the kill"
    assert first.exists() and len(marked_pids(mark)) >= 3, "no shard done or no workers started in 180 s"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while (left := marked_pids(mark)) and time.time() < deadline:
        time.sleep(0.2)
    described = [describe(pid) for pid in left]
    for pid in left:  # do not leak them into the rest of the test session
        os.kill(pid, signal.SIGKILL)
    assert not left, f"orphans of the killed make-shards: {described}"
    assert not (out / "wds" / "manifest.json").exists(), "the kill should land mid-run"


def test_local_pool_workers_die_with_killed_parent_and_resume_matches(dataset, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    kill_mid_run(dataset, killed, "--workers", "2")
    argv = dataset + ARGS + ["--samples-per-shard", "2", "--workers", "2"]
    assert make_shards.main(argv + ["--out", str(killed), "--resume"]) == 0
    assert make_shards.main(argv + ["--out", str(clean)]) == 0
    assert folder_bytes(killed) == folder_bytes(clean)


@pytest.mark.slow  # the killed run starts a local Ray of its own (~4 s), then the resume: ~11 s
def test_ray_workers_die_with_killed_parent_and_resume_matches(dataset, ray_session, tmp_path):
    """The killed run started its own local Ray; the resume joins the module's."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    kill_mid_run(dataset, killed, "--workers", "2", "--distributor", "ray")
    argv = dataset + ARGS + ["--samples-per-shard", "2", "--distributor", "ray"]
    assert make_shards.main(argv + ["--out", str(killed), "--resume"]) == 0
    assert make_shards.main(argv + ["--out", str(clean), "--workers", "2", "--distributor", "local"]) == 0
    assert folder_bytes(killed) == folder_bytes(clean)


@pytest.mark.slow  # make-shards starts a local Ray of its own: ~6 s
def test_without_an_address_it_starts_its_own_ray_whatever_the_address_file_says(dataset, tmp_path):
    """The node's Ray address file names a cluster (here a stale one: nothing listens there, as after
    a killed `ray start`); without --ray-address or RAY_ADDRESS make-shards must not join it."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = str(ray_tmp)
        out = tmp_path / "out"
        done = subprocess.run([sys.executable, "-m", "tools.convert.make_shards", *dataset, "--format", "wds", "--quiet",
                               "--samples-per-shard", "18", "--out", str(out), "--distributor", "ray",
                               "--workers", "2"], cwd=REPO, env=env, timeout=300, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert json.loads((out / "wds" / "stats.json").read_text())["written"] == 36
