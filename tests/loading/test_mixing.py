"""Several sources in one run (pipelines/plan/mixing.py, pipelines/sources.py): exact per-epoch counts,
the loader contract over the mixture, resume rules, and bad input named by source."""
import collections
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import build_synthetic_shards
from pipelines.errors import SampleError
from pipelines.faults import BadSamples
from pipelines.loader import Loader, LoaderConfig, build_loader
from pipelines.plan.mixing import Mix, per_epoch
from pipelines.plan.epoch_plan import EpochPlan
from pipelines.sources import dataset_name, parse_sources
from s3_server import s3, upload_folder  # noqa: F401 - the module-scoped server fixture

# The issue's ratios: wds 1,000 samples × 1, rec 3,000 × 0.5, arrow 500 × 2 (uneven shards).
ISSUE = dict(samples=(1000, 3000, 500), weights=(1.0, 0.5, 2.0), shard_sizes=((150,) * 6 + (100,),
                                                                               (256,) * 11 + (184,), (64,) * 7 + (52,)))


def issue_plan(epoch=0, **kw) -> EpochPlan:
    sizes = sum(ISSUE["shard_sizes"], ())
    mix = Mix(ISSUE["samples"], ISSUE["weights"], tuple(len(s) for s in ISSUE["shard_sizes"]))
    return EpochPlan(**{"total": mix.length, "batch_size": 16, "seed": 5, "epoch": epoch, "shard_sizes": sizes,
                        "mix": mix, **kw})


def source_of(ids) -> np.ndarray:
    return np.searchsorted(np.cumsum(ISSUE["samples"]), ids, side="right")


# --- the plan at the issue's ratios ---------------------------------------------------------------

@pytest.mark.parametrize("shuffle", ["global", "block"])
@pytest.mark.parametrize("world", [1, 3, 8])
def test_epoch_counts_are_exact_at_every_world_size(shuffle, world):
    offsets = np.concatenate([[0], np.cumsum(ISSUE["samples"])])
    fractional_seen = set()
    for epoch in range(4):
        plan = issue_plan(epoch, shuffle=shuffle)
        order = plan.order()
        assert len(order) == 1000 + 1500 + 1000
        assert np.bincount(source_of(order), minlength=3).tolist() == [1000, 1500, 1000]
        counts = collections.Counter(order.tolist())
        assert max(counts[g] for g in range(0, 1000)) == min(counts[g] for g in range(0, 1000)) == 1
        assert all(counts[g] == 2 for g in range(offsets[2], offsets[3]))  # weight 2: each sample twice
        half = {g for g in counts if offsets[1] <= g < offsets[2]}
        assert len(half) == 1500 and max(counts[g] for g in half) == 1
        if epoch % 2 == 0:
            fractional_seen = half
        else:  # weight 0.5: the other half, so every sample once over 2 epochs
            assert fractional_seen.isdisjoint(half) and len(fractional_seen | half) == 3000
        # the ranks' batches, O(batch) each, are the permutation's first W·B·k slots, disjoint
        plans = [issue_plan(epoch, shuffle=shuffle, rank=r, world_size=world) for r in range(world)]
        yielded = np.concatenate([b for p in plans for b in p.iter_batches()])
        used = plans[0].num_batches * 16 * world
        assert len(yielded) == used and used > len(order) - 16 * world
        assert collections.Counter(yielded.tolist()) == collections.Counter(order[:used].tolist())


@pytest.mark.parametrize("weight,cycle", [(0.25, 4), (0.5, 2), (0.3, 4), (1.5, 2), (0.999, 1)])
def test_fractional_weight_covers_each_sample_once_per_cycle(weight, cycle):
    n = 400
    mix = Mix((n,), (weight,), (4,))
    seen = collections.Counter()
    for epoch in range(cycle):
        plan = EpochPlan(mix.length, 8, seed=1, epoch=epoch, shard_sizes=(100,) * 4, mix=mix)
        seen.update(plan.order().tolist())
    whole = math.floor(weight) * cycle
    assert set(seen) == set(range(n))  # every sample within ceil(N / F) epochs
    assert min(seen.values()) >= whole + 1 and max(seen.values()) <= whole + 2


def test_block_shuffle_reads_a_mixture_in_runs_of_shards():
    """Block shuffle over a mixture: a block is a few shard pieces, each a run of one shard's ids,
    so a shard is still read in one short stretch (the cache's two-block window holds)."""
    plan = issue_plan(3, shuffle="block", block_shards=4)
    lay = plan._blocks
    order = plan.order()
    for k in range(len(lay.starts)):
        block = order[lay.starts[k]:lay.ends[k]]
        assert len(set(plan.shards_of(block).tolist())) <= 4 + 1  # 4 pieces; a piece of a repeat may recur
    # each piece's ids are consecutive ids of one shard
    first, lengths, numbers = plan.mix.pieces(plan.shard_sizes, plan.seed, plan.epoch)
    assert (plan.shards_of(first) == numbers).all() and (plan.shards_of(first + lengths - 1) == numbers).all()
    assert lengths.sum() == plan.total


def test_one_source_of_weight_one_is_todays_plan():
    sizes = (100,) * 5
    for shuffle in ("global", "block", "none"):
        plain = EpochPlan(500, 8, seed=2, epoch=1, shuffle=shuffle, shard_sizes=sizes)
        mixed = EpochPlan(500, 8, seed=2, epoch=1, shuffle=shuffle, shard_sizes=sizes, mix=Mix((500,), (1.0,), (5,)))
        assert np.array_equal(plain.order(), mixed.order())


def test_mix_per_epoch_rounds_half_up_and_rejects_empty_sources():
    assert per_epoch(3, 0.5) == 2 and per_epoch(1000, 0.25) == 250 and per_epoch(3000, 0.5) == 1500
    with pytest.raises(ValueError, match="source 1: weight 0.001 × 100 samples rounds to no sample"):
        Mix((10, 100), (1.0, 0.001), (1, 1))


def test_bad_samples_are_substituted_within_their_source():
    bad = BadSamples(30, "skip", max_in_a_row=2, bounds=[(0, 10), (10, 25), (25, 30)])
    for g in (24, 10, 29):
        bad.report(g, f"s{g}", "broken")
    assert bad.substitute(24) == 11 and bad.substitute(29) == 25 and bad.substitute(10) == 11
    bad.count(np.array([24, 29, 10]))  # one bad in a row per source, three in plan order
    with pytest.raises(SampleError, match="in a row of source 1"):
        bad.report(11, "s11", "broken")
        bad.report(12, "s12", "broken")
        bad.count(np.array([10, 11, 12]))
    state = BadSamples(30, "skip", bounds=bad.bounds)
    state.load_state_dict(bad.state_dict())
    assert state._runs == bad._runs


# --- the loader over real shards of three formats -------------------------------------------------

@pytest.fixture(scope="module")
def three(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for name, n, fmt, per in (("coco", 60, "wds", 16), ("cc3m", 90, "rec", 20), ("sbu", 30, "arrow", 8)):
        built = build_synthetic_shards(root / "build" / name, n, fmt, per)
        shutil.move(str(built), root / name)  # the make-shards layout: shards/<dataset>/<format>
        out[name] = root / name
    return out


def sources(three, **weights) -> list[dict]:
    w = {"coco": 1, "cc3m": 0.5, "sbu": 2, **weights}
    return [{"shards": str(three["coco"] / "wds"), "weight": w["coco"]},
            {"shards": str(three["cc3m"]), "weight": w["cc3m"]},  # the --out folder: format from the manifest
            {"shards": str(three["sbu"] / "arrow"), "weight": w["sbu"]}]


def mixed(three, backend="torch", **kw) -> Loader:
    kw = {"batch_size": 8, "image_size": 32, "workers": 1, "seed": 3, **kw}
    return build_loader(LoaderConfig(shards=kw.pop("shards", sources(three)), backend=backend, device="cpu", **kw))


def test_sources_resolve_names_formats_and_counts(three):
    ld = mixed(three)
    assert [(s["name"], s["format"], s["samples"], s["per_epoch"]) for s in ld.describe()] == \
        [("coco", "wds", 60, 60), ("cc3m", "rec", 90, 45), ("sbu", "arrow", 30, 60)]
    assert ld.length == 165 and len(ld) == 165 // 8
    ld.close()


def test_both_backends_yield_the_same_mixture(three):
    """Ids unique over the mixture, `Batch.sources` and keys naming each sample's own source, and
    torch and DALI's CPU graph yielding the same samples and captions for (seed, epoch)."""
    from pipelines.shardset import ShardSet

    own = {s: ShardSet(str(p / f), f) for (s, p), f in zip(three.items(), ("wds", "rec", "arrow"))}
    offsets = np.cumsum([0, 60, 90])
    runs = {}
    for backend in ("torch", "dali"):
        ld = mixed(three, backend)
        epoch = [b for b in ld]
        runs[backend] = epoch
        ids = np.concatenate([b.ids.numpy() for b in epoch])
        srcs = np.concatenate([b.sources.numpy() for b in epoch])
        assert (srcs == np.searchsorted(offsets[1:], ids, side="right")).all()
        counts = collections.Counter(ids.tolist())
        assert max(counts[g] for g in range(60, 150)) == 1 and max(counts[g] for g in range(150, 180)) <= 2
        keys = [k for b in epoch for k in b.keys]
        names = list(own)
        assert keys == [own[names[s]].key(int(g - offsets[s])) for g, s in zip(ids, srcs)]
        ld.close()
    for a, b in zip(runs["torch"], runs["dali"]):
        assert a.ids.tolist() == b.ids.tolist() and a.sources.tolist() == b.sources.tolist()
        assert a.raw_tokens.equal(b.raw_tokens) and a.syn_tokens.equal(b.syn_tokens) and a.has_syn.equal(b.has_syn)


def test_a_list_of_one_folder_loads_as_the_folder(three):
    folder = str(three["coco"] / "wds")
    a, b = mixed(three, shards=folder), mixed(three, shards=[folder])
    assert [x.ids.tolist() for x in a] == [x.ids.tolist() for x in b]
    assert b.state_dict()["sources"][0]["name"] == "coco"
    a.close(), b.close()


def _rest(ld: Loader) -> list[list[int]]:
    """The ids of every batch the loader has left in its epoch (from the plan: what it yields)."""
    return [b.tolist() for b in ld.plan().iter_batches(ld.batches_yielded)]


@pytest.mark.parametrize("shuffle", ["global", "block"])
def test_resume_mid_epoch_and_at_other_world_sizes_loses_nothing(three, shuffle):
    def world(w, state=None, k=0):
        lds = [mixed(three, rank=r, world_size=w, shuffle=shuffle, shuffle_block_shards=2, workers=0)
               for r in range(w)]
        for ld in lds:
            ld.set_epoch(1)
            if state is not None:
                ld.load_state_dict(state)
            ld.batches_yielded += k  # as if it had yielded k more batches
        return lds

    full = world(1)[0]
    epoch = np.concatenate(full.plan().batches())
    for k in (1, 7, 15):  # resume points at the same world size: exactly the batches left
        ld = world(1, k=k)[0]
        again = world(1, ld.state_dict())[0]
        assert _rest(again) == _rest(ld)
        assert again.plan().consumed(again.batches_yielded) == k * 8
    for before, after in ((4, 2), (2, 3)):  # elastic: the epoch's rest split over the new ranks
        saved = world(before, k=2)
        done = np.concatenate([b for ld in saved for b in ld.plan().batches()[:2]])
        resumed = world(after, saved[0].state_dict())
        rest = np.concatenate([b for ld in resumed for b in ld.plan().batches(ld.batches_yielded)])
        got = collections.Counter(np.concatenate([done, rest]).tolist())
        want = collections.Counter(epoch[:len(done) + len(rest)].tolist())
        assert got == want  # nothing lost, nothing repeated beyond its weight
        assert len(epoch) - (len(done) + len(rest)) < 8 * after


def test_resume_on_a_changed_mixture_is_refused_or_remixed(three, caplog):
    ld = mixed(three)
    ld.batches_yielded = 3
    state = ld.state_dict()
    changed = mixed(three, shards=sources(three, cc3m=1.0))
    with pytest.raises(ValueError, match=r"cc3m's weight changed: 0.5 → 1.0.*data.remix_at_epoch=true"):
        changed.load_state_dict(state)
    fewer = mixed(three, shards=sources(three)[:2])
    with pytest.raises(ValueError, match=r"sources \['coco', 'cc3m', 'sbu'\] became \['coco', 'cc3m'\]"):
        fewer.load_state_dict(state)
    remix = mixed(three, shards=sources(three, cc3m=1.0), remix_at_epoch=True)
    remix.load_state_dict(state)
    assert (remix.epoch, remix.batches_yielded, remix.offset) == (1, 0, 0)
    assert "epoch 1 starts with the new data (the rest of epoch 0 is skipped)" in caplog.text
    same = mixed(three, remix_at_epoch=True)
    same.load_state_dict(state)
    assert (same.epoch, same.batches_yielded) == (0, 3)


def test_resume_on_resharded_data_is_refused(three, tmp_path):
    """A source re-converted with other shard sizes orders its blocks differently: refused (the
    same samples loaded silently before, repeating some and never showing others)."""
    from conftest import synthetic_input
    from tools.convert import make_shards

    coco = str(three["coco"] / "wds")
    ld = mixed(three, shards=coco, shuffle="block")
    ld.batches_yielded = 2
    other = tmp_path / "coco"
    assert make_shards.main(synthetic_input(tmp_path / "syn", 60) + [
        "--tokenize", "--format", "wds", "--samples-per-shard", "7", "--out", str(other), "--workers", "1",
        "--quiet"]) == 0
    again = mixed(three, shards=str(other / "wds"), shuffle="block")
    with pytest.raises(ValueError, match="shard layout"):
        again.load_state_dict(ld.state_dict())


def test_a_state_saved_before_mixing_loads_as_one_source(three):
    ld = mixed(three, shards=str(three["coco"] / "wds"))
    ld.batches_yielded = 2
    state = ld.state_dict()
    del state["sources"]
    again = mixed(three, shards=[{"shards": str(three["coco"] / "wds")}])
    again.load_state_dict(state)
    assert again.batches_yielded == 2


def test_bad_sources_are_one_line_errors_naming_the_source(three, tmp_path):
    coco = str(three["coco"] / "wds")
    cases = [
        ([{"shards": str(tmp_path / "nowhere")}], "data source 0 .*nowhere.*no such shard folder"),
        ([{"shards": coco, "weight": 0}], r"source 0 .*weight must be a finite number > 0, not 0"),
        ([{"shards": coco, "weight": float("nan")}], "weight must be a finite number > 0, not nan"),
        ([{"shards": coco, "weight": "two"}], "weight must be a number > 0, not 'two'"),
        ([{"shards": coco, "format": "rec"}], r"wds/? is a wds folder \(its name\), but the source sets format 'rec'"),
        ([coco, {"shards": str(three["coco"]), "format": "wds"}], "same folder as data source 0"),
        ([coco, {"shards": str(three["sbu"] / "arrow"), "weight": 0.01}], "rounds to no sample per epoch"),
        ([{"shards": coco, "wieght": 2}], r"unknown key\(s\) wieght"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(([coco, str(empty)], "data source 1 .*empty.*no wds shards found"))
    for value, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            mixed(three, shards=value).close()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"mixture's epoch holds 165 samples \(coco: 60, cc3m: 45, sbu: 60\)"):
        mixed(three, shards=sources(three), batch_size=32, world_size=8)


def test_a_source_format_comes_from_its_folder_not_its_manifest(three, tmp_path, monkeypatch):
    """Named by the folder (…/wds), its only format subfolder (the --out folder) or its index's
    header (a format folder under another name): no manifest is read (megabytes at 100 M)."""
    import pipelines.sources as sources_module

    renamed = tmp_path / "coco-v2"
    shutil.copytree(three["coco"] / "wds", renamed)
    monkeypatch.setattr(sources_module, "_read_manifest", lambda folder: pytest.fail(f"read {folder}"))
    ld = mixed(three, shards=[str(three["coco"] / "wds"), str(three["cc3m"]), str(renamed)])
    assert [s["format"] for s in ld.describe()] == ["wds", "rec", "wds"]
    assert [s["name"] for s in ld.describe()] == ["coco", "cc3m", "coco-v2"]
    ld.close()


def test_dataset_names():
    assert dataset_name("shards/coco/wds") == "coco" and dataset_name("s3://b/cc3m/rec/") == "cc3m"
    assert dataset_name("shards/coco") == "coco"
    assert [s.name for s in parse_sources(["a/train/wds", "b/train/wds"])] == ["train-1", "train-2"]


def test_a_remote_source_beside_local_ones(three, s3, tmp_path):  # noqa: F811
    """A local wds folder, a local arrow folder and an s3:// RecordIO prefix in one run: the
    remote source streams through the node cache, and the loader yields what the local copy does."""
    url = s3.url("mix-cc3m")
    upload_folder(three["cc3m"], url)
    local = mixed(three, workers=0)
    remote_sources = sources(three)
    remote_sources[1] = {"shards": url, "format": "rec", "weight": 0.5, "name": "cc3m"}
    remote = mixed(three, shards=remote_sources, workers=0, cache_dir=str(tmp_path / "cache"))
    for a, b in zip(local, remote):
        assert a.ids.tolist() == b.ids.tolist() and a.keys == b.keys and a.raw_tokens.equal(b.raw_tokens)
    assert remote.shardset.sets[1].cache.stats()["fetched"] > 0
    assert json.loads(json.dumps(remote.state_dict()))["sources"][1]["shards"] == url
    local.close(), remote.close()
