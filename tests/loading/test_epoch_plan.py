"""The epoch plan evaluated per batch (issue 18, item 3): `permute` is a bijection for every n and
key, `batch(b)` is exactly the whole-epoch slicing it replaces, no structure a training run could
see (position against id, neighbours, epoch against epoch), batch mixing as good as numpy's
permutation, O(batch) memory and time at 400 M samples, and loader states that name their plan
version. Ranks, remainders and resume (exact and elastic, both backends) are tested in
test_loaders.py and test_block_shuffle.py on the same plan."""
from __future__ import annotations

import json
import pickle
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.plan.epoch_plan import PLAN_VERSION, ROUNDS, EpochPlan, mix, mix_array, permute, round_keys
from tools.bench.bench_shuffle import batch_mixing, distinct_per_row

SIZES = tuple(np.random.default_rng(0).integers(0, 40, 300).tolist())  # uneven, some empty


def is_permutation(ids: np.ndarray, n: int) -> bool:
    return ids.dtype == np.int64 and np.array_equal(np.sort(ids), np.arange(n))


# --- the permutation -------------------------------------------------------------------------------

PRIMES_AND_POWERS = [1, 2, 3, 4, 5, 7, 8, 13, 15, 16, 17, 31, 63, 64, 65, 127, 251, 255, 256, 257,
                     1021, 1023, 1024, 1025, 4093, 65535, 65536, 65537, 999_983, 1_000_000]


@pytest.mark.parametrize("n", PRIMES_AND_POWERS)
def test_permute_is_a_bijection_of_every_size(n):
    for key in ((0, 0, 1), (7, 3, 2), (2**40 + 1, 99, 3)):
        ids = permute(np.arange(n), n, round_keys(*key))
        assert is_permutation(ids, n), (n, key)


def test_permute_per_element_keys_equal_one_permutation_each():
    """The block mode's form (a size and keys per element) gives each element its own permutation's value."""
    sizes, keys = [5, 1, 64, 1000], [round_keys(1, 2, 3, k) for k in range(4)]
    x = np.array([4, 0, 63, 517, 2, 999])
    which = np.array([0, 1, 2, 3, 0, 3])
    got = permute(x, np.array(sizes)[which], np.stack(keys, axis=1)[:, which])
    want = [permute(x[i:i + 1], sizes[w], keys[w])[0] for i, w in enumerate(which)]
    assert got.tolist() == want


def test_mix_array_is_mix_elementwise():
    a = np.array([0, 1, 2**31, -5])
    assert [int(v) for v in mix_array(3, a, 11)] == [mix(3, int(v), 11) for v in a]
    assert int(mix_array(-1, 2**64 - 1)) == mix(-1, 2**64 - 1)
    assert round_keys(1, 2).shape == (ROUNDS,) and len(set(round_keys(1, 2).tolist())) == ROUNDS


@pytest.mark.parametrize("total", [1, 2, 3, 97, 256, 257, 10_007])
@pytest.mark.parametrize("shuffle", ["global", "block", "none"])
def test_plan_orders_are_permutations(total, shuffle):
    rng = np.random.default_rng(total)
    sizes = rng.multinomial(total, np.ones(max(1, total // 9)) / max(1, total // 9)).tolist()  # empty ones too
    for block in (1, 3, 8):
        plan = EpochPlan(total, 1, seed=total, epoch=block, shuffle=shuffle, block_shards=block, shard_sizes=sizes)
        assert is_permutation(plan.order(), total)


def test_block_plan_of_many_shards_keeps_shards_in_one_stretch():
    plan = EpochPlan(sum(SIZES), 16, seed=1, epoch=2, shuffle="block", block_shards=4, shard_sizes=SIZES)
    order = plan.order()
    assert is_permutation(order, sum(SIZES))
    shards = plan.shards_of(order)
    # Each block's stretch of the epoch reads at most 4 shards, and no shard is read in two blocks.
    blocks = np.searchsorted(plan._blocks.ends, np.arange(len(order)), side="right")
    owner = {}
    for k, s in zip(blocks.tolist(), shards.tolist()):
        assert owner.setdefault(s, k) == k
    assert max(np.bincount(np.unique(np.stack([blocks, shards]), axis=1)[0])) <= 4


# --- per batch equals the whole epoch ------------------------------------------------------------

CASES = [dict(total=1000, batch_size=8, world_size=3, drop_last=True),
         dict(total=1000, batch_size=7, world_size=4, drop_last=False),
         dict(total=5, batch_size=4, world_size=3, drop_last=False),
         dict(total=1000, batch_size=8, world_size=3, drop_last=True, offset=123),
         dict(total=1000, batch_size=6, world_size=2, drop_last=False, offset=997)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shuffle", ["global", "block", "none"])
def test_batch_is_the_slice_of_the_epoch(case, shuffle):
    total = case["total"]
    sizes = [total // 10] * 10 if total >= 10 else [total]
    for rank in range(case["world_size"]):
        plan = EpochPlan(seed=4, epoch=2, rank=rank, shuffle=shuffle, block_shards=3, shard_sizes=sizes, **case)
        whole = plan.batches()
        assert len(whole) == plan.num_batches
        assert [plan.batch(b).tolist() for b in range(plan.num_batches)] == [b.tolist() for b in whole]
        assert [b.tolist() for b in plan.iter_batches(2)] == [b.tolist() for b in whole[2:]]
        assert np.array_equal(np.concatenate(whole), plan.rank_ids())
        with pytest.raises(IndexError):
            plan.batch(plan.num_batches)
    positions = np.array([[0, total - 1], [total // 2, 1]])
    assert np.array_equal(plan.order_at(positions), plan.order()[positions])
    with pytest.raises(IndexError):
        plan.order_at([total])


def test_plans_pickle_without_their_cached_layout():
    plan = EpochPlan(sum(SIZES), 16, seed=1, shuffle="block", block_shards=4, shard_sizes=SIZES)
    first = plan.batch(3)  # builds the layout
    assert "_blocks" in vars(plan)
    copy = pickle.loads(pickle.dumps(plan))
    assert copy == plan and "_blocks" not in vars(copy) and np.array_equal(copy.batch(3), first)


def test_dali_source_and_torch_workers_follow_batches_across_epochs(monkeypatch):
    pytest.importorskip("nvidia.dali")
    import torch

    from pipelines.backends.dali import PlanSource
    from pipelines.faults import BadSamples
    from pipelines.backends.torch_loader import worker_batches

    plan = EpochPlan(sum(SIZES), 16, seed=1, epoch=3, rank=1, world_size=2, shuffle="block", block_shards=4,
                     shard_sizes=SIZES)
    after = [EpochPlan(sum(SIZES), 16, seed=1, epoch=e, rank=1, world_size=2, shuffle="block", block_shards=4,
                       shard_sizes=SIZES).batches() for e in (4, 5)]
    source = PlanSource(None, plan, 5, seed=1, bad=BadSamples(sum(SIZES)))
    want = [(3, b) for b in plan.batches(5)] + [(4, b) for b in after[0]] + [(5, b) for b in after[1]]
    got = [source.planned(i) for i in range(len(want))]
    assert [(e, b.tolist()) for e, b in got] == [(e, b.tolist()) for e, b in want]
    # torch: the DataLoader takes worker j mod W's batches in turn.
    shares = []
    for wid in range(3):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda w=wid: SimpleNamespace(id=w, num_workers=3))
        shares.append(list(worker_batches(plan, 5)))
    merged = [shares[j % 3][j // 3] for j in range(sum(map(len, shares)))]
    assert [b for b, _ in merged] == list(range(5, plan.num_batches))
    assert [ids.tolist() for _, ids in merged] == [b.tolist() for b in plan.batches(5)]


# --- no structure, as mixed as numpy's permutation ------------------------------------------------

def chi2(x: np.ndarray, y: np.ndarray, n: int, k: int = 32) -> float:
    """Pearson's χ² of the k × k histogram of pairs (x, y) of [0, n) against a uniform one:
    ≈ (k-1)² = 961 ± 44 for independent uniform pairs."""
    h = np.histogram2d(x * k // n, y * k // n, bins=k, range=[[0, k], [0, k]])[0]
    expect = len(x) / k / k
    return float(((h - expect) ** 2 / expect).sum())


@pytest.mark.parametrize("n", [1_000_000, 999_983])
def test_global_order_joint_distributions_are_uniform(n):
    """Position against id, and ids at lags that share a Feistel digit (the low radix is 1000
    here), show no more structure than independent uniform pairs (5 σ)."""
    order = EpochPlan(n, 256, seed=3, epoch=1).order()
    assert chi2(np.arange(n), order, n) < 1180
    for lag in (1, 2, 999, 1000, 1001, 2000):
        assert chi2(order[:-lag], order[lag:], n) < 1180, lag


def test_global_order_has_no_visible_structure():
    n = 1_000_000
    orders = {key: EpochPlan(n, 256, seed=key[0], epoch=key[1]).order() for key in [(0, 0), (0, 1), (1, 0)]}
    pos = np.arange(n)
    for order in orders.values():
        assert abs(np.corrcoef(pos, order)[0, 1]) < 0.005  # random: ~0.001
        gaps = np.abs(np.diff(order))
        assert abs(gaps.mean() / n - 1 / 3) < 0.005
        assert np.mean(gaps < n // 1000) < 0.003  # random: 0.002
        # Position mod small numbers says nothing about the id's (the halves of a Feistel network).
        for m in (2, 3, 256, 1024):
            assert abs(np.corrcoef(pos % m, order % m)[0, 1]) < 0.01
    a, b, c = orders.values()
    for x, y in ((a, b), (a, c)):  # another epoch, another seed: unrelated permutations
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.005 and np.count_nonzero(x == y) < 20


def test_block_order_within_blocks_has_no_visible_structure():
    sizes = (10_000,) * 100
    plan = EpochPlan(sum(sizes), 256, seed=2, shuffle="block", block_shards=8, shard_sizes=sizes)
    order = plan.order()
    within = order - plan._ends[plan.shards_of(order)] + 10_000  # row inside its shard
    first = plan._blocks.starts
    k = np.searchsorted(plan._blocks.ends, np.arange(len(order)), side="right")
    q = np.arange(len(order)) - first[k]
    assert abs(np.corrcoef(q, within)[0, 1]) < 0.01  # a shard's rows come in no particular order
    assert abs(np.abs(np.diff(within)).mean() / 10_000 - 1 / 3) < 0.01  # neighbours: unrelated rows


def mixing(order: np.ndarray, sizes, batch: int) -> tuple[float, float]:
    """(distinct shards per batch, same-shard pair share) of consecutive batches of an order."""
    plan = EpochPlan(sum(sizes), batch, shard_sizes=sizes, shuffle="none")
    rows = len(order) // batch
    shards = plan.shards_of(order[:rows * batch].reshape(rows, batch))
    return float(distinct_per_row(shards).mean()), float(batch_mixing(shards, len(sizes))[0].mean())


def test_batches_mix_shards_as_well_as_numpys_permutation():
    sizes, batch = (1000,) * 200, 256
    total = sum(sizes)
    ours = mixing(EpochPlan(total, batch, seed=0).order(), sizes, batch)
    numpy = mixing(np.random.default_rng(0).permutation(total), sizes, batch)
    assert ours[0] >= numpy[0] - 0.5 and ours[1] <= numpy[1] * 1.1, (ours, numpy)
    # Within blocks the same holds against a numpy shuffle of the same blocks.
    plan = EpochPlan(total, batch, seed=0, shuffle="block", block_shards=8, shard_sizes=sizes)
    order = plan.order()
    starts, ends = plan._blocks.starts, plan._blocks.ends
    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.permutation(np.sort(order[a:b])) for a, b in zip(starts, ends)])
    ours, numpy = mixing(order, sizes, batch), mixing(reference, sizes, batch)
    assert ours[0] >= numpy[0] - 0.5 and ours[1] <= numpy[1] * 1.1, (ours, numpy)


# --- scale: O(batch) at 400 M samples --------------------------------------------------------------

@pytest.mark.parametrize("shuffle", ["global", "block"])
def test_first_batch_at_400m_samples_is_fast_and_small(shuffle):
    total, shards = 400_000_000, 40_000
    tracemalloc.start()
    t = time.perf_counter()
    plan = EpochPlan(total, 256, seed=1, epoch=7, rank=5, world_size=8, shuffle=shuffle,
                     shard_sizes=(total // shards,) * shards)
    first = plan.batch(0)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 2 and peak < 16 << 20, (seconds, peak)  # the shard tuple and O(S) layout included
    assert len(first) == 256 and len(set(first.tolist())) == 256 and first.max() < total
    last = plan.batch(plan.num_batches - 1)
    assert not set(first.tolist()) & set(last.tolist())
    if shuffle == "block":  # the first batch reads from the first block's 8 shards
        assert len(np.unique(plan.shards_of(first))) <= 8


# --- loader state ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from conftest import build_synthetic_shards

    return build_synthetic_shards(tmp_path_factory.mktemp("epoch_plan"), 40, "wds", 5) / "wds"


def loader(folder, **kw):
    from pipelines.loader import LoaderConfig, build_loader

    kw = {"batch_size": 4, "image_size": 32, "workers": 0, "backend": "torch", "seed": 3, **kw}
    return build_loader(LoaderConfig(shards=str(folder), format="wds", device="cpu", **kw))


def test_loader_state_names_its_plan_version(folder):
    ld = loader(folder)
    it = iter(ld)
    next(it)
    state = json.loads(json.dumps(ld.state_dict()))
    it.close()
    assert state["plan"] == PLAN_VERSION
    old = {k: v for k, v in state.items() if k != "plan"}  # saved before plan versions: numpy's order
    with pytest.raises(ValueError, match=r"saved mid-epoch \(epoch 0, batch 1 of 10\) under epoch plan version 1.*"
                                         r"Resume from a checkpoint saved at an epoch's end"):
        loader(folder).load_state_dict(old)
    with pytest.raises(ValueError, match="mid-epoch"):  # taken over at another world size: mid-epoch too
        loader(folder).load_state_dict({**old, "batches_yielded": 0, "offset": 8})
    for yielded, accum, epoch in ((0, 1, 0), (10, 1, 1), (9, 3, 1)):  # nothing of the epoch used, or all
        ld = loader(folder)
        ld.load_state_dict({**old, "batches_yielded": yielded}, accum_steps=accum)
        assert (ld.epoch, ld.batches_yielded, ld.offset) == (epoch, 0, 0)
    ld = loader(folder, world_size=2, batch_size=2)  # at an epoch's end, elastic: the next epoch, whole
    ld.load_state_dict({**old, "batches_yielded": 10})
    assert (ld.epoch, ld.batches_yielded, ld.offset, len(ld)) == (1, 0, 0, 10)
