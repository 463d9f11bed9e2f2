"""Shards in object storage, against a local S3-compatible server (moto on 127.0.0.1, behind a
proxy that can drop a connection mid-response): the storage API, the loader streaming through a
bounded cache (every key exactly once, the same images as from the local folder, peak bytes
within the limit), a dropped connection retried, clear errors, and the trainer on s3:// shards.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import build_synthetic_shards, overrides, run_main
from pipelines.storage import remote as storage
from pipelines.errors import ShardError, StorageError
from pipelines.loader import LoaderConfig, build_loader
from pipelines.shardset import ShardSet
from s3_server import s3, upload_folder  # noqa: F401 - the module-scoped server fixture

N, PER_SHARD = 48, 8  # six shards per format
SIZE = 32


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """A make-shards --out folder: wds, arrow and rec subfolders of 48 synthetic samples."""
    return build_synthetic_shards(tmp_path_factory.mktemp("storage"), N, "wds,arrow,rec", PER_SHARD)


@pytest.fixture(scope="module")
def remote(s3, local) -> str:  # noqa: F811
    url = s3.url("syn")
    upload_folder(local, url)
    return url


def loader(shards: str, fmt: str, backend: str = "torch", **kw):
    kw = {"batch_size": 8, "image_size": SIZE, "workers": 1, "split": "eval", **kw}
    return build_loader(LoaderConfig(shards=shards, format=fmt, backend=backend, device="cpu", **kw))


def epoch(ld) -> tuple[list[str], torch.Tensor]:
    batches = list(ld)
    return [k for b in batches for k in b.keys], torch.cat([b.images for b in batches])


def data_bytes(folder: str) -> int:
    """Bytes of shard data files (and temporaries) in a cache folder: not the small index files."""
    total = 0
    for entry in os.scandir(folder):
        if entry.name.endswith((".tar", ".arrow", ".rec")) or ".tmp-" in entry.name:
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
    return total


# --- the storage API -----------------------------------------------------------------------------

def test_storage_api_round_trip(s3, tmp_path):  # noqa: F811
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(70_000))
    url = s3.url("api", "a.bin")
    storage.upload_file(str(src), url)
    assert storage.exists(url) and not storage.exists(s3.url("api", "b.bin"))
    assert storage.list_files(s3.url("api")) == {"a.bin": 70_000}
    storage.download_file(url, str(tmp_path / "b.bin"), size=70_000)
    assert (tmp_path / "b.bin").read_bytes() == src.read_bytes()
    storage.write_bytes(s3.url("api", "m.json"), b'{"x": 1}')
    assert storage.read_json(s3.url("api", "m.json")) == {"x": 1}
    # A transfer that keeps coming up short fails after the bounded retries, naming the url, and
    # leaves nothing under the final name (a cache must never trust a partial file).
    with pytest.raises(StorageError, match=r"api/a.bin failed after 5 attempts .*received 70000 of 70001"):
        storage.download_file(url, str(tmp_path / "c.bin"), size=70_001)
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin"]
    assert storage.parse_size("8GiB") == 8 << 30 and storage.parse_size("500MB") == 500_000_000


# --- the loader over s3:// -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt, backend", [("wds", "torch"), ("wds", "dali"), ("arrow", "dali"), ("rec", "torch")])
def test_remote_epoch_equals_local(remote, local, tmp_path, fmt, backend):
    """The make-shards --out url (format subfolder found as for a local folder): every key once,
    the very images of the local folder."""
    want_keys, want_images = epoch(loader(str(local / fmt), fmt, backend))
    ld = loader(remote, fmt, backend, cache_dir=str(tmp_path))
    keys, images = epoch(ld)
    ld.close()
    assert len(keys) == N and keys == want_keys
    assert torch.equal(images, want_images)
    assert ld.shardset.folder == storage.join(remote, fmt)


@pytest.mark.parametrize("split, shuffle, backend", [("eval", None, "torch"), ("train", "block", "torch"),
                                                     ("train", "block", "dali")])
def test_cache_smaller_than_the_dataset(remote, tmp_path, split, shuffle, backend):
    """A limit of 2.5 shards, two reader processes, two epochs: bytes on disk never pass the
    limit (sampled), shards are evicted and fetched again, every key once per epoch (N is a
    multiple of the batch, so training drops none)."""
    shard = storage.list_files(storage.join(remote, "wds"))["000000.tar"]
    limit = int(2.5 * shard)
    ld = loader(remote, "wds", backend, workers=2, split=split, shuffle=shuffle, shuffle_block_shards=1,
                cache_dir=str(tmp_path), cache_limit=limit)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], data_bytes(ld.shardset.cache.folder))
            time.sleep(0.002)
    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        runs = [epoch(ld)[0] for _ in range(2)]
    finally:
        done.set()
        watcher.join()
        ld.close()
    stats = ld.shardset.cache.stats()
    assert stats["peak_bytes"] <= limit and peak[0] <= limit, (stats, peak)
    assert stats["evicted"] >= 4 and stats["fetched"] > 6  # shards fetched again in epoch 2
    for keys in runs:
        assert len(keys) == len(set(keys)) == N


@pytest.mark.parametrize("after", [100, 30_000])  # inside the response headers; inside a shard's body
def test_a_dropped_connection_is_retried(s3, remote, local, tmp_path, after):  # noqa: F811
    want, _ = epoch(loader(str(local / "wds"), "wds"))
    ld = loader(remote, "wds", cache_dir=str(tmp_path))
    before = s3.dropped
    s3.drop_after(after)  # shards are about 70 KB
    keys, _ = epoch(ld)
    ld.close()
    assert s3.dropped == before + 1
    assert keys == want


def test_a_shard_gone_from_the_store_fails_the_epoch_naming_it(s3, local, tmp_path):  # noqa: F811
    """The fetch fails in the owner's thread; the DataLoader worker waiting for the shard raises it."""
    url = s3.url("broken")
    upload_folder(local / "wds", url)
    ld = loader(url, "wds", cache_dir=str(tmp_path))
    storage.filesystem(url).rm(url.split("://")[1] + "/000003.tar")
    with pytest.raises(StorageError, match=r"broken/000003.tar: not found"):
        epoch(ld)
    ld.close()


def test_a_shardset_read_directly_fetches_on_demand(remote, tmp_path):
    """No loader, so no schedule: reads ask for their shard and the cache makes room (LRU)."""
    shard = storage.list_files(storage.join(remote, "wds"))["000000.tar"]
    shards = ShardSet(remote, "wds", cache_dir=str(tmp_path), cache_limit=int(2.5 * shard))
    keys = [shards.get(gid).key for gid in range(0, N, 3)]
    assert keys == [shards.key(gid) for gid in range(0, N, 3)] and len(set(keys)) == len(keys)
    assert shards.cache.stats()["peak_bytes"] <= int(2.5 * shard) and shards.cache.stats()["evicted"] >= 4
    shards.close()


def test_limits_too_small_are_errors_naming_both_numbers(remote, tmp_path):
    shard = storage.list_files(storage.join(remote, "wds"))["000000.tar"]
    with pytest.raises(ValueError, match=rf"000000.tar is .*\({shard} bytes\), larger than cache_limit 1000 bytes"):
        loader(remote, "wds", cache_dir=str(tmp_path), cache_limit=1000)


def test_a_batch_wider_than_the_cache_still_reads(remote, tmp_path):
    """A shuffled batch of 16 reads every shard, more than a 2.5-shard cache holds: readers take
    one shard at a time and let it go, so the epoch finishes (shards are fetched again)."""
    shard = storage.list_files(storage.join(remote, "wds"))["000000.tar"]
    ld = loader(remote, "wds", split="train", batch_size=16, cache_dir=str(tmp_path), cache_limit=int(2.5 * shard))
    keys, _ = epoch(ld)
    stats = ld.shardset.cache.stats()
    ld.close()
    assert len(keys) == len(set(keys)) == N
    assert stats["peak_bytes"] <= int(2.5 * shard) and stats["fetched"] > 6


def test_loaders_of_a_node_share_one_cache_and_reuse_it(remote, tmp_path):
    """Two loaders of one url and cache_dir (two ranks of a node): the first owns the folder and
    fetches, the second reads what it fetched; once both are closed, a new one adopts the
    verified shards left behind."""
    first = loader(remote, "wds", cache_dir=str(tmp_path))
    epoch(first)
    second = loader(remote, "wds", cache_dir=str(tmp_path))
    assert second.shardset.cache.folder == first.shardset.cache.folder
    keys, _ = epoch(second)
    assert len(keys) == N
    assert first.shardset.cache.stats()["owner"] and not second.shardset.cache.stats()["owner"]
    assert first.shardset.cache.stats()["fetched"] == 6 and second.shardset.cache.stats()["fetched"] == 0
    first.close()
    second.close()
    again = loader(remote, "wds", cache_dir=str(tmp_path))  # adopts the complete shards left behind
    keys, _ = epoch(again)
    again.close()
    assert len(keys) == N and again.shardset.cache.stats()["reused"] == 6
    assert again.shardset.cache.stats()["fetched"] == 0


def test_bad_urls_are_clear_errors(s3, tmp_path):  # noqa: F811
    cases = [("s3://no-such-bucket/shards", StorageError,
              r"s3://no-such-bucket/shards: bucket no-such-bucket does not exist at http://127"),
             (s3.url("nothing-here"), StorageError, r"nothing-here: no objects under this prefix"),
             ("gs://bucket/shards", StorageError, r"unsupported storage scheme gs://")]
    for url, error, message in cases:
        with pytest.raises(error, match=message):
            loader(url, "wds", cache_dir=str(tmp_path))


def test_remote_arrow_needs_its_manifest(s3, local, tmp_path):  # noqa: F811
    url = s3.url("no-manifest")
    for p in (local / "arrow").glob("*.arrow"):
        storage.upload_file(str(p), storage.join(url, p.name))
    with pytest.raises(ShardError, match="no manifest.json; remote arrow shards need it"):
        loader(url, "arrow", cache_dir=str(tmp_path))


def test_trainer_trains_from_s3(remote, tmp_path):
    summary = run_main(overrides(storage.join(remote, "wds"), tmp_path / "runs", "s3",
                                 data__cache_dir=str(tmp_path / "cache"), data__cache_limit="1MB"))
    assert summary["steps"] == 3 and summary["loss"] == summary["loss"]  # not NaN
