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
