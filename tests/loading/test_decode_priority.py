"""The loader's decoders run `decode_nice` below the thread that iterates it (pipelines/priority.py):
DALI's threads, DALI's reading workers and the torch backend's workers; the iterating thread itself
and everything else in the process stay as they were; 0 leaves everything alone."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import build_synthetic_shards
from pipelines import priority
from pipelines.loader import LoaderConfig, build_loader
from pipelines.priority import DALI_THREADS, NICE_MAX, resolve_nice
from tools.convert.reaper import descendants, process_table
from train.config import ConfigError, load_config

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread priorities: needs Linux /proc")
BASE = os.getpriority(os.PRIO_PROCESS, 0)


def needs_room(nice: int) -> None:
    if BASE + nice > NICE_MAX:
        pytest.skip(f"this test process runs at nice {BASE}: no room {nice} below it (run it at nice ≤ {NICE_MAX - nice})")


def threads(pid: int | str = "self") -> dict[int, tuple[str, int]]:
    """tid -> (name, nice) of every thread of process `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[int(tid)] = (f.read().strip(), os.getpriority(os.PRIO_PROCESS, int(tid)))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return str(build_synthetic_shards(tmp_path_factory.mktemp("nice_data"), 64, "wds", 16) / "wds")


def loader(shards: str, **kw):
    return build_loader(LoaderConfig(shards=shards, device="cpu", batch_size=4, image_size=16, workers=2, **kw))


def test_the_default_and_its_bounds():
    assert resolve_nice(None, "cpu") == priority.CPU_DEFAULT == 10
    assert resolve_nice(None, "gpu") == 0  # not measured on a GPU: left as it is
    assert resolve_nice(0, "cpu") == 0 and resolve_nice(19, "gpu") == 19
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="decode_nice must be 0..19"):
            resolve_nice(bad, "cpu")
    with pytest.raises(ConfigError, match="data.decode_nice: .*0..19"):
        load_config(None, ["data.train_shards=x", "data.decode_nice=-5"])
    assert load_config(None, ["data.train_shards=x"]).data.decode_nice is None


@pytest.mark.parametrize("nice", [None, 0, 3])
def test_dali_threads_run_below_the_iterating_thread(shards, nice):
    pytest.importorskip("nvidia.dali")
    want = resolve_nice(nice, "cpu")
    needs_room(want)
    before = threads()
    data = loader(shards, backend="dali", decode_nice=nice)
    it = iter(data)
    next(it)
    next(it)
    now = threads()  # this loader's DALI threads (another test's pipeline may still be about)
    dali = {tid: v for tid, (name, v) in now.items() if name.startswith(DALI_THREADS) and tid not in before}
    assert len(dali) >= 3, now  # its thread pool, executor and input threads
    assert set(dali.values()) == {BASE + want}
    assert {tid: now[tid] for tid in before if tid in now} == {tid: before[tid] for tid in before if tid in now}
    assert os.getpriority(os.PRIO_PROCESS, 0) == BASE  # the iterating thread: as it was
    data.close()


def test_a_loader_lowers_its_own_threads_only(shards):
    """Two DALI loaders in one process (a training and an eval loader, say): the second's setting
    leaves the first's threads as the first set them."""
    pytest.importorskip("nvidia.dali")
    needs_room(3)
    before = set(threads())
    first = loader(shards, backend="dali", decode_nice=0)
    it = iter(first)
    next(it)
    mine = {tid for tid, (name, _) in threads().items() if name.startswith(DALI_THREADS)} - before
    second = loader(shards, backend="dali", decode_nice=3)
    it2 = iter(second)
    next(it2)
    now = threads()
    theirs = {tid for tid, (name, _) in now.items() if name.startswith(DALI_THREADS)} - mine - before
    assert mine and theirs
    assert {now[t][1] for t in mine if t in now} == {BASE}
    assert {now[t][1] for t in theirs} == {BASE + 3}
    first.close(), second.close()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_worker_processes_read_below_the_training_thread(shards, backend, monkeypatch):
    """The torch backend's DataLoader workers, and DALI's reading workers (the GPU graph's way; here
    forced on the CPU graph) run 3 below the trainer, every thread of them."""
    if backend == "dali":
        dali = pytest.importorskip("pipelines.backends.dali")
        monkeypatch.setattr(dali, "IN_PROCESS", False)
        monkeypatch.setattr(dali, "START_METHOD", "fork")
    needs_room(3)
    me = os.getpid()
    before = descendants(process_table(), {me}, set())  # (an earlier test's server, say: not the loader's)
    data = loader(shards, backend=backend, decode_nice=3)
    it = iter(data)
    next(it)
    next(it)
    kids = descendants(process_table(), {me}, set()) - before
    assert len(kids) >= 2, "the loader started no worker"
    for pid in kids:  # every thread of each: the one that reads and decodes, and its helpers
        assert {v for _, v in threads(pid).values()} == {BASE + 3}, (pid, threads(pid))
    assert os.getpriority(os.PRIO_PROCESS, 0) == BASE
    data.close()
    del it


def test_lower_named_threads_leaves_the_rest():
    import threading

    stop, named = threading.Event(), threading.Barrier(3)

    def wait_as(name: str) -> None:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name)  # the name the kernel shows, as DALI's threads set theirs
        named.wait()
        stop.wait()

    mine = threading.Thread(target=wait_as, args=("[DALI]probe",))
    other = threading.Thread(target=wait_as, args=("someone",))
    mine.start(), other.start()
    named.wait()
    try:
        needs_room(2)
        assert priority.lower_named_threads("[DALI]probe", 2) == 1
        assert os.getpriority(os.PRIO_PROCESS, mine.native_id) == BASE + 2
        assert os.getpriority(os.PRIO_PROCESS, other.native_id) == BASE
        assert priority.lower_named_threads("[DALI]probe", 0) == 0  # 0: nothing touched
    finally:
        stop.set()
        mine.join(), other.join()


def test_a_thread_gone_meanwhile_fails_nothing(monkeypatch):
    """DALI ends threads at any time (the suite met one ending between the listing and the read of
    its name): lowering skips it, and a priority never fails a run. (A thread just joined cannot
    stand in: the kernel may still list it.)"""
    monkeypatch.setattr(priority, "thread_ids", lambda: {"999999999"})  # above any pid_max: no such thread
    assert priority.lower_named_threads("", 2) == 0  # its name: FileNotFoundError
    priority.lower_process(2)  # its priority: ESRCH, and no error

    def ending(*_args, **_kw):
        raise ProcessLookupError(3, "No such process")  # what reading the name of a thread ending gave

    monkeypatch.setattr(priority, "open", ending, raising=False)
    monkeypatch.setattr(priority, "thread_ids", lambda: {str(os.getpid())})
    assert priority.lower_named_threads("", 2) == 0
    assert os.getpriority(os.PRIO_PROCESS, 0) == BASE
