"""The node-wide shard cache at production ratios, and the four faults an outside review found in
the object-storage path (issue 18), each reproduced here against the loopback S3 server:

1. a shard a reader asked for outside the cache window was fetched, then evicted before the
   reader saw it (DALI hung at block boundaries when shards were 1/8 of the limit);
2. cached files were adopted by size alone, so a re-converted dataset at the same url served the
   old captions, and a same-size stray file poisoned the folder;
3. evicted files stayed open in readers, so disk use passed the limit;
4. DALI named another shard when a prefetched batch failed, and took a storage failure for a bad
   sample.
Plus: opening costs a few requests whatever the number of shards, and the ranks of a node fetch
each shard once between them.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_input
from pipelines.storage import remote as storage
from pipelines.errors import StorageError
from pipelines.loader import LoaderConfig, build_loader
from pipelines.shardset import ShardSet
from s3_server import s3  # noqa: F401 - the module-scoped server fixture
from test_storage import data_bytes, epoch, loader, upload_folder

SIZE = 32


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)


def convert(root: Path, n: int, per_shard: int, caption: str = "caption") -> Path:
    """`n` synthetic samples, `per_shard` a shard, tokenized wds; every raw caption replaced by
    `caption` plus its number (so two conversions with same-length captions have same-size tars)."""
    from tools.convert import make_shards

    args = synthetic_input(root / "syn", n)
    table = root / "syn" / "train.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    table.write_text("".join(json.dumps({**r, "caption": f"{caption} {i:05d}"}) + "\n" for i, r in enumerate(rows)))
    out = root / "shards"
    assert make_shards.main(args + ["--tokenize", "--format", "wds", "--samples-per-shard", str(per_shard),
                                    "--out", str(out), "--workers", "1", "--quiet"]) == 0
    return out / "wds"


@pytest.fixture(scope="module")
def sixteen(s3, tmp_path_factory):  # noqa: F811
    """16 shards of 4 samples in the store: blocks of 8 shards, two of them."""
    folder = convert(tmp_path_factory.mktemp("sixteen"), 64, 4)
    url = s3.url("sixteen", "wds")  # a format folder, named as make-shards names it
    upload_folder(folder, url)
    return url, folder


def shard_bytes(url: str) -> int:
    return max(size for name, size in storage.list_files(url).items() if name.endswith(".tar"))


# --- fault 1: requests are never evicted before their reader has them ------------------------------

def _acquire(url: str, folder: str, limit: int, n: int, out) -> None:
    cache = ShardSet(url, "wds", cache_dir=folder, cache_limit=limit).cache
    held = cache.acquire(n, position=1 << 40)  # far ahead of the owner's window
    out.put(os.path.getsize(held.path))
    held.close()


@pytest.mark.timeout(120)
def test_a_requested_shard_outside_the_window_reaches_its_reader(sixteen, tmp_path):
    """The owner's window is full of the shards its schedule needs first; a reader in another
    process asks for a shard far outside it. It must get it (the owner fetched it and then evicted
    it to restore its window before the reader looked: DALI's read-ahead hung on that)."""
    url, _ = sixteen
    limit = 2 * shard_bytes(url)
    owner = ShardSet(url, "wds", cache_dir=str(tmp_path), cache_limit=limit)
    owner.cache.schedule(lambda: iter([np.arange(16)]))  # wants 0, 1, ... : the window is 0 and 1
    deadline = time.time() + 10
    while owner.cache.stats()["fetched"] < 2 and time.time() < deadline:
        time.sleep(0.01)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    reader = ctx.Process(target=_acquire, args=(url, str(tmp_path), limit, 13, out))
    reader.start()
    reader.join(60)
    alive = reader.is_alive()
    if alive:
        reader.kill()
    owner.close()
    assert not alive, "the reader never got the shard it asked for"
    assert reader.exitcode == 0 and out.get(timeout=1) > 0
    assert owner.cache.stats()["peak_bytes"] <= limit


@pytest.mark.timeout(300)
def test_dali_block_shuffle_with_shards_an_eighth_of_the_limit_finishes_epochs(sixteen, tmp_path):
    """The review's ratio: shards 1/8 of the limit, the default block of 8 shards (a block fills the
    cache; batches at a block boundary need shards of two blocks), DALI reading ahead with two
    workers. Two epochs finish, every batch full and no key twice within an epoch."""
    url, _ = sixteen
    limit = 8 * shard_bytes(url)
    ld = loader(url, "wds", "dali", split="train", shuffle="block", batch_size=8, workers=2,
                cache_dir=str(tmp_path), cache_limit=limit)
    assert ld.cfg.shuffle_block_shards == 8
    for _ in range(2):
        keys, images = epoch(ld)
        assert len(keys) == len(set(keys)) == 64 and images.shape[0] == 64
    stats = ld.shardset.cache.stats()
    ld.close()
    assert stats["peak_bytes"] <= limit


# --- fault 2: only verified files are adopted --------------------------------------------------------

def test_a_reconverted_dataset_at_the_same_url_is_fetched_anew(s3, tmp_path):  # noqa: F811
    """Same shard sizes, other captions (the tars are padded, so sizes rarely change): the cache
    must notice by digest, not serve the old captions. A stray same-size file in the cache folder
    is not adopted either."""
    url = s3.url("reconverted")
    old = convert(tmp_path / "v1", 24, 8, caption="first")
    new = convert(tmp_path / "v2", 24, 8, caption="other")
    assert {p.name: p.stat().st_size for p in old.glob("*.tar")} == {p.name: p.stat().st_size for p in new.glob("*.tar")}
    upload_folder(old, url)
    cache = str(tmp_path / "cache")
    ld = loader(url, "wds", cache_dir=cache)
    assert {ld.shardset.get(g).txt.split()[0] for g in range(24)} == {"first"}
    epoch(ld)
    ld.close()
    upload_folder(new, url)  # re-converted in place
    ld = loader(url, "wds", cache_dir=cache)
    assert {ld.shardset.get(g).txt.split()[0] for g in range(24)} == {"other"}
    ld.close()
    stray = Path(ld.shardset.cache.folder) / "000001.tar"
    stray.write_bytes(b"\0" * stray.stat().st_size)  # same size, other bytes, marker left as it was
    ld = loader(url, "wds", cache_dir=cache)
    assert {ld.shardset.get(g).txt.split()[0] for g in range(24)} == {"other"}
    assert ld.shardset.cache.stats()["reused"] == 2  # 000000 and 000002: checked, kept
    ld.close()


# --- fault 3: the limit bounds disk, files held open included ------------------------------------------

def _held(folder: str) -> dict[tuple[int, int], int]:
    """(dev, inode) -> bytes of every file under `folder` that this process or one of its children
    holds open or mapped although it was deleted."""
    me = os.getpid()
    pids = [me] + [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == me]
    held = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(folder) and target.endswith("(deleted)"):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    held[(st.st_dev, st.st_ino)] = st.st_size
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    if folder in line and line.rstrip().endswith("(deleted)"):
                        st = os.stat(f"/proc/{pid}/map_files/{line.split()[0]}")
                        held[(st.st_dev, st.st_ino)] = st.st_size
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return held


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_the_limit_bounds_disk_with_files_held_open(sixteen, tmp_path, backend):
    """A 2.5-shard limit, two workers, two epochs: files on disk plus deleted files still held
    open or mapped by any process of the loader stay within the limit, and after close() no
    process holds a cache file."""
    url, _ = sixteen
    limit = int(2.5 * shard_bytes(url))
    ld = loader(url, "wds", backend, split="train", shuffle="block", shuffle_block_shards=1, batch_size=4,
                workers=2, cache_dir=str(tmp_path), cache_limit=limit)
    folder = ld.shardset.cache.folder
    worst, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            worst[0] = max(worst[0], data_bytes(folder) + sum(_held(folder).values()))
            time.sleep(0.005)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(2):
            keys, _ = epoch(ld)
            assert len(keys) == len(set(keys)) == 64
    finally:
        done.set()
        watcher.join()
        ld.close()
    assert worst[0] <= limit, (worst[0], limit)
    assert not _held(folder)
    assert not [line for line in open("/proc/self/maps") if folder in line and ".tar" in line]


# --- fault 4: DALI names the failed shard, and a storage failure is never a bad sample ------------------

@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_missing_object_is_a_storage_error_naming_it_never_a_bad_sample(s3, sixteen, tmp_path, backend):  # noqa: F811
    """One object gone from the store after the loader opened; DALI prefetches batches beyond the
    failing one. The error is the storage error naming that object, under on_error='skip' too,
    and no sample is marked bad."""
    _, folder = sixteen
    url = s3.url(f"gone-{backend}")
    upload_folder(folder, url)
    ld = loader(url, "wds", backend, split="eval", batch_size=4, workers=2, on_error="skip",
                cache_dir=str(tmp_path))
    storage.filesystem(url).rm(url.split("://")[1] + "/000009.tar")
    with pytest.raises(StorageError, match=r"gone-\w+/000009.tar: not found"):
        epoch(ld)
    assert len(ld.bad) == 0
    ld.close()


# --- what opening costs, and one fetch per node ------------------------------------------------------

def test_opening_a_remote_folder_costs_two_requests(s3, sixteen, tmp_path):  # noqa: F811
    """manifest.json and the folder index, whatever the number of shards; the index once per node."""
    url, _ = sixteen
    before = len(s3.requests)
    ld = loader(url, "wds", cache_dir=str(tmp_path))
    first = s3.requests[before:]
    ld.close()
    before = len(s3.requests)
    ld = loader(url, "wds", cache_dir=str(tmp_path))
    second = s3.requests[before:]
    ld.close()
    assert [m for m, _ in first] == ["GET", "GET"] and first[1][1].endswith("/index.bin"), first
    assert [p.rsplit("/", 1)[1] for _, p in second] == ["manifest.json"], second


def _rank(url: str, cache: str, rank: int, world: int, out) -> None:
    ld = build_loader(LoaderConfig(shards=url, format="wds", backend="torch", device="cpu", split="train",
                                   shuffle="block", shuffle_block_shards=2, batch_size=4, image_size=SIZE,
                                   rank=rank, world_size=world, workers=1, cache_dir=cache))
    keys = [k for b in ld for k in b.keys]
    ld.close()
    out.put((rank, keys))


@pytest.mark.timeout(300)
def test_the_ranks_of_a_node_fetch_each_shard_once(s3, sixteen, tmp_path):  # noqa: F811
    url, _ = sixteen
    world = 4
    before = len(s3.requests)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    ranks = [ctx.Process(target=_rank, args=(url, str(tmp_path), r, world, out)) for r in range(world)]
    for p in ranks:
        p.start()
    try:
        results = dict(out.get(timeout=240) for _ in ranks)
        for p in ranks:
            p.join(30)
            assert p.exitcode == 0
    finally:  # a hung rank must not keep pytest from exiting (multiprocessing joins its children)
        for p in ranks:
            if p.is_alive():
                p.kill()
                p.join()
    seen = [k for keys in results.values() for k in keys]
    assert len(seen) == len(set(seen)) == 64
    gets = [p.rsplit("/", 1)[1] for m, p in s3.requests[before:] if m == "GET"]
    tars = [g for g in gets if g.endswith(".tar")]
    assert sorted(tars) == sorted(set(tars)) and len(tars) == 16, tars
    assert gets.count("index.bin") == 1


@pytest.mark.timeout(180)
def test_a_rank_takes_the_folder_over_when_its_owner_closes(sixteen, tmp_path):
    """Another rank owns the node's folder and closes while this rank's worker waits for a shard:
    this rank's loader (whose main process never reads; its worker does) must take over."""
    url, _ = sixteen
    owner = ShardSet(url, "wds", cache_dir=str(tmp_path))  # owns the folder, follows no plan: fetches nothing
    assert owner.cache.owner
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    rank = ctx.Process(target=_rank, args=(url, str(tmp_path), 0, 1, out))
    rank.start()
    try:
        deadline = time.time() + 60
        while not any(".want." in e for e in os.listdir(owner.cache.folder)) and time.time() < deadline:
            time.sleep(0.01)  # until the rank's worker waits for a shard
        owner.close()
        _, keys = out.get(timeout=120)
        rank.join(30)
    finally:
        if rank.is_alive():
            rank.kill()
            rank.join()
    assert len(keys) == len(set(keys)) == 64
