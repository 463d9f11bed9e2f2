"""Locality-aware shuffle (`shuffle="block"`): the plan's guarantees under it (a permutation set by
seed and epoch, disjoint equal ranks, exact and elastic resume), the loader and trainer options,
the shard order a cache prefetches by, and `tools.bench.bench_shuffle --quick`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import build_synthetic_shards, overrides, run_main
from pipelines.loader import LoaderConfig, build_loader
from pipelines.plan.epoch_plan import DEFAULT_BLOCK_SHARDS, EpochPlan, shuffle_mode
from tools.bench import bench_shuffle
from train.config import ConfigError, load_config

SIZES = (7, 6, 0, 7, 9, 3, 7, 7, 5, 8, 1, 7)  # uneven, one empty: as on_error="skip" can leave them
TOTAL = sum(SIZES)


def block_plan(**kw) -> EpochPlan:
    kw = {"total": TOTAL, "batch_size": 4, "seed": 5, "epoch": 1, "shuffle": "block", "block_shards": 3,
          "shard_sizes": SIZES, **kw}
    return EpochPlan(**kw)


def shard_runs(plan: EpochPlan) -> list[set[int]]:
    """The shards of each block of the plan's order, found from the order alone: a block ends where
    every shard it touched has been fully used."""
    shards, left, runs, current = plan.shards_of(plan.order()), dict(enumerate(SIZES)), [], set()
    for s in shards.tolist():
        current.add(s)
        left[s] -= 1
        if all(left[t] == 0 for t in current):
            runs.append(current)
            current = set()
    return runs


# --- the plan --------------------------------------------------------------------------------------

def test_block_order_is_a_permutation_of_shard_blocks_set_by_seed_and_epoch():
    plan = block_plan()
    order = plan.order()
    assert sorted(order.tolist()) == list(range(TOTAL))
    assert np.array_equal(order, block_plan().order())
    assert not np.array_equal(order, block_plan(epoch=2).order())
    assert not np.array_equal(order, block_plan(seed=6).order())
    # Each shard is read in one stretch shared with at most block_shards - 1 others.
    runs = shard_runs(plan)
    assert all(len(r) <= 3 for r in runs) and sum(len(r) for r in runs) == len(SIZES) - 1  # the empty one
    # Shards come in a different order each epoch, samples within a shard too.
    assert [sorted(r) for r in runs] != [sorted(r) for r in shard_runs(block_plan(epoch=2))]
    one = block_plan(block_shards=1)
    changes = np.count_nonzero(np.diff(one.shards_of(one.order())))
    assert changes == len(SIZES) - 2  # one shard at a time: 11 non-empty shards, 10 changes
    assert not np.array_equal(one.order(), np.sort(one.order()))


def test_shuffle_modes_and_their_errors():
    assert [shuffle_mode(v) for v in (True, False, "global", "block", "none")] == \
        ["global", "none", "global", "block", "none"]
    with pytest.raises(ValueError, match="shuffle must be one of global, block, none"):
        shuffle_mode("blocks")
    # Old bool plans: the same orders as the named modes.
    assert np.array_equal(EpochPlan(100, 8, seed=3, shuffle=True).order(),
                          EpochPlan(100, 8, seed=3, shuffle="global").order())
    assert EpochPlan(100, 8, shuffle=False).shuffle == "none"
    with pytest.raises(ValueError, match="needs the shard sizes"):
        EpochPlan(100, 8, shuffle="block")
    with pytest.raises(ValueError, match="add up to 67 samples, not the plan's 60"):
        block_plan(total=60)
    with pytest.raises(ValueError, match="block_shards must be ≥ 1"):
        block_plan(block_shards=0)


@pytest.mark.parametrize("batch, world, drop_last", [(4, 1, True), (4, 3, True), (3, 4, True), (4, 3, False),
                                                     (5, 2, False)])
def test_block_ranks_are_disjoint_and_equal(batch, world, drop_last):
    plans = [block_plan(batch_size=batch, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
    ids = [p.rank_ids() for p in plans]
    assert len({p.num_batches for p in plans}) == 1
    assert len({tuple(len(b) for b in p.batches()) for p in plans}) == 1
    if drop_last:
        keep = TOTAL - TOTAL % (world * batch)
        union = np.concatenate(ids)
        assert len(set(union.tolist())) == len(union) == keep
        assert set(union.tolist()) == set(plans[0].order()[:keep].tolist())
    else:  # eval: every sample, padded by wrapping to the permutation's start
        merged = np.stack(ids, axis=1).reshape(-1)
        assert np.array_equal(merged, np.resize(plans[0].order(), len(merged)))
        assert set(merged.tolist()) == set(range(TOTAL))


@pytest.mark.parametrize("saved, resumed", [((3, 4), (3, 4)), ((3, 4), (2, 5)), ((2, 3), (4, 2)), ((1, 8), (3, 3))])
def test_block_plan_resumes_exactly_and_elastically(saved, resumed):
    (w0, b0), (w1, b1) = saved, resumed
    before = [block_plan(batch_size=b0, world_size=w0, rank=r) for r in range(w0)]
    k = 2
    seen = [i for p in before for b in p.batches()[:k] for i in b.tolist()]
    offset = before[0].consumed(k)
    after = [block_plan(batch_size=b1, world_size=w1, rank=r, offset=offset) for r in range(w1)]
    rest = [i for p in after for b in p.batches() for i in b.tolist()]
    assert not set(seen) & set(rest) and len(set(rest)) == len(rest)
    order = before[0].order()
    left = TOTAL - offset
    assert set(seen) == set(order[:offset].tolist())
    assert set(rest) == set(order[offset:offset + left - left % (w1 * b1)].tolist())
    if saved == resumed:  # exact: the same batches the uninterrupted ranks yield
        assert [b.tolist() for p in after for b in p.batches()] == \
            [b.tolist() for p in before for b in p.batches()[k:]]


def test_shard_order_is_this_ranks_first_need_of_each_shard():
    plan = block_plan(world_size=2, rank=1)
    shards = plan.shards_of(plan.rank_ids())
    want = list(dict.fromkeys(shards.tolist()))
    assert plan.shard_order().tolist() == want
    later = plan.shards_of(np.concatenate(plan.batches(3)))
    assert plan.shard_order(3).tolist() == list(dict.fromkeys(later.tolist()))
    with pytest.raises(ValueError, match="no shard sizes"):
        EpochPlan(100, 8).shard_order()


# --- the loader and the trainer config ------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_synthetic_shards(tmp_path_factory.mktemp("block_shuffle"), 60, "wds", 6) / "wds"


def loader(folder, **kw):
    kw = {"batch_size": 4, "image_size": 32, "workers": 0, "backend": "torch", "seed": 3, **kw}
    return build_loader(LoaderConfig(shards=str(folder), format="wds", device="cpu", **kw))


def ids_of(batches) -> list[int]:
    return [int(i) for b in batches for i in b.ids]


def take(ld, k: int) -> tuple[list[int], dict]:
    it = iter(ld)
    got = ids_of(next(it) for _ in range(k))
    state = ld.state_dict()
    it.close()
    return got, state


def test_loader_shuffle_options(folder):
    assert LoaderConfig(shards="x", shuffle=None).shuffle == "global"
    assert LoaderConfig(shards="x", split="eval").shuffle == "none"
    assert LoaderConfig(shards="x", shuffle=True).shuffle == "global"
    assert LoaderConfig(shards="x", shuffle=False).shuffle == "none"
    assert LoaderConfig(shards="x", shuffle="block").shuffle_block_shards == DEFAULT_BLOCK_SHARDS
    with pytest.raises(ValueError, match="shuffle must be one of"):
        LoaderConfig(shards="x", shuffle="local")
    with pytest.raises(ValueError, match="shuffle_block_shards must be ≥ 1"):
        LoaderConfig(shards="x", shuffle="block", shuffle_block_shards=0)
    ld = loader(folder, shuffle="block", shuffle_block_shards=2)
    assert ld.shard_sizes == (6,) * 10
    plan = ld.plan()
    assert (plan.shuffle, plan.block_shards) == ("block", 2)
    assert ids_of(ld) == plan.rank_ids().tolist()  # the backend yields the plan


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loader_block_ranks_disjoint_equal_and_exact_resume(folder, backend):
    kw = {"shuffle": "block", "shuffle_block_shards": 2, "backend": backend, "world_size": 2}
    full = [ids_of(loader(folder, rank=r, **kw)) for r in range(2)]
    assert len(full[0]) == len(full[1]) == 60 // 8 * 4 and not set(full[0]) & set(full[1])
    head, state = take(loader(folder, rank=1, **kw), 3)
    assert state["shuffle"] == "block" and state["shuffle_block_shards"] == 2
    resumed = loader(folder, rank=1, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert head + ids_of(resumed) == full[1]


def test_loader_block_elastic_resume(folder):
    kw = {"shuffle": "block", "shuffle_block_shards": 3}
    heads, states = zip(*(take(loader(folder, rank=r, world_size=3, **kw), 2) for r in range(3)))
    rest = []
    for r in range(2):  # 3 ranks × batch 4 → 2 ranks × batch 5
        ld = loader(folder, rank=r, world_size=2, batch_size=5, **kw)
        ld.load_state_dict(states[r])
        rest += ids_of(ld)
    seen = [i for h in heads for i in h]
    order = loader(folder, **kw).plan().order().tolist()
    assert set(seen) == set(order[:24])
    assert len(rest) == len(set(rest)) == 30 and set(rest) == set(order[24:54])


def test_loader_resume_with_another_shuffle_names_both(folder):
    _, state = take(loader(folder, shuffle="block", shuffle_block_shards=2), 1)
    with pytest.raises(ValueError, match="saved with shuffle=block/2 shards but this loader has shuffle=global"):
        loader(folder).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle=block/2 shards but this loader has shuffle=block/4 shards"):
        loader(folder, shuffle="block", shuffle_block_shards=4).load_state_dict(state)
    old = {k: v for k, v in state.items() if not k.startswith("shuffle")}  # saved before shuffle modes
    ld = loader(folder, shuffle="block", shuffle_block_shards=2)
    ld.load_state_dict(old)
    assert ld.batches_yielded == 1


def test_trainer_config_maps_shuffle_options():
    cfg = load_config(None, ["data.train_shards=x", "data.shuffle=block", "data.shuffle_block_shards=4"]).validate()
    assert (cfg.data.shuffle, cfg.data.shuffle_block_shards) == ("block", 4)
    assert load_config(None, ["data.train_shards=x"]).validate().data.shuffle == "global"
    with pytest.raises(ConfigError, match="data.shuffle: 'none' is not one of global, block"):
        load_config(None, ["data.train_shards=x", "data.shuffle=none"]).validate()


def test_trainer_trains_with_block_shuffle_and_checkpoints_the_mode(folder, tmp_path):
    summary = run_main(overrides(str(folder), tmp_path, "block", data__shuffle="block",
                                 data__shuffle_block_shards=2, data__batch_size=8))
    assert summary["steps"] == 3
    state = torch.load(tmp_path / "block" / "checkpoints" / "step_00000003.pt", weights_only=False)["loader"]
    assert (state["shuffle"], state["shuffle_block_shards"], state["batches_yielded"]) == ("block", 2, 3)


# --- the quality report -----------------------------------------------------------------------------

def test_bench_shuffle_quick(tmp_path, capsys):
    assert bench_shuffle.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "shuffle.json").read_text())
    rows = {r["shuffle"]: r for r in report["cases"][0]["rows"]}
    assert list(rows) == ["global", "block/1", "block/4"]
    g, b1, b4 = rows["global"], rows["block/1"], rows["block/4"]
    assert b1["shards_per_batch"] < b4["shards_per_batch"] < g["shards_per_batch"]
    assert b4["open_shards_max"] <= 2 * 4 < g["open_shards_max"] == 40
    assert g["same_shard_pairs"] < b4["same_shard_pairs"] < b1["same_shard_pairs"]
    assert abs(g["neighbour_distance"] - 1 / 3) < 0.02 and b1["neighbour_distance"] < 0.05
    assert b4["shard_lifetime_share"] < 0.2 < 0.99 < g["shard_lifetime_share"]
    assert "| block/4 |" in (tmp_path / "shuffle.md").read_text() and "| global |" in capsys.readouterr().out


@pytest.mark.parametrize("shuffle", ["block", "global"])
def test_read_order_covers_what_the_rank_reads_in_order(shuffle):
    """What a cache prefetches: every shard the rank reads from batch k on, first needs first
    (block: whole blocks in the epoch's order, from the block batch k starts in)."""
    for start in (0, 3, 7):
        plan = block_plan(shuffle=shuffle, world_size=2, rank=1)
        chunks = [c.tolist() for c in plan.read_order(start)]
        flat = list(dict.fromkeys(s for c in chunks for s in c))
        need = plan.shard_order(start).tolist()
        assert set(need) <= set(flat)
        chunk_of = {}
        for i, c in enumerate(chunks):
            for s in c:
                chunk_of.setdefault(s, i)
        assert [chunk_of[s] for s in need] == sorted(chunk_of[s] for s in need)  # chunks in order of need
        if shuffle == "block":
            assert all(len(c) <= 3 for c in chunks)


@pytest.mark.timeout(240)
def test_a_worker_forked_while_a_thread_builds_a_plan_can_use_its_own():
    """The shard cache's thread builds plans (read_order) while the loader forks its workers; a
    worker must not inherit a lock that thread held (Python 3.11's cached_property holds one per
    property across instances: the first block layout in the child then waited forever)."""
    import os
    import threading
    import time

    sizes = [97] * 4000
    stop = threading.Event()

    def spin():
        epoch = 0
        while not stop.is_set():
            next(EpochPlan(sum(sizes), 8, epoch=epoch, shuffle="block", shard_sizes=sizes).read_order(0))
            epoch += 1

    thread = threading.Thread(target=spin)
    thread.start()
    hung = 0
    try:
        for i in range(30):
            pid = os.fork()
            if pid == 0:  # the child: a plan of its own, at once
                EpochPlan(sum(sizes), 8, epoch=10**6 + i, shuffle="block", shard_sizes=sizes).batch(0)
                os._exit(0)
            deadline = time.monotonic() + 5
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.005)
            if hung:
                break
    finally:
        stop.set()
        thread.join()
    assert hung == 0, "a forked child hung on its first plan"
