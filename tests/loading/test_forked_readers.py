"""Shard readers are fork-safe: DataLoader workers forked after the parent has opened a shard read
every sample of every format right, each through a handle of its own (issue 8)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from one_shard import as_tuple, make_samples, open_shard, write_shard


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
        # (Arrow: two handles, the table whole samples come from and the map the hot path reads)
        own = self.shard.set._open._pid == os.getpid() and 1 <= len(self.shard.set._open) <= 2
        # pickled: the DataLoader's collate would turn tuples into lists
        return i, pickle.dumps(as_tuple(sample)), bytes(image), np.asarray(tokens).tobytes(), own


@pytest.mark.parametrize("fmt", ["rec", "wds", "arrow"])
def test_forked_workers_read_their_own_handles(tmp_path, fmt, monkeypatch):
    """The parent reads a sample first (so its handles are open), then fork workers read every
    sample several times: each must equal a fresh reader's, read through the worker's own handle.
    Every read maps its shard here (`MAP_FROM` 1): a shard a batch reads a few samples of is
    otherwise read by offset through a descriptor opened for that read, which no other process holds."""
    import torch.utils.data

    import pipelines.shardset

    monkeypatch.setattr(pipelines.shardset, "MAP_FROM", 1)

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


