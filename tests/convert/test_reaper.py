"""The reaper behind `make-shards --distributor ray` and the benchmarks' tool runs: a SIGKILLed run's
processes die with it, found by process tree even when their environment does not carry the run's
mark; older processes live on."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tools.convert.reaper import process_table

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the reaper needs Linux /proc")

DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from tools.convert.reaper import start_reaper
    older = subprocess.Popen(["sleep", "60"])           # started before the reaper: not the run's
    start_reaper()
    clean = subprocess.Popen(["sleep", "60"], env={})  # no mark in its environment
    inner = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], env={})  # and a grandchild
    time.sleep(1.0)                                     # the reaper has seen them
    print(older.pid, clean.pid, inner.pid, flush=True)
    time.sleep(60)
""")


def alive(pid: int) -> bool:
    state = process_table().get(pid)
    return state is not None and state[2] != b"Z"


def test_killed_run_takes_its_unmarked_processes_and_spares_older_ones():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    older, clean, inner = map(int, driver.stdout.readline().split())
    grandchild = [p for p, (ppid, _, _) in process_table().items() if ppid == inner]
    assert len(grandchild) == 1 and alive(clean)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    while any(alive(p) for p in (clean, inner, *grandchild)) and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert not any(alive(p) for p in (clean, inner, *grandchild))
        assert alive(older), "a process started before the reaper is not the run's"
    finally:
        for pid in (older, clean, inner, *grandchild):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


BENCH_DRIVER = textwrap.dedent("""
    import subprocess, time
    from tools.convert.reaper import reaped
    with reaped():                                      # as bench-convert and bench-train run a tool
        tool = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
        time.sleep(1.0)                                 # the reaper has seen it and its child
        print(tool.pid, flush=True)
        tool.wait()
""")


def test_a_killed_benchmark_takes_the_tool_it_runs_along():
    driver = subprocess.Popen([sys.executable, "-c", BENCH_DRIVER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    tool = int(driver.stdout.readline())
    worker = [p for p, (ppid, _, _) in process_table().items() if ppid == tool]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    while any(alive(p) for p in (tool, *worker)) and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert len(worker) == 1 and not any(alive(p) for p in (tool, *worker))
    finally:
        for pid in (tool, *worker):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
