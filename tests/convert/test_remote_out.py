"""make-shards --out s3://...: the objects equal a local conversion byte for byte (local pool and Ray),
staging keeps no data files, --resume from a fresh staging folder redoes only what the store lacks,
and the loader reads every key once from the store."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipelines.storage import remote as storage
from pipelines.loader import LoaderConfig, build_loader
from s3_server import s3  # noqa: F401 - the module-scoped server fixture
from conftest import synthetic_input
from tools.convert import make_shards

ARGS = ["--format", "wds,arrow,rec", "--tokenize", "--samples-per-shard", "6", "--quiet"]
TIMINGS = ("seconds", "samples_per_second", "shards_reused")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    return synthetic_input(tmp_path_factory.mktemp("syn"), 30, size=40)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert make_shards.main(dataset + ARGS + ["--out", str(out), "--workers", "2"]) == 0
    return out


def comparable(name: str, data: bytes) -> bytes:
    if name.endswith("stats.json"):
        return json.dumps({k: v for k, v in json.loads(data).items() if k not in TIMINGS}).encode()
    return data


def local_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): comparable(p.name, p.read_bytes())
            for p in sorted(out.rglob("*")) if p.is_file()}


def remote_files(url: str) -> dict[str, bytes]:
    fs = storage.filesystem(url)
    root = url.split("://", 1)[1]
    return {p[len(root) + 1:]: comparable(p, fs.cat_file(p)) for p in sorted(fs.find(root))}


def test_s3_output_equals_local_and_loads(dataset, reference, s3, tmp_path):  # noqa: F811
    url, staging = s3.url("pool"), tmp_path / "staging"
    assert make_shards.main(dataset + ARGS + ["--out", url, "--staging", str(staging), "--workers", "2"]) == 0
    assert remote_files(url) == local_files(reference)
    # staging keeps only records and indexes: the data files went to the store
    assert not [p for p in staging.rglob("*") if p.suffix in (".tar", ".arrow", ".rec")]
    for fmt in ("wds", "arrow", "rec"):
        loader = build_loader(LoaderConfig(shards=f"{url}/{fmt}", format=fmt, backend="torch", split="eval",
                                           batch_size=8, workers=0, image_size=32,
                                           cache_dir=str(tmp_path / "cache")))
        keys = [k for b in loader for k in b.keys]
        loader.close()
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 30


def test_s3_resume_from_a_fresh_staging_redoes_only_missing(dataset, reference, s3, tmp_path):  # noqa: F811
    url = s3.url("resume")
    assert make_shards.main(dataset + ARGS + ["--out", url, "--staging", str(tmp_path / "a"), "--workers", "1"]) == 0
    fs = storage.filesystem(url)
    root = url.split("://", 1)[1]
    fs.rm(f"{root}/wds/.parts/000002.json")  # as if the run died before shard 2's record landed
    fs.rm(f"{root}/arrow/000003.arrow")
    # without --resume: refused, naming the fix
    assert make_shards.main(dataset + ARGS + ["--out", url, "--staging", str(tmp_path / "b")]) == 2
    stats_file = tmp_path / "c" / "wds" / "stats.json"
    assert make_shards.main(dataset + ARGS + ["--out", url, "--staging", str(tmp_path / "c"), "--resume",
                                              "--workers", "1"]) == 0
    assert json.loads(stats_file.read_text())["shards_reused"] == 3  # 5 shards, 2 redone
    assert remote_files(url) == local_files(reference)


def test_s3_target_with_foreign_objects_is_refused(dataset, s3, tmp_path, capsys):  # noqa: F811
    storage.write_bytes(s3.url("foreign", "wds", "x.txt"), b"not ours")
    assert make_shards.main(dataset + ARGS + ["--out", s3.url("foreign"), "--staging", str(tmp_path)]) == 2
    assert "did not write" in capsys.readouterr().err


@pytest.mark.slow  # a local Ray start and a conversion on it: ~8 s
def test_ray_conversion_into_s3(dataset, reference, s3, tmp_path):  # noqa: F811
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    try:
        url = s3.url("ray")
        assert make_shards.main(dataset + ARGS + ["--out", url, "--staging", str(tmp_path / "s"),
                                                  "--distributor", "ray"]) == 0
    finally:
        ray.shutdown()
    assert remote_files(url) == local_files(reference)


def test_s3_resume_puts_every_record_in_the_store(dataset, reference, s3, tmp_path):  # noqa: F811
    """A shard whose record upload failed: its data is in the store, its record in staging only.
    The resume from that staging must not trust staging: the record ends up in the store, and a
    later resume from a fresh staging folder keeps every shard."""
    url, staging = s3.url("lost-record"), tmp_path / "a"
    argv = dataset + ARGS + ["--out", url, "--workers", "1"]
    assert make_shards.main(argv + ["--staging", str(staging)]) == 0
    fs = storage.filesystem(url)
    root = url.split("://", 1)[1]
    for name in ("wds/.parts/000002.json", "wds/manifest.json", "wds/stats.json", "wds/sizes.json"):
        fs.rm(f"{root}/{name}")  # what the run left when shard 2's record did not upload
    assert (staging / "wds" / ".parts" / "000002.json").exists()
    assert make_shards.main(argv + ["--staging", str(staging), "--resume"]) == 0
    assert remote_files(url) == local_files(reference)
    fresh = tmp_path / "b"
    assert make_shards.main(argv + ["--staging", str(fresh), "--resume"]) == 0
    assert json.loads((fresh / "wds" / "stats.json").read_text())["shards_reused"] == 5
