"""A damaged `index.bin` — cut short anywhere past its first 16 bytes, or with bytes changed — in the
folder or cached under cache_dir/index/ is reported with its path and indexed again from the
shards: never a crash, never a wrong sample (issue 26, fault 7: a cut index crashed the open with
a bare JSONDecodeError or numpy's "buffer is smaller than requested size")."""
from __future__ import annotations

import json
import logging
import shutil
import struct

import numpy as np
import pytest

from conftest import build_synthetic_shards
from pipelines.errors import FolderIndexError
from pipelines.formats.folder_index import cache_path
from pipelines.formats.index import INDEX_NAME, FolderIndex
from pipelines.shardset import ShardSet

FORMATS = ("wds", "arrow", "rec")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_synthetic_shards(tmp_path_factory.mktemp("damage"), 24, ",".join(FORMATS), 4)


def contents(shards: ShardSet) -> list[tuple[str, bytes, bytes]]:
    """Every sample as (key, image bytes, text row bytes), read the loader's way."""
    ids = np.arange(len(shards))
    images, text = shards.read_batch(ids, seed=0, epoch=0)
    return list(zip(shards.keys(ids), (bytes(im) for im in images), (row.tobytes() for row in text)))


def layout(data: bytes) -> tuple[int, dict]:
    (length,) = struct.unpack("<Q", data[8:16])
    return 16 + length, json.loads(data[16:16 + length])


def damages(data: bytes, fmt: str) -> dict[str, bytes]:
    """Cuts and flips, each where it hurts: the header, the shard table, one sample's record, keys."""
    end, header = layout(data)
    arrays = header["arrays"]

    def flip(at: int, bit: int = 0x04) -> bytes:
        return data[:at] + bytes([data[at] ^ bit]) + data[at + 1:]
    out = {f"cut at {n}": data[:n] for n in (17, end // 2, end + 10, arrays["key_ends"]["offset"] + 3, len(data) - 1)}
    out["flip in the header's names"] = flip(data.index(b"000001") + 5, 0x02)  # 000001 -> 000003
    out["flip in the shard table"] = flip(arrays["shards"]["offset"] + 104 * 2 + 8)  # shard 2's count
    out["flip in a key"] = flip(arrays["keys"]["offset"] + 9 * 5 + 8, 0x01)  # sample 5's key, last digit
    out["flip in a key end"] = flip(arrays["key_ends"]["offset"] + 8 * 6)
    if fmt != "arrow":  # sample 9's image offset in its wds record; its record start in rec
        record = 9 * (36 if fmt == "wds" else 28) + (12 if fmt == "wds" else 0)
        out["flip in a sample record"] = flip(arrays["samples"]["offset"] + record)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_damaged_folder_index_is_named_and_indexed_again(folder, tmp_path, caplog, fmt):
    clean = ShardSet(str(folder / fmt), fmt, cache_dir=str(tmp_path / "c0"))
    want = contents(clean)
    original = (folder / fmt / INDEX_NAME).read_bytes()
    for n, (what, data) in enumerate(damages(original, fmt).items()):
        copy = tmp_path / f"d{n}"
        shutil.copytree(folder / fmt, copy)
        (copy / INDEX_NAME).write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines"):
            shards = ShardSet(str(copy), fmt, cache_dir=str(tmp_path / f"c{n + 1}"))
            got = contents(shards)
        assert got == want, what
        assert any(str(copy / INDEX_NAME) in r.getMessage() for r in caplog.records), (what, caplog.text)


@pytest.mark.parametrize("fmt", ["wds", "rec"])
def test_a_damaged_cached_index_is_named_and_built_again(folder, tmp_path, caplog, fmt):
    """A folder without index.bin (converted before it, or foreign tars) is indexed into
    cache_dir/index/; that copy damaged is rebuilt, not read."""
    plain = tmp_path / "plain"
    shutil.copytree(folder / fmt, plain)
    (plain / INDEX_NAME).unlink()
    cache = str(tmp_path / "cache")
    want = contents(ShardSet(str(plain), fmt, cache_dir=cache))
    cached = cache_path(cache, str(plain), fmt)
    original = open(cached, "rb").read()
    for what, data in damages(original, fmt).items():
        with open(cached, "wb") as f:
            f.write(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines"):
            got = contents(ShardSet(str(plain), fmt, cache_dir=cache))
        assert got == want, what
        assert any(cached in r.getMessage() for r in caplog.records), (what, caplog.text)


def test_every_cut_is_an_index_error_naming_the_file(folder, tmp_path):
    data = (folder / "wds" / INDEX_NAME).read_bytes()
    path = tmp_path / INDEX_NAME
    for n in range(16, len(data), 7):
        path.write_bytes(data[:n])
        with pytest.raises(FolderIndexError, match=str(path)):
            FolderIndex(str(path))


def legacy(data: bytes) -> bytes:
    """The same index as written before checksums: no trailer, no `checks` array, no length."""
    end, header = layout(data)
    del header["bytes"], header["arrays"]["checks"]
    blob = json.dumps(header, separators=(",", ":")).encode()
    first = min(a["offset"] for a in header["arrays"].values())
    keys = header["arrays"]["keys"]
    assert 16 + len(blob) <= first
    return (data[:8] + struct.pack("<Q", len(blob)) + blob + b"\0" * (first - 16 - len(blob))
            + data[first:keys["offset"] + keys["count"]])


def test_an_index_written_before_checksums_opens_and_verifies(folder, tmp_path, caplog):
    """Folders converted before the checksums keep working: the open checks their lengths only,
    and verify-shards accepts them when their rows match the shards."""
    from pipelines.formats.base import file_digest
    from tools.convert import verify_shards

    copy = tmp_path / "old"
    shutil.copytree(folder / "wds", copy)
    old = legacy((copy / INDEX_NAME).read_bytes())
    (copy / INDEX_NAME).write_bytes(old)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["index"].update(bytes=len(old), sha256=file_digest(str(copy / INDEX_NAME)))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        shards = ShardSet(str(copy), "wds", cache_dir=str(tmp_path / "c"))
        assert not shards.index.has_checksums
        assert contents(shards) == contents(ShardSet(str(folder / "wds"), "wds", cache_dir=str(tmp_path / "c")))
    assert not caplog.records, caplog.text
    assert verify_shards.verify_folder(str(copy), progress=False)["samples"] == 24
    (copy / INDEX_NAME).write_bytes(old[:-5])  # cut: its lengths still show it
    with pytest.raises(FolderIndexError, match="keys array lies past its end"):
        FolderIndex(str(copy / INDEX_NAME))
