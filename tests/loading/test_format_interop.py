"""Shards other tools make or read: tars made with `tar -C dir -cf x.tar .` (`./`-prefixed members),
Arrow shards in the IPC stream format (and older ones in the file format), which Hugging Face
`datasets` opens with `from_file` (issue 8)."""
from __future__ import annotations

import subprocess

import numpy as np
import pyarrow as pa
import pytest

from one_shard import as_tuple, make_samples, open_shard, write_shard
from pipelines.formats import arrow, wds
from pipelines.schema import CONTEXT_LENGTH

# --- tars made with `tar -C dir -cf x.tar .` ----------------------------------------------------

def test_tar_with_dot_slash_members_loads(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    samples = make_samples(3)
    for s in samples:
        (src / f"{s.key}.jpg").write_bytes(s.image)
        (src / f"{s.key}.txt").write_text(s.txt)
    shards = tmp_path / "shards"
    shards.mkdir()
    tar = shards / "00000.tar"
    subprocess.run(["tar", "--sort=name", "-C", str(src), "-cf", str(tar), "."], check=True)
    assert "./000000000.jpg" in subprocess.run(["tar", "-tf", str(tar)], capture_output=True,
                                               text=True, check=True).stdout.split()
    assert wds.split_name("./000000001.syn.txt") == ("000000001", "syn.txt")
    assert wds.split_name("./dir/k.jpg") == ("dir/k", "jpg")

    keys = [s.key for s in samples]
    assert [s.key for s in wds.iter_samples(str(tar))] == keys
    shard = open_shard("wds", str(tar))  # no .idx, no manifest: indexed by one scan
    assert [shard.get(i).key for i in range(len(shard))] == keys
    assert [shard.get(i).image for i in range(len(shard))] == [s.image for s in samples]
    assert [shard.key(i) for i in range(len(shard))] == keys

    from pipelines.shardset import ShardSet

    opened = ShardSet(str(shards), "wds", on_error="skip")
    assert not opened.skipped and len(opened) == 3
    assert [opened.get(g).key for g in range(3)] == keys


# --- Arrow shards in the IPC stream format ------------------------------------------------------

def test_arrow_shards_are_ipc_streams_read_zero_copy_and_deterministic(tmp_path):
    samples = make_samples(9)
    a = write_shard(tmp_path / "a", "arrow", samples)
    b = write_shard(tmp_path / "b", "arrow", samples)
    data = open(a, "rb").read()
    assert data == open(b, "rb").read()
    assert data[:4] == b"\xff\xff\xff\xff" and not data.startswith(b"ARROW1")
    pa.ipc.open_stream(pa.memory_map(a)).read_all()  # the stream reader, not open_file
    before = pa.total_allocated_bytes()
    table = arrow.open_table(a)
    assert pa.total_allocated_bytes() == before, "reading a shard copied its buffers"
    assert table.column("jpg").to_pylist() == [s.image for s in samples]


def test_arrow_reads_shards_written_in_the_ipc_file_format(tmp_path):
    samples = make_samples(6)
    table = arrow.open_table(write_shard(tmp_path / "new", "arrow", samples))
    old = tmp_path / "000000.arrow"
    with pa.OSFile(str(old), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert old.read_bytes().startswith(b"ARROW1")
    assert [as_tuple(s) for s in arrow.iter_samples(str(old))] == [as_tuple(s) for s in samples]
    shard = open_shard("arrow", str(old))
    assert [as_tuple(shard.get(i)) for i in range(6)] == [as_tuple(s) for s in samples]


@pytest.mark.parametrize("with_tokens", [True, False])
def test_hugging_face_datasets_from_file(tmp_path, with_tokens):
    datasets = pytest.importorskip("datasets")
    samples = make_samples(9)
    path = write_shard(tmp_path, "arrow", samples, with_tokens=with_tokens)
    ds = datasets.Dataset.from_file(path)
    assert len(ds) == 9 and ds["key"] == [s.key for s in samples]
    assert ds["jpg"] == [s.image for s in samples]  # bytes untouched
    assert ds["syn"] == [s.syn for s in samples] and ds["txt"] == [s.txt for s in samples]
    if with_tokens:
        for row, s in zip(ds, samples):
            stored = np.concatenate([np.array(row["tokens"], np.int32).reshape(2, CONTEXT_LENGTH),
                                     np.array(row["extra_tokens"], np.int32).reshape(-1, CONTEXT_LENGTH)])
            np.testing.assert_array_equal(stored, s.tokens)
    else:
        assert "tokens" not in ds.column_names and "extra_tokens" not in ds.column_names


