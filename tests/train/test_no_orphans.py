"""A killed trainer leaves no process behind (issue 26, fault 11).

`python -m train.main` is SIGKILLed mid-training, the trainer process alone (what the OOM killer
does; a preemption or `scancel` may signal only the main process too), once per backend: torch
(DataLoader workers) and DALI's external-source workers, forked (the GPU graph's set-up: the CPU graph
reads in the trainer process unless told otherwise, which the test does). Ten seconds later no
process of the run may be left: neither one of the process tree recorded just before the kill
(pid and start time, so a reused pid is not mistaken for one) nor one carrying the run's
environment mark.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import build_synthetic_shards, overrides
from tools.convert.reaper import descendants, marked, process_table

REPO = Path(__file__).resolve().parents[2]
MARK = "LIP_NO_ORPHANS_RUN"
WAIT_S = 10

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return str(build_synthetic_shards(tmp_path_factory.mktemp("orphan_data"), 64, "wds", 16) / "wds")


def alive(procs: dict[int, int]) -> dict[int, int]:
    table = process_table()
    return {p: s for p, s in procs.items() if table.get(p, (0, -1, b""))[1] == s and table[p][2] != b"Z"}


def survivors(tree: dict[int, int], mark: str) -> dict[int, int]:
    """pid → start time of every process of the run still alive: of the tree recorded before the
    kill, or carrying the run's mark."""
    now = process_table()
    return alive(tree) | {p: now[p][1] for p in marked(now, f"{MARK}={mark}".encode()) if now[p][2] != b"Z"}


@pytest.mark.slow  # a trainer process (~4 s of imports) and a few steps before the kill: ~5 s
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_sigkilled_trainer_leaves_no_process(shards, tmp_path, backend):
    mark = uuid.uuid4().hex
    argv = overrides(shards, tmp_path, backend, data__backend=backend, data__device="cpu", data__workers=2,
                     data__batch_size=8, optim__max_steps=100000, optim__epochs=1000, run__ckpt_every=100000)
    env = {**os.environ, "PYTHONPATH": str(REPO), MARK: mark, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        # The DALI CPU graph reads in-process; force the worker processes the GPU graph keeps.
        start = ("import sys, pipelines.backends.dali as d, train.main as m; d.IN_PROCESS = False; "
                 "sys.exit(m.main(sys.argv[1:]))")
        proc = subprocess.Popen([sys.executable, "-c", start, *argv], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    metrics = tmp_path / backend / "metrics.jsonl"
    tree: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # mid-training
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        table = process_table()
        tree = {p: table[p][1] for p in descendants(table, {proc.pid}, set()) | marked(table, f"{MARK}={mark}".encode())
                if p in table}
        assert len(tree) >= 3, f"the trainer and its 2 loader workers, found {tree}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Only a process of the run can start another, so the first look that finds none proves what
        # a look WAIT_S later would (a helper notices its parent gone within parent_watch.POLL_S).
        deadline = time.monotonic() + WAIT_S
        while (left := survivors(tree, mark)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"{backend}: processes of the killed run alive {WAIT_S} s later: {sorted(left)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in alive(tree):
            os.kill(pid, signal.SIGKILL)
