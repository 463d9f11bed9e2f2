"""Regression tests for the outside review of the shard formats (issue 8): fork-safe readers,
`./`-prefixed tar members, Arrow shards that Hugging Face `datasets` opens with `from_file`, and
the tokens of every synthetic caption stored at conversion time."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.formats import arrow, recordio, wds
from pipelines.formats.registry import WRITERS
from pipelines.schema import CONTEXT_LENGTH, Sample
from pipelines.text import tokenize
from tools.convert.shard_worker import set_tokens
from tools.convert.verify_shards import ShardError, _check_tokens

SUFFIX = {"wds": ".tar", "arrow": ".arrow", "rec": ".rec"}


def tokens_for(i: int, n_syn: int) -> np.ndarray:
    """[1 + max(1, n_syn), 77] ids that encode sample and row."""
    rows = 1 + max(1, n_syn)
    return (np.arange(rows * CONTEXT_LENGTH, dtype=np.int32).reshape(rows, CONTEXT_LENGTH) % 1000
            + 1000 * (i + 1))


def make_samples(n: int, image_bytes: int = 0) -> list[Sample]:
    """Sample i has i % 4 synthetic captions; `image_bytes` > 0: random bytes of about that size
    (big enough to cross a buffered reader's 8 KiB buffer) instead of a real JPEG."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if image_bytes:
            image = rng.integers(0, 256, image_bytes + 97 * i, dtype=np.uint8).tobytes()
        else:
            buf = io.BytesIO()
            Image.new("RGB", (8 + i, 6), (i * 20 % 256, 0, 0)).save(buf, "JPEG")
            image = buf.getvalue()
        syn = [f"syn {i}.{j}" for j in range(i % 4)]
        out.append(Sample(key=f"{i:09d}", image=image, txt=f"caption {i}", syn=syn, meta={"i": i},
                          tokens=tokens_for(i, len(syn))))
    return out


def write_shard(folder, fmt: str, samples: list[Sample], with_tokens: bool = True) -> str:
    kwargs = {"id_base": 500} if fmt == "rec" else {}
    with WRITERS[fmt](str(folder), 0, with_tokens=with_tokens, **kwargs) as w:
        for s in samples:
            w.write(s)
        w.close()
    return str(folder / f"000000{SUFFIX[fmt]}")


class OneShard:
    """Random access to the one shard of a folder, through the loader's ShardSet: `get(i)` (the
    whole sample, copied) and `read(i)` (the hot path: image view, tokens, synthetic captions)."""

    def __init__(self, fmt: str, path: str):
        from pipelines.shardset import ShardSet

        self.set = ShardSet(os.path.dirname(path), fmt, cache_dir=os.path.join(os.path.dirname(path), ".cache"))

    def __len__(self) -> int:
        return len(self.set)

    def get(self, i: int) -> Sample:
        return self.set.get(i)

    def key(self, i: int) -> str:
        return self.set.key(i)

    def read(self, i: int):
        return self.set._read(np.array([i]), 0, whole=False)[0]


def open_shard(fmt: str, path: str) -> OneShard:
    return OneShard(fmt, path)


def as_tuple(s: Sample) -> tuple:
    return s.key, s.image, s.txt, tuple(s.syn), s.tokens.tobytes(), s.tokens.shape


# --- 1. fork-safe readers ------------------------------------------------------------------------

class ShardDataset:
    """What a torch loader does with a shard: `get(i)` in DataLoader workers."""

    def __init__(self, shard):
        self.shard = shard

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, i: int):
        sample = self.shard.get(i)
        image, tokens = self.shard.read(i)[:2]
        # The worker maps the shard itself: what it inherited from its parent is not its to use.
        own = self.shard.set._open._pid == os.getpid() and len(self.shard.set._open) == 1
        # pickled: the DataLoader's collate would turn tuples into lists
        return i, pickle.dumps(as_tuple(sample)), bytes(image), np.asarray(tokens).tobytes(), own


@pytest.mark.parametrize("fmt", ["rec", "wds", "arrow"])
def test_forked_workers_read_their_own_handles(tmp_path, fmt):
    """The parent reads a sample first (so its handles are open), then fork workers read every
    sample several times: each must equal a fresh reader's, read through the worker's own handle."""
    import torch.utils.data

    path = write_shard(tmp_path, fmt, make_samples(64, image_bytes=20_000))
    fresh = open_shard(fmt, path)
    want = [as_tuple(fresh.get(i)) for i in range(len(fresh))]
    shard = open_shard(fmt, path)
    assert as_tuple(shard.get(3)) == want[3] and shard.read(5)[0].tobytes() == want[5][1]
    loader = torch.utils.data.DataLoader(ShardDataset(shard), batch_size=None, shuffle=True,
                                         num_workers=2, multiprocessing_context="fork",
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        seen = 0
        for i, got, image, tokens, own in loader:
            assert pickle.loads(got) == want[i], f"{fmt}: sample {i} read wrong bytes in a forked worker"
            assert image == want[i][1] and tokens == want[i][4]
            assert own, f"{fmt}: a worker read through a handle its parent opened"
            seen += 1
        assert seen == len(want)
    assert as_tuple(shard.get(7)) == want[7]  # the parent's own handle still reads right


# --- 2. tars made with `tar -C dir -cf x.tar .` -----------------------------------------------------

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


# --- 3. Arrow shards in the IPC stream format ---------------------------------------------------

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


# --- 4. tokens of every synthetic caption -------------------------------------------------------

@pytest.mark.parametrize("fmt", ["wds", "arrow", "rec"])
def test_every_reader_returns_every_caption_row(tmp_path, fmt):
    samples = make_samples(9)  # 0..3 synthetic captions: R = 2, 2, 3, 4
    assert [len(s.tokens) for s in samples[:4]] == [2, 2, 3, 4]
    path = write_shard(tmp_path, fmt, samples)
    module = {"wds": wds, "arrow": arrow, "rec": recordio}[fmt]
    assert [as_tuple(s) for s in module.iter_samples(path)] == [as_tuple(s) for s in samples]
    shard = open_shard(fmt, path)
    for i, s in enumerate(samples):
        assert as_tuple(shard.get(i)) == as_tuple(s)
        image, tokens = shard.read(i)[:2]
        assert image.tobytes() == s.image
        np.testing.assert_array_equal(tokens, s.tokens)
        assert tokens.dtype == np.int32


def test_token_storage_per_format(tmp_path):
    samples = make_samples(5)
    write_shard(tmp_path / "wds", "wds", samples)
    write_shard(tmp_path / "arrow", "arrow", samples)
    write_shard(tmp_path / "rec", "rec", samples)
    import tarfile

    with tarfile.open(tmp_path / "wds" / "000000.tar") as tar:
        npys = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".tok.npy")}
    for s in samples:
        raw = npys[f"{s.key}.tok.npy"]
        np.testing.assert_array_equal(np.load(io.BytesIO(raw)), s.tokens)
        header = 10 + int.from_bytes(raw[8:10], "little")  # the recipe handed to the loader
        assert header == 128 and len(raw) == header + s.tokens.nbytes

    table = arrow.open_table(str(tmp_path / "arrow" / "000000.arrow"))
    assert table.schema.field("tokens").type == pa.list_(pa.int32(), 154)
    assert table.schema.field("extra_tokens").type == pa.list_(pa.list_(pa.int32(), 77))
    assert [len(e) for e in table.column("extra_tokens").to_pylist()] == [0, 0, 1, 2, 0]

    rows = [json.loads(line) for line in open(tmp_path / "rec" / "000000.jsonl")]
    assert ["extra_tokens" in r for r in rows] == [False, False, True, True, False]
    assert rows[3]["extra_tokens"] == samples[3].tokens[2:].tolist()
    with open(tmp_path / "rec" / "000000.rec", "rb") as f:
        for (rid, offset), s in zip(recordio.read_index(str(tmp_path / "rec" / "000000.idx")), samples):
            _, label, _ = recordio.unpack_payload(recordio.read_record(f, offset))
            assert label.size == 154  # ALIP's label: rows 0-1 only, what DALI's mxnet reader reads
            np.testing.assert_array_equal(label.astype(np.int32), s.tokens[:2].reshape(-1))


def test_sample_tokens_contract():
    s = Sample(key="k", image=b"", txt="t", syn=["a", "b", "c"], tokens=np.zeros(4 * 77))
    assert s.tokens.shape == (4, 77) and s.tokens.dtype == np.int32
    Sample(key="k", image=b"", txt="t", syn=["a", "b", "c"], tokens=np.zeros((2, 77)))  # older shards
    Sample(key="k", image=b"", txt="t", syn=[], tokens=np.zeros((2, 77)))
    for syn, rows in (([], 1), (["a"], 3), (["a", "b"], 4), (["a", "b", "c"], 3)):
        with pytest.raises(ValueError, match="token rows"):
            Sample(key="k", image=b"", txt="t", syn=syn, tokens=np.zeros((rows, 77)))


def test_converter_tokenizes_every_caption_in_one_call():
    samples = [Sample(key=f"k{i}", image=b"", txt=f"a photo {i}", syn=[f"dog {i} {j}" for j in range(i)])
               for i in range(4)]
    set_tokens(samples)
    for s in samples:
        np.testing.assert_array_equal(s.tokens, tokenize([s.txt, *(s.syn or [s.txt])]))
    assert [s.tokens.shape[0] for s in samples] == [2, 2, 3, 4]


def test_verify_checks_every_token_row():
    txt, syn = "a photo", ["a dog", "a cat"]
    good = tokenize([txt, *syn])
    _check_tokens("x.tar", [("k", good, [txt, *syn])])
    bad = good.copy()
    bad[2] = tokenize(["a bird"])[0]
    with pytest.raises(ShardError, match="sample 'k'"):
        _check_tokens("x.tar", [("k", bad, [txt, *syn])])
