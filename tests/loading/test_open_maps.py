"""`max_open_shards` bounds the shard files a process keeps mapped while batches are held
(issue 26, fault 8): the images of a batch were views into the mapped shards, so a global-shuffle
batch of 32 kept every shard it touched mapped (21 with max_open_shards=4)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import build_synthetic_shards
from pipelines.shardset import ShardSet

SUFFIX = {"wds": ".tar", "arrow": ".arrow", "rec": ".rec"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """64 samples, 2 a shard: a batch of 32 drawn at random touches about 20 shards."""
    return build_synthetic_shards(tmp_path_factory.mktemp("maps"), 64, "wds,arrow,rec", 2)


def mapped_shards(folder: str, suffix: str) -> set[str]:
    """Shard files of `folder` this process maps (a closed map stays while a view of it lives)."""
    with open("/proc/self/maps") as f:
        paths = {line.split(maxsplit=5)[-1].strip() for line in f if len(line.split()) >= 6}
    return {p for p in paths if p.startswith(folder) and p.endswith(suffix)}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["wds", "arrow", "rec"])
def test_held_batches_keep_at_most_max_open_shards_mapped(folder, fmt):
    shards = ShardSet(str(folder / fmt), fmt, max_open=4)
    rng = np.random.default_rng(0)
    held, touched = [], set()
    try:
        for epoch in range(3):  # the batches a prefetch queue and a training step hold at once
            ids = rng.permutation(len(shards))[:32]
            images, text = shards.read_batch(ids, seed=0, epoch=epoch)
            held.append((images, text))
            touched |= {shards.locate(int(i))[0] for i in ids}
            assert len(images) == 32 and all(len(im) for im in images)
        assert len(touched) > 12  # the batches drew from many shards ...
        mapped = mapped_shards(str(folder / fmt), SUFFIX[fmt])
        assert len(mapped) <= 4, f"{len(mapped)} shard files mapped with max_open=4: {sorted(mapped)}"
        # ... and what is held is still the right bytes once their shards are unmapped
        again = ShardSet(str(folder / fmt), fmt, max_open=64)
        for epoch, (images, _) in enumerate(held):
            ids = np.random.default_rng(0)
            for _ in range(epoch + 1):
                order = ids.permutation(len(shards))[:32]
            want, _ = again.read_batch(order, seed=0, epoch=epoch)
            assert all(bytes(a) == bytes(b) for a, b in zip(images, want))
        again.close()
    finally:
        shards.close()


@pytest.mark.parametrize("fmt", ["wds", "arrow", "rec"])
def test_views_hold_the_copies_bytes(folder, fmt, monkeypatch):
    """`read_batch(views=True)` (the DALI source's read): the bytes of the copies, as views into the map
    (every shard mapped here: one a batch reads a few samples of is read by offset,
    tests/loading/test_read_by_offset.py)."""
    import pipelines.shardset

    monkeypatch.setattr(pipelines.shardset, "MAP_FROM", 1)
    shards = ShardSet(str(folder / fmt), fmt)
    try:
        ids = np.random.default_rng(1).permutation(len(shards))[:32]
        views, text = shards.read_batch(ids, seed=0, epoch=2, views=True)
        copies, want = shards.read_batch(ids, seed=0, epoch=2)
        assert np.array_equal(text, want) and [bytes(v) for v in views] == [bytes(c) for c in copies]
        assert not any(v.flags.owndata for v in views) and all(c.flags.owndata for c in copies)
    finally:
        shards.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["wds", "arrow", "rec"])
def test_dali_batches_hold_no_map(folder, fmt):
    """The in-process DALI source hands DALI views into the maps (one TensorListCPU wrapping them)
    and DALI copies them as they are fed: the batches the loader holds keep no shard mapped beyond
    max_open_shards, and hold the bytes read_batch's copies hold (the augmented images equal those
    of a loader that reads every shard from its own maps)."""
    pytest.importorskip("nvidia.dali")
    import torch

    from pipelines.loader import LoaderConfig, build_loader

    def loader(max_open):
        return build_loader(LoaderConfig(shards=str(folder / fmt), format=fmt, backend="dali", device="cpu",
                                         batch_size=16, image_size=32, workers=1, max_open_shards=max_open))

    tight = loader(4)
    try:
        held = [b for _, b in zip(range(4), tight)]  # the batches a training step and a queue hold
        assert len({int(i) // 2 for b in held for i in b.ids}) > 12  # ... drawn from many shards
        assert len(mapped_shards(str(folder / fmt), SUFFIX[fmt])) <= 4
        loose = loader(64)
        for got, want in zip(held, loose):
            assert got.keys == want.keys and torch.equal(got.images, want.images)
        loose.close()
    finally:
        tight.close()
