"""A loader's helper processes (issue 26).

1. No loader process outlives its loader (fault 11): a process holding a loader is SIGKILLed
   alone (as the OOM killer does: its children get no signal) and every process it had started
   is gone within seconds: DALI's external-source workers (forked on the CPU, spawned on the GPU;
   spawn is tried here on the CPU graph), torch's DataLoader workers, the folder index's pool.
   The whole trainer under SIGKILL: tests/train/test_no_orphans.py.
2. A spawned worker maps the folder index its loader mapped, or fails: never another version
   written at the same path since (the suspicion about DALI's spawned GPU workers).
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_synthetic_shards
from pipelines.errors import FolderIndexError
from pipelines.formats.index import INDEX_NAME, FolderIndex
from tools.convert.reaper import descendants, process_table

REPO = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 5  # parent_watch polls every 0.5 s; the rest is slack for a loaded machine

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

HOLD_A_LOADER = """
import sys, time
import pipelines.backends.dali
from pipelines.loader import LoaderConfig, build_loader
backend, start_method, shards = sys.argv[1:4]
pipelines.backends.dali.START_METHOD = start_method or None
pipelines.backends.dali.IN_PROCESS = False if start_method else None  # the workers, on the CPU graph too
loader = build_loader(LoaderConfig(shards=shards, backend=backend, device="cpu", batch_size=4, image_size=16,
                                   workers=2))
it = iter(loader)
next(it)
print("ready", flush=True)
time.sleep(600)
"""

FORK_A_POOL = """
import os, sys, time
from pipelines.formats import folder_index

def stuck(job):  # the pool's jobs block: the pool is busy when its parent dies
    time.sleep(600)

folder_index.PARALLEL_FROM, folder_index._piece_args = 2, stuck
next(folder_index.pieces("wds", sys.argv[1], sorted(os.listdir(sys.argv[1])), True, progress=False))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return str(build_synthetic_shards(tmp_path_factory.mktemp("watch_data"), 48, "wds", 12) / "wds")


def children_of(pid: int) -> dict[int, int]:
    """pid -> start time of every process below `pid`."""
    table = process_table()
    return {p: table[p][1] for p in descendants(table, {pid}, set()) - {pid}}


def alive(procs: dict[int, int]) -> dict[int, int]:
    table = process_table()
    return {p: s for p, s in procs.items() if table.get(p, (0, -1, b""))[1] == s and table[p][2] != b"Z"}


def kill_and_watch(argv: list[str], ready=lambda proc: proc.stdout.readline()) -> dict[int, int]:
    """Start `argv`, wait until it is ready, SIGKILL it alone; its processes still alive
    GONE_WITHIN_S later (then killed here, so a failing test leaves nothing either)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids: dict[int, int] = {}
    try:
        assert ready(proc), proc.stderr.read()[-3000:]
        kids = children_of(proc.pid)
        assert kids, "the loader started no process"
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone
        proc.wait()
        deadline = time.monotonic() + GONE_WITHIN_S
        while alive(kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive(kids)
    finally:
        if proc.poll() is None:
            kids |= children_of(proc.pid)
            proc.kill()
            proc.wait()
        for pid in alive(kids):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("backend, start_method", [("dali", "fork"), ("dali", "spawn"), ("torch", "")])
def test_workers_die_with_the_loader_process(shards, backend, start_method):
    left = kill_and_watch([sys.executable, "-c", HOLD_A_LOADER, backend, start_method, shards])
    assert not left, f"{backend} {start_method}: still alive {GONE_WITHIN_S} s after the kill: {left}"


def test_dali_on_the_cpu_graph_starts_no_process(shards):
    """The CPU graph reads in the calling process (pipelines/backends/dali.py, reads_in_process): nothing to outlive it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_A_LOADER, "dali", "", shards], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline(), proc.stderr.read()[-3000:]
        assert not children_of(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_folder_index_pool_dies_with_its_parent(shards):
    left = kill_and_watch([sys.executable, "-c", FORK_A_POOL, shards], ready=lambda proc: _wait_for_children(proc.pid, 2))
    assert not left, f"index pool still alive {GONE_WITHIN_S} s after the kill: {left}"


def _wait_for_children(pid: int, n: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(children_of(pid)) >= n:
            time.sleep(0.5)  # the pool's workers have run their initializer
            return True
        time.sleep(0.1)
    return False


def test_watch_parent_exits_when_the_parent_is_gone_already():
    """A helper whose parent died before it looked (re-parented already) exits at once."""
    code = ("import os, sys; from pipelines.parent_watch import watch_parent; "
            "watch_parent(parent=os.getppid() + 10**6); print('not reached')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not reached" not in out.stdout


def test_a_worker_never_maps_another_index_than_its_loader(shards, tmp_path):
    """What a spawned worker receives (the pickle: path and identity) against the file at that path
    now: the same file maps; a file written there since is an error naming it, where it used to be
    mapped silently, its offsets read against the loader's plan of the old version."""
    folder = tmp_path / "wds"
    shutil.copytree(shards, folder)
    index = FolderIndex(str(folder / INDEX_NAME))
    sent = pickle.dumps(index)
    assert pickle.loads(sent).keys([0, 5]) == index.keys([0, 5])
    other = build_synthetic_shards(tmp_path / "v2", 20, "wds", 5) / "wds" / INDEX_NAME  # a re-conversion
    shutil.copy(other, folder / "index.bin.tmp")
    os.replace(folder / "index.bin.tmp", folder / INDEX_NAME)
    with pytest.raises(FolderIndexError, match="replaced after the loader opened it"):
        pickle.loads(sent)
    assert len(pickle.loads(pickle.dumps(FolderIndex(str(folder / INDEX_NAME))))) == 20  # a fresh open is fine
