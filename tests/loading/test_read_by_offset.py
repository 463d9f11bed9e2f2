"""A shard a batch reads a few samples of and no one holds mapped is read by offset (`ShardFile`: one
`pread` a sample, no map): under a global shuffle over more shards than `max_open_shards` that is
most reads, and mapping a shard for a few samples cost more than reading them. Both ways must read
the same bytes, keep nothing open, and name a sample they cannot read."""
from __future__ import annotations

import os

import numpy as np
import pytest

import pipelines.shardset
from conftest import build_synthetic_shards
from pipelines.errors import SampleReadError
from pipelines.shardset import ShardSet

SUFFIX = {"wds": ".tar", "arrow": ".arrow", "rec": ".rec"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """96 samples, 2 a shard (48 shards, synthetic captions, tokens): a batch of 24 drawn at random
    reads most of its shards once."""
    return build_synthetic_shards(tmp_path_factory.mktemp("offset"), 96, "wds,arrow,rec", 2)


def open_files(folder, suffixes: tuple[str, ...]) -> list[str]:
    """Shard files under `folder` this process holds a descriptor for or maps."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    with open("/proc/self/maps") as f:
        held += [line.split(maxsplit=5)[-1].strip() for line in f if len(line.split()) >= 6]
    return [p for p in held if p.startswith(str(folder)) and p.endswith(suffixes)]


@pytest.mark.parametrize("fmt", ["wds", "rec", "arrow"])
def test_read_by_offset_reads_what_the_maps_hold(folder, fmt, monkeypatch):
    """Batches, samples and their text, read with the default (most shards by offset) and with every
    shard mapped (`MAP_FROM` 1): the same bytes, the same tokens and caption choice, the same Samples."""
    rng = np.random.default_rng(0)
    batches = [rng.permutation(96)[:24] for _ in range(4)]
    got = ShardSet(str(folder / fmt), fmt)
    reads = [got.read_batch(ids, seed=3, epoch=e, views=e % 2 == 0) for e, ids in enumerate(batches)]
    samples = got.samples(batches[0])
    got.close()
    monkeypatch.setattr(pipelines.shardset, "MAP_FROM", 1)
    want = ShardSet(str(folder / fmt), fmt)
    for e, (ids, (images, text)) in enumerate(zip(batches, reads)):
        images_w, text_w = want.read_batch(ids, seed=3, epoch=e)
        assert [bytes(a) for a in images] == [bytes(b) for b in images_w] and np.array_equal(text, text_w)
    assert any(text[:, -1].any() for _, text in reads)  # synthetic captions were chosen among
    for a, b in zip(samples, want.samples(batches[0])):
        assert (a.key, a.image, a.txt, a.syn, a.meta) == (b.key, b.image, b.txt, b.syn, b.meta)
        assert np.array_equal(a.tokens, b.tokens)
    want.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["wds", "rec", "arrow"])
def test_shards_read_by_offset_keep_no_descriptor_and_no_map(folder, fmt):
    shards = ShardSet(str(folder / fmt), fmt, max_open=64)
    try:
        ids = np.arange(0, 96, 2)  # one sample from each of the 48 shards
        images, _ = shards.read_batch(ids, seed=0, epoch=0, views=True)
        assert len(images) == 48 and len(shards._open) == 0
        assert open_files(folder / fmt, tuple(SUFFIX.values()) + (".jsonl",)) == []
        four = shards.read_batch([4, 5, 4, 5], seed=0, epoch=0)  # MAP_FROM reads of one shard: mapped, kept
        assert len(shards._open) == 1 and len(four[0]) == 4
    finally:
        shards.close()


@pytest.mark.parametrize("fmt", ["wds", "rec", "arrow"])
def test_a_sample_read_by_offset_past_the_end_names_the_file_and_sample(folder, tmp_path, fmt):
    copy = tmp_path / fmt
    copy.mkdir()
    for p in (folder / fmt).iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    shards = ShardSet(str(copy), fmt)
    start = int(shards.index.samples["start" if fmt != "arrow" else "image"][-1])
    os.truncate(shards.paths[-1], start + 16)  # into the last sample of the last shard
    with pytest.raises(SampleReadError) as caught:
        shards.read_batch([0, len(shards) - 1], seed=0, epoch=0, views=True)
    message = str(caught.value)
    assert caught.value.gid == len(shards) - 1
    assert shards.paths[-1] in message and shards.key(len(shards) - 1) in message
    if fmt == "rec":  # the record's offset in the file, not in the bytes read
        assert f"at offset {start}" in message
    shards.close()


def test_an_arrow_index_written_before_row_records_reads_through_the_tables(folder, tmp_path, monkeypatch):
    """A folder whose index.bin predates Arrow's per-row records (no `samples` array) still reads, through
    its tables, the same batches and Samples as one indexed with them."""
    import pipelines.formats.index
    from pipelines.formats.folder_index import write_folder_index

    copy = tmp_path / "arrow"
    copy.mkdir()
    for p in (folder / "arrow").iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    with monkeypatch.context() as m:  # the index as written before: no per-row records for Arrow
        m.setattr(pipelines.formats.index, "SAMPLE_DTYPES", {**pipelines.formats.index.SAMPLE_DTYPES, "arrow": None})
        write_folder_index(str(copy), "arrow")
    old, new = ShardSet(str(copy), "arrow"), ShardSet(str(folder / "arrow"), "arrow")
    assert old.index.samples is None and new.index.samples is not None
    ids = np.random.default_rng(2).permutation(96)[:24]
    (images_o, text_o), (images_n, text_n) = (s.read_batch(ids, seed=1, epoch=1, views=True) for s in (old, new))
    assert [bytes(a) for a in images_o] == [bytes(b) for b in images_n] and np.array_equal(text_o, text_n)
    assert [s.key for s in old.samples(ids[:8])] == [s.key for s in new.samples(ids[:8])]
    old.close()
    new.close()
