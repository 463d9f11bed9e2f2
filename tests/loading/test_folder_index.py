"""The folder index (index.bin) and bounded open files (issue 18): what opening a folder costs is
per shard, not per sample; a process keeps at most `max_open_shards` shards mapped and no shard
descriptor open; an epoch over 1,000 shards runs under a descriptor limit far below the shard
count; folders without an index (older conversions, foreign tars, remote folders converted
before the index existed) are indexed once into the cache."""
from __future__ import annotations

import io
import json
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import build_synthetic_shards
from pipelines.storage import remote as storage
from pipelines.formats.folder_index import cache_path, write_folder_index
from pipelines.formats.index import INDEX_NAME, FolderIndex
from pipelines.formats.registry import WRITERS
from pipelines.loader import LoaderConfig, build_loader
from pipelines.schema import Sample
from pipelines.shardset import ShardSet
from pipelines.text import tokenize

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    return build_synthetic_shards(tmp_path_factory.mktemp("index"), 40, "wds,arrow,rec", 8)


@pytest.mark.parametrize("fmt", ["wds", "arrow", "rec"])
def test_index_names_every_sample_of_every_shard(local, fmt):
    """make-shards writes index.bin beside the shards and names it in manifest.json; opening
    reads neither manifest.json nor one .idx; keys and bytes equal the shards' own."""
    folder = local / fmt
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["index"]["name"] == INDEX_NAME
    assert manifest["index"]["bytes"] == (folder / INDEX_NAME).stat().st_size
    index = FolderIndex(str(folder / INDEX_NAME))
    assert index.format == fmt and len(index) == 40 and len(index.names) == 5
    assert index.shards["count"].tolist() == [8] * 5
    digests = {e["name"]: e["sha256"] for e in manifest["files"]}
    assert [index.shard_info(s)["sha256"] for s in range(5)] == [digests[n] for n in index.names]
    shards = ShardSet(str(folder), fmt)
    module = {"wds": "pipelines.formats.wds", "arrow": "pipelines.formats.arrow", "rec": "pipelines.formats.recordio"}
    iter_samples = __import__(module[fmt], fromlist=["iter_samples"]).iter_samples
    want = [s for name in index.names for s in iter_samples(str(folder / name))]
    assert shards.keys(np.arange(40)) == [s.key for s in want]
    got = shards.samples(np.arange(40))
    assert [(s.key, s.image, s.txt, s.syn) for s in got] == [(s.key, s.image, s.txt, s.syn) for s in want]
    assert len(pickle.dumps(index)) < 500  # a worker gets the path, and maps the file itself


def test_index_is_deterministic_and_costs_bytes_per_sample(local, tmp_path):
    folder = local / "wds"
    again = tmp_path / "again"
    again.mkdir()
    for p in folder.iterdir():
        if p.is_file() and p.name != INDEX_NAME:
            os.link(p, again / p.name)
    manifest = json.loads((folder / "manifest.json").read_text())
    write_folder_index(str(again), "wds", {e["name"]: e for e in manifest["files"]})
    assert (again / INDEX_NAME).read_bytes() == (folder / INDEX_NAME).read_bytes()
    index = FolderIndex(str(folder / INDEX_NAME))
    per_sample = index.samples.itemsize + index.key_ends.itemsize + len(index.key_blob) / len(index)
    assert per_sample < 60


def test_a_changed_shard_is_indexed_again_into_the_cache(local, tmp_path):
    """A shard rewritten by hand (other size) makes the folder's index stale for that shard: the
    loader indexes that shard again, into its cache, never into the data folder."""
    folder = tmp_path / "wds"
    folder.mkdir()
    for p in (local / "wds").iterdir():
        if p.is_file():
            (folder / p.name).write_bytes(p.read_bytes())
    before = (folder / INDEX_NAME).read_bytes()
    with open(folder / "000002.tar", "r+b") as f:
        f.truncate((folder / "000002.tar").stat().st_size // 2)
    shards = ShardSet(str(folder), "wds", on_error="skip", cache_dir=str(tmp_path / "cache"))
    assert (folder / INDEX_NAME).read_bytes() == before
    assert shards.index.path == cache_path(str(tmp_path / "cache"), str(folder), "wds")
    assert 0 < shards.skipped["truncated"] < 8 and len(shards) == 40 - shards.skipped["truncated"]


@pytest.mark.parametrize("fmt", ["wds", "rec"])
def test_a_shard_cut_short_after_opening_names_its_sample(local, tmp_path, fmt):
    """A shard truncated under an open set: the batch read fails naming the shard and the sample's
    key (the hot path looks keys up only for such a message)."""
    from pipelines.errors import SampleReadError

    folder = tmp_path / fmt
    folder.mkdir()
    for p in (local / fmt).iterdir():
        if p.is_file():
            (folder / p.name).write_bytes(p.read_bytes())
    shards = ShardSet(str(folder), fmt)
    last = len(shards) - 1
    pos, _ = shards.locate(last)
    os.truncate(shards.paths[pos], int(shards.index.samples["start"][-1]) + 16)  # into the last sample
    with pytest.raises(SampleReadError) as caught:
        shards.read_batch([0, last], seed=0, epoch=0, views=True)
    assert caught.value.gid == last
    assert shards.paths[pos] in str(caught.value) and shards.key(last) in str(caught.value)
    shards.close()


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def thousand(tmp_path_factory) -> Path:
    """1,000 wds shards of 2 samples each (tokenized): more shards than the descriptor limit below."""
    folder = tmp_path_factory.mktemp("thousand")
    image, tokens = _tiny_jpeg(), tokenize(["a red square", "a red square"])
    for i in range(1000):
        with WRITERS["wds"](str(folder), i, with_tokens=True) as w:
            for j in range(2):
                w.write(Sample(key=f"{i:06d}{j}", image=image, txt="a red square", tokens=tokens))
            w.close()
    write_folder_index(str(folder), "wds")
    return folder


EPOCH = """
import json, os, resource, sys
from pipelines.loader import LoaderConfig, build_loader
folder, backend, cache = sys.argv[1:4]
ld = build_loader(LoaderConfig(shards=folder, format="wds", backend=backend, device="cpu", split="train",
                               batch_size=50, image_size=16, workers=2, max_open_shards=8, cache_dir=cache))
keys = [k for b in ld for k in b.keys]
maps = {l.split()[-1] for l in open("/proc/self/maps") if folder in l and l.rstrip().endswith(".tar")}
ld.close()
print(json.dumps({"keys": len(keys), "unique": len(set(keys)), "maps": len(maps),
                  "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_an_epoch_over_1000_shards_under_a_descriptor_limit_of_256(thousand, tmp_path, backend):
    done = subprocess.run([sys.executable, "-c", EPOCH, str(thousand), backend, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"keys": 2000, "unique": 2000, "maps": out["maps"], "nofile": 256}
    assert out["maps"] <= 8


def test_a_process_keeps_at_most_max_open_shards_mapped(thousand):
    shards = ShardSet(str(thousand), "wds", max_open=4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        images, _ = shards.read_batch(rng.choice(len(shards), 16, replace=False), 0, 0)
        del images
        assert len(shards._open) <= 4
    maps = {line.split()[-1] for line in open("/proc/self/maps") if str(thousand) in line and ".tar" in line}
    assert len(maps) <= 4
    shards.close()
    assert not {line for line in open("/proc/self/maps") if str(thousand) in line and ".tar" in line}
    assert not [t for t in _open_files() if str(thousand) in t]


def _open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own descriptor
            pass
    return out


# --- remote folders converted before the index existed --------------------------------------------------

from s3_server import s3  # noqa: E402,F401 - the module-scoped server fixture


@pytest.mark.parametrize("fmt", ["wds", "rec"])
def test_a_remote_folder_without_an_index_is_indexed_once_per_node(s3, local, tmp_path, fmt):  # noqa: F811
    url = s3.url(f"old-{fmt}")
    folder = local / fmt
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["index"]
    for p in folder.iterdir():
        if p.is_file() and p.name not in (INDEX_NAME, "manifest.json"):
            storage.upload_file(str(p), storage.join(url, p.name))
    storage.write_bytes(storage.join(url, "manifest.json"), json.dumps(manifest).encode())
    want = sorted(ShardSet(str(folder), fmt).keys(np.arange(40)))
    ld = build_loader(LoaderConfig(shards=url, format=fmt, backend="torch", device="cpu", split="eval",
                                   batch_size=8, image_size=32, workers=0, cache_dir=str(tmp_path)))
    keys = sorted(k for b in ld for k in b.keys)
    ld.close()
    assert keys == want
