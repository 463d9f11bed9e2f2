"""Each format's writer and reader, side by side, on hand-made samples (no shared data needed)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from pipelines.formats import arrow, recordio, wds
from pipelines.formats.registry import WRITERS
from pipelines.schema import Sample
from pipelines.text import clean_text, tokenize

READERS = {"wds": (wds.iter_samples, ".tar"), "arrow": (arrow.iter_samples, ".arrow"),
           "rec": (recordio.iter_samples, ".rec")}


def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + i, 6), (i * 20 % 256, 0, 0)).save(buf, fmt)
    return buf.getvalue()


def make_samples(n: int) -> list[Sample]:
    """Contents encode the index, as open_clip's and Mosaic's round-trip tests do."""
    return [Sample(key=f"{i:09d}", image=image_bytes(i, "PNG" if i % 3 == 2 else "JPEG"),
                   txt=f"caption {i} — naïve", syn=[f"syn {i}.{j}" for j in range(i % 3)],
                   meta={"i": i, "url": f"http://x/{i}"}, tokens=np.full((2, 77), i, np.int32),
                   image_ext="png" if i % 3 == 2 else "jpg") for i in range(n)]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_round_trip_exact(tmp_path, fmt):
    samples = make_samples(7)
    kwargs = {"id_base": 1000} if fmt == "rec" else {}
    with WRITERS[fmt](str(tmp_path), 3, with_tokens=True, **kwargs) as w:
        for s in samples:
            w.write(s)
        info = w.close()
    assert info.stem == "000003" and info.samples == 7
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    read, suffix = READERS[fmt]
    back = list(read(str(tmp_path / f"000003{suffix}")))
    assert len(back) == 7
    for a, b in zip(samples, back):
        assert (a.key, a.image, a.txt, a.syn, a.meta) == (b.key, b.image, b.txt, b.syn, b.meta)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        if fmt == "wds":
            assert a.image_ext == b.image_ext


def test_empty_shard_leaves_no_files(tmp_path):
    for fmt, cls in WRITERS.items():
        info = cls(str(tmp_path / fmt), 0, with_tokens=True).close()
        assert info.samples == 0 and info.files == {} and os.listdir(tmp_path / fmt) == []


def test_abort_removes_temporary_files(tmp_path):
    with pytest.raises(RuntimeError):
        with WRITERS["wds"](str(tmp_path), 0) as w:
            w.write(make_samples(1)[0])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_wds_index_points_at_member_data(tmp_path):
    with WRITERS["wds"](str(tmp_path), 0, with_tokens=True) as w:
        for s in make_samples(4):
            w.write(s)
        w.close()
    data = (tmp_path / "000000.tar").read_bytes()
    index = wds.read_index(str(tmp_path / "000000.idx"))
    assert [len(parts) for parts in index] == [5, 5, 5, 5]
    for parts, sample in zip(index, make_samples(4)):
        ext, offset, size, name = parts[0]
        assert ext == sample.image_ext and name == f"{sample.key}.{ext}"
        assert data[offset:offset + size] == sample.image


def test_recordio_record_layout(tmp_path):
    """ALIP's layout by hand: magic, length, IRHeader(flag=154), 154 float32 labels, image."""
    rec = recordio.pack_record(42, np.arange(154), b"\xff\xd8jpeg")
    assert rec[:4] == (0xCED7230A).to_bytes(4, "little") and len(rec) % 4 == 0
    length = int.from_bytes(rec[4:8], "little")
    payload = rec[8:8 + length]
    rid, label, image = recordio.unpack_payload(payload)
    assert rid == 42 and image == b"\xff\xd8jpeg"
    np.testing.assert_array_equal(label, np.arange(154, dtype=np.float32))
    with pytest.raises(ValueError):
        recordio.pack_record(1, np.full(154, 1 << 24), b"")


def test_recordio_requires_tokens(tmp_path):
    with pytest.raises(ValueError, match="tokenize"):
        recordio.RecordIOWriter(str(tmp_path), 0, with_tokens=False)


def test_sample_rejects_unsafe_keys():
    with pytest.raises(ValueError):
        Sample(key="a.b", image=b"", txt="")


def test_tokenize_matches_open_clip():
    import open_clip

    texts = ["a photo of a café", "word " * 100, "", clean_text("cafÃ©  <b>bold</b>\n")]
    np.testing.assert_array_equal(tokenize(texts), open_clip.tokenize(texts).numpy())
    assert clean_text("cafÃ©   au\tlait ") == "café au lait"
