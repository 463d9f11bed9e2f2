"""The node cache under real cluster conditions (issue 26, faults 1-4 and two suspicions), each
reproduced against the loopback S3 server:

1. a job opening a re-converted dataset while another job owned the node's folder got the new
   index over the old shard bytes (12 of 12 samples with the old captions);
2. a takeover kept an old-version file a reader still held, and served it for good;
3. ranks in other PID namespaces (one container per rank): the owner dropped live readers'
   requests, whose pids it could not see, and reads failed after the whole wait;
4. two urls under one cache_dir held twice cache_limit on disk;
plus a request whose pid was reused by another process (never dropped: it starved live readers),
and a cache_dir on a network filesystem (one cache for all hosts).
"""
from __future__ import annotations

import fcntl
import itertools
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.storage import cached_files, shard_cache, remote as storage
from pipelines.shardset import ShardSet
from s3_server import s3  # noqa: F401 - the module-scoped server fixture
from test_shard_cache import _held, convert, shard_bytes, sixteen  # noqa: F401 - sixteen: a fixture
from test_storage import loader, upload_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    monkeypatch.setattr(shard_cache, "WAIT_TIMEOUT_S", 30.0)  # a starved read fails in 30 s, not 900


def captions(shards: ShardSet) -> list[str]:
    """The first word of every sample's caption ("first" or "other": the version it came from)."""
    return [shards.get(g).txt.split()[0] for g in range(len(shards))]


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two conversions of 12 samples (3 shards) with the same shard sizes and other captions."""
    root = tmp_path_factory.mktemp("versions")
    old, new = convert(root / "v1", 12, 4, caption="first"), convert(root / "v2", 12, 4, caption="other")
    sizes = [{p.name: p.stat().st_size for p in folder.glob("*.tar")} for folder in (old, new)]
    assert sizes[0] == sizes[1]
    return old, new


# --- fault 1: a non-owner never reads another version's files -------------------------------------

def test_a_second_job_on_a_reconverted_dataset_reads_the_new_version(s3, versions, tmp_path):  # noqa: F811
    """Job 1 owns the node's cache for the url and holds version 1; the dataset is re-converted
    at the same url; job 2 opens it with the same cache_dir while job 1 runs. Job 2 reads
    version 2 only, job 1 still version 1 (before: job 2 got 12 of 12 samples of version 1)."""
    old, new = versions
    url, cache = s3.url("live-reconvert"), str(tmp_path)
    upload_folder(old, url)
    job1 = ShardSet(url, "wds", cache_dir=cache)
    assert job1.cache.owner and set(captions(job1)) == {"first"}
    upload_folder(new, url)
    job2 = ShardSet(url, "wds", cache_dir=cache)
    try:
        assert captions(job2) == ["other"] * 12
        assert captions(job1) == ["first"] * 12
    finally:
        job2.close()
        job1.close()


# --- fault 2: a takeover re-verifies, and never serves a file it could not delete ---------------------

def test_a_takeover_never_serves_an_old_file_a_reader_still_holds(s3, versions, tmp_path):  # noqa: F811
    """A reader of version 1 holds shard 1 while its owner closes; version 2 is uploaded and a new
    loader opens the url. It reads version 2 for every shard, while the reader holds on and after
    it let go (before: it kept the old file, marked present, and served version 1 for good)."""
    old, new = versions
    url, cache = s3.url("held-reconvert"), str(tmp_path)
    upload_folder(old, url)
    job1 = ShardSet(url, "wds", cache_dir=cache)
    assert set(captions(job1)) == {"first"}
    held = job1.cache.acquire(1)
    job1.close()
    upload_folder(new, url)
    job2 = ShardSet(url, "wds", cache_dir=cache)
    try:
        assert captions(job2) == ["other"] * 12
        held.close()
        assert captions(job2) == ["other"] * 12
    finally:
        held.close()
        job2.close()


def test_an_unverified_file_a_reader_holds_at_takeover_is_never_read(s3, versions, tmp_path):  # noqa: F811
    """Within one version: a cached shard changed on disk (same size, other bytes) while a reader
    holds it. The new owner cannot delete it; no reader may read it, and once the reader lets go
    the shard is fetched anew (before: marked present and read as it was)."""
    old, _ = versions
    url, cache = s3.url("held-corrupt"), str(tmp_path)
    upload_folder(old, url)
    first = ShardSet(url, "wds", cache_dir=cache)
    expected = captions(first)
    folder = first.cache.folder
    first.close()
    path = os.path.join(folder, "000001.tar")
    reader = os.open(path + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(reader, fcntl.LOCK_SH)  # a reader of another process, mid-read
    with open(path, "r+b") as f:
        f.write(b"\0" * os.path.getsize(path))
    threading.Timer(1.0, os.close, (reader,)).start()  # it lets go a second later
    again = ShardSet(url, "wds", cache_dir=cache)
    try:
        assert captions(again) == expected
    finally:
        again.close()


# --- fault 3 and the pid-reuse suspicion: requests live by their lock, not their pid -----------------

def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.timeout(120)
@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare --pid --fork` (root or user namespaces)")
def test_an_owner_in_another_pid_namespace_serves_this_readers_request(sixteen, tmp_path):  # noqa: F811
    """The owner runs in a PID namespace of its own (a container), this process reads: the owner
    cannot see this reader's pid. A shard asked for outside the owner's window must arrive (before:
    the owner deleted the request as a dead process's, and the read failed after the whole wait)."""
    url, _ = sixteen
    limit = 2 * shard_bytes(url)
    script = textwrap.dedent(f"""
        import os, sys, numpy as np
        from pipelines.shardset import ShardSet
        s = ShardSet({url!r}, "wds", cache_dir={str(tmp_path)!r}, cache_limit={limit})
        assert s.cache.owner
        s.cache.schedule(lambda: iter([np.arange(16)]))  # its window: shards 0 and 1
        print("owner", os.getpid(), flush=True)
        sys.stdin.read()
        s.close()
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    owner = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-c", script], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        assert line.startswith("owner 1"), line  # pid 1 of its own namespace
        reader = ShardSet(url, "wds", cache_dir=str(tmp_path), cache_limit=limit)
        assert not reader.cache.owner
        start = time.monotonic()
        held = reader.cache.acquire(13, position=1 << 40)  # far outside the owner's window
        held.close()
        assert time.monotonic() - start < 20
    finally:
        owner.stdin.close()
        owner.wait(30)


def _free_pid() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def _request(folder: str, name: str, pid: int, position: int, hold: bool) -> tuple[str, int | None]:
    """A request as another process leaves it: named by `pid`, held under its flock if `hold`."""
    path = os.path.join(folder, f"{name}.want.{pid}")
    tmp = os.path.join(folder, "building")  # named only once locked, as a reader does
    with open(tmp, "w") as f:
        f.write(str(position))
    fd = os.open(tmp, os.O_RDWR)
    if hold:
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.replace(tmp, path)
    if not hold:
        os.close(fd)
        fd = None
    return path, fd


@pytest.mark.timeout(120)
def test_a_live_request_whose_pid_the_owner_cannot_see_is_served(sixteen, tmp_path):  # noqa: F811
    """Fault 3 without namespaces: a reader elsewhere holds its request while its pid means
    nothing here. The owner must keep it and fetch the shard (before: deleted at once)."""
    url, _ = sixteen
    owner = ShardSet(url, "wds", cache_dir=str(tmp_path), cache_limit=2 * shard_bytes(url))
    owner.cache.schedule(lambda: iter([np.arange(16)]))
    path, fd = _request(owner.cache.folder, "000013.tar", _free_pid(), 1 << 40, hold=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(owner.cache.folder, "000013.tar.ok")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.path.exists(path), "the owner deleted a live request"
        assert os.path.exists(os.path.join(owner.cache.folder, "000013.tar.ok")), "the requested shard never came"
    finally:
        os.close(fd)
        owner.close()


@pytest.mark.timeout(120)
def test_a_dead_readers_request_is_dropped_though_its_pid_lives_on(sixteen, tmp_path):  # noqa: F811
    """A request left by a reader that died, its pid now another live process's (pid 1 here), at
    the earliest position, with room for one shard: it must be dropped, and a live reader's later
    request served (before: kept for good, and the live read starved until it timed out)."""
    url, _ = sixteen
    owner = ShardSet(url, "wds", cache_dir=str(tmp_path), cache_limit=shard_bytes(url))
    stale, _ = _request(owner.cache.folder, "000013.tar", 1, 0, hold=False)
    try:
        held = owner.cache.acquire(5, position=10)
        held.close()
        assert not os.path.exists(stale)
    finally:
        owner.close()


# --- fault 4: one cache_limit per node, whatever the number of urls ---------------------------------

def _disk_bytes(root: str) -> int:
    """Shard bytes under `root`: data files and downloads in progress in every cache folder, plus
    deleted ones still held open or mapped by this process or its children."""
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if name.split(".tmp-")[0].endswith(".tar"):
                try:
                    total += os.path.getsize(os.path.join(folder, name))
                except FileNotFoundError:
                    pass
    return total + sum(_held(root).values())


@pytest.mark.timeout(300)
def test_two_urls_read_together_stay_within_one_cache_limit(s3, sixteen, tmp_path):  # noqa: F811
    """A train and an eval url (two ShardSets, one process: what dataset mixing opens) with the
    same cache_dir and cache_limit, read in turns for two epochs: the bytes on disk under
    cache_dir never pass cache_limit (before: 2x, one limit per url folder)."""
    url, folder = sixteen
    other = s3.url("sixteen-eval")
    upload_folder(folder, other)
    limit = int(2.5 * shard_bytes(url))
    kw = dict(split="train", shuffle="block", shuffle_block_shards=1, batch_size=4, cache_dir=str(tmp_path),
              cache_limit=limit)
    a, b = loader(url, "wds", **kw), loader(other, "wds", **kw)
    worst, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            worst[0] = max(worst[0], _disk_bytes(str(tmp_path)))
            time.sleep(0.005)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(2):
            keys = {"a": [], "b": []}
            for x, y in itertools.zip_longest(a, b):  # both to their end: each loader then moves on an epoch
                keys["a"] += x.keys if x else []
                keys["b"] += y.keys if y else []
            assert len(set(keys["a"])) == len(set(keys["b"])) == 64
    finally:
        done.set()
        watcher.join()
        a.close()
        b.close()
    fetched = [x.shardset.cache.stats()["fetched"] for x in (a, b)]
    print(f"peak {worst[0]} bytes on disk, limit {limit} ({worst[0] / limit:.2f}x); fetched {fetched} of 2 x 32 reads")
    assert worst[0] <= limit, (worst[0], limit)
    assert a.shardset.cache.stats()["evicted"] + b.shardset.cache.stats()["evicted"] > 0


# --- suspicion: a cache_dir on a shared filesystem ---------------------------------------------------

def test_a_cache_dir_on_a_network_filesystem_keeps_a_cache_per_host(sixteen, tmp_path, monkeypatch):  # noqa: F811
    """On NFS (faked), two hosts opening one url with the same cache_dir each own a cache of their
    own, so no lock or request has to work across hosts (before: one folder, one owner for all)."""
    url, _ = sixteen
    monkeypatch.setattr(cached_files, "fs_type", lambda path, mounts="/proc/mounts": "nfs4", raising=False)
    sets = []
    try:
        for host in ("node-a", "node-b"):
            monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
            sets.append(ShardSet(url, "wds", cache_dir=str(tmp_path)))
        assert all(s.cache.owner for s in sets)
        assert [Path(s.cache.folder).relative_to(tmp_path).parts[0] for s in sets] == ["host-node-a", "host-node-b"]
    finally:
        for s in sets:
            s.close()


def test_the_filesystem_type_comes_from_the_longest_mount_point(tmp_path, monkeypatch):
    from pipelines.storage.cached_files import NETWORK_FS, fs_type, node_root

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/home {tmp_path}/home nfs4 rw 0 0\n"
                      f"/dev/vdb {tmp_path}/home/my\\040scratch xfs rw 0 0\n")
    assert fs_type(str(tmp_path / "home" / "u" / ".cache"), str(mounts)) == "nfs4" and "nfs4" in NETWORK_FS
    assert fs_type(str(tmp_path / "home" / "my scratch" / "c"), str(mounts)) == "xfs"
    assert fs_type("/var/tmp", str(mounts)) == "ext4"
    monkeypatch.setattr(cached_files, "fs_type", lambda path, mounts="/proc/mounts": "ext4")
    assert node_root(str(tmp_path)) == str(tmp_path)  # a local disk: one cache for the node's containers


# --- what a dead owner leaves: its reservations and partial downloads count for nothing ---------------

def test_a_dead_owners_reservation_and_partial_download_are_cleared_and_a_live_one_counts(tmp_path):
    from pipelines.storage.cache_locks import Record
    from pipelines.storage.node_budget import NodeBudget, write_catalog

    one, two = tmp_path / "url-a" / "v-1", tmp_path / "url-b" / "v-1"
    for folder in (one, two):
        folder.mkdir(parents=True)
        write_catalog(str(folder), [[("a.tar", 100, None)], [("b.tar", 100, None)]])
    (one / "b.tar").write_bytes(b"x" * 100)
    (one / "a.tar.loading").write_text("100")  # its owner died mid-download: nobody holds it
    (one / "a.tar.tmp-1-2").write_bytes(b"x" * 50)
    budget = NodeBudget(str(tmp_path))
    record, evicted = budget.reserve(str(two), [("a.tar", 100)], 200, {})
    assert record is not None and evicted == []  # 100 (b.tar) + 100: fits, nothing evicted
    assert sorted(p.name for p in one.iterdir() if not p.name.startswith(".")) == ["b.tar"]
    # Now that reservation is live (100) beside b.tar (100): another 100 must evict b.tar.
    again, evicted = budget.reserve(str(two), [("b.tar", 100)], 200, {}, others=True)
    assert again is not None and evicted == [(str(one), "b.tar")]
    record.close()
    again.close()
    assert isinstance(record, Record) and not (two / "a.tar.loading").exists()
