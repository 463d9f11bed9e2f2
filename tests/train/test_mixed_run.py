"""lip-train on a mixture of three sources (wds and arrow on the local disk, RecordIO on the loopback
S3 server): torchrun with two ranks SIGKILLed after a checkpoint (its ranks end with it), resumed at
world size 1; the per-source counts in the records go on from the checkpoint and add up."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_synthetic_shards, overrides, run_main
from s3_server import s3, upload_folder  # noqa: F401 - the module-scoped server fixture
from train import checkpoint

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children first found, then theirs)."""
    parents = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(p)] = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        up = todo.pop()
        kids = [c for c, parent in parents.items() if parent == up]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.dist
@pytest.mark.slow  # three sources converted, torchrun twice (two ranks, then one), a kill and a resume: ~11 s
@pytest.mark.timeout(600)
def test_mixture_run_killed_under_torchrun_resumes_at_another_world_size(tmp_path, s3):  # noqa: F811
    roots = {}
    for name, n, fmt, per in (("coco", 64, "wds", 16), ("cc3m", 96, "rec", 24), ("sbu", 32, "arrow", 8)):
        built = build_synthetic_shards(tmp_path / "build" / name, n, fmt, per)
        shutil.move(str(built), tmp_path / name)
        roots[name] = tmp_path / name
    url = s3.url("cc3m")
    upload_folder(roots["cc3m"], url)
    sources = (f"[{{shards: {roots['coco'] / 'wds'}}}, {{shards: {url}, weight: 0.5, name: cc3m}}, "
               f"{{shards: {roots['sbu'] / 'arrow'}, weight: 2}}]")
    argv = overrides(sources, tmp_path / "runs", "mixed", data__batch_size=8, optim__max_steps=10,
                     run__ckpt_every=2, run__keep_checkpoints=5, loss__mode="clip-both",
                     data__cache_dir=str(tmp_path / "cache"), data__cache_limit="1MB")
    run_dir = tmp_path / "runs" / "mixed"
    log = tmp_path / "torchrun.log"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        ranks = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                                  "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                                  "-m", "train.main", *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "step_00000004.pt").exists():
            assert ranks.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        tree = descendants(ranks.pid)  # torchrun starts its ranks in process groups of their own
        os.killpg(ranks.pid, signal.SIGKILL)  # torchrun alone: its ranks must end with it
        ranks.wait()
        deadline = time.monotonic() + 10
        while (alive := [p for p in tree if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
    assert not alive, f"ranks outlived torchrun: {alive}"
    killed = checkpoint.load(checkpoint.list_checkpoints(str(run_dir / "checkpoints"))[-1])
    k = killed["step"]
    assert 4 <= k < 10 and killed["loader"]["world_size"] == 2
    assert sum(killed["sources_seen"].values()) == k * 2 * 8  # both ranks' samples, per source
    assert [s["name"] for s in killed["loader"]["sources"]] == ["coco", "cc3m", "sbu"]
    assert killed["loader"]["sources"][1]["shards"] == url

    result = run_main(argv + ["run.resume=latest"])  # one process now: elastic
    assert result["steps"] == 10
    final = checkpoint.load(str(run_dir / "checkpoints" / "step_00000010.pt"))
    assert final["loader"]["world_size"] == 1
    seen = final["sources_seen"]
    assert sum(seen.values()) == k * 16 + (10 - k) * 8  # nothing counted twice across the kill
    assert all(seen[name] > 0 for name in ("coco", "cc3m", "sbu"))
    rows = read_metrics(run_dir)
    last = rows[-1]
    assert last["step"] == 10 and {f"data/samples/{n}" for n in seen} <= set(last)
    assert {n: last[f"data/samples/{n}"] for n in seen} == seen
    config = (run_dir / "config.yaml").read_text()
    assert "# data sources, as resolved:" in config and f"shards: {url}, format: rec, samples: 96, weight: 0.5" \
        f", per_epoch: 48" in config
