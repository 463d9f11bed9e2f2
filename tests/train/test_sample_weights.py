"""The gates' per-sample record at scale (issue 18, item 6): up to `run.sample_record_max` samples
it is the whole record it always was; above, a fixed subset of that many ids, so memory, merges
and files do not grow with N; readers and resume work on either; two gloo ranks merge a subset."""
from __future__ import annotations

import socket
import time
import tracemalloc

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import build_synthetic_shards, overrides, run_main
from train import checkpoint
from train.config import ConfigError, load_config
from train.sample_weights import SampleWeights, final_epoch, record_ids, recorded_ids

CPU = torch.device("cpu")


class Batch:
    def __init__(self, ids):
        self.ids = torch.as_tensor(ids, dtype=torch.int64)
        self.keys = [str(int(i)) for i in self.ids]

    def __len__(self):
        return len(self.ids)


def info(values, syn=None):
    """AlipLoss's info for a batch whose W_s are `values` (w_raw 0.5, margin = W_s - 0.5)."""
    w = torch.as_tensor(values, dtype=torch.float32)
    return {"w_sample": w, "w_raw": torch.full_like(w, 0.5), "s_tc": w, "h_tc": torch.tensor(0.5),
            "syn_mask": torch.ones(len(w), dtype=torch.bool) if syn is None else torch.as_tensor(syn)}


def test_up_to_the_limit_the_record_is_whole_and_laid_out_as_before():
    small, limited = SampleWeights(10, CPU, 2), SampleWeights(10, CPU, 2, max_records=10)
    for log in (small, limited):
        log.record(1, Batch([3, 7]), info([0.25, 1.0]))
        log.record(2, Batch([3]), info([0.75]))
    a, b = small.merged(), limited.merged()
    assert set(a) == set(b) == {"w_sample", "w_pair", "gate_margin", "step", "steps_per_epoch"}
    for k in ("w_sample", "w_pair", "gate_margin", "step"):
        assert torch.equal(a[k].nan_to_num(-9), b[k].nan_to_num(-9)) and len(a[k]) == 10
    assert a["step"].tolist() == [-1, -1, -1, 2, -1, -1, -1, 1, -1, -1]
    assert a["w_sample"][3] == 0.75 and a["w_pair"][7] == 0.5 and a["gate_margin"][7] == 0.5
    assert small.ids is None and record_ids(a).tolist() == list(range(10))


def test_subset_ids_are_fixed_spread_and_cost_nothing_per_sample():
    ids = recorded_ids(1_000_000, 5_000)
    assert len(ids) == len(np.unique(ids)) == 5_000 and ids.dtype == np.int64
    assert np.all(np.diff(ids) > 0) and 0 <= ids[0] and ids[-1] < 1_000_000
    assert np.array_equal(ids, recorded_ids(1_000_000, 5_000))  # the same in every run: seed-free
    assert recorded_ids(5_000, 5_000) is None
    # spread over the set, not a stride of storage order: every tenth has its share, and rows
    # within 1,000-sample shards are not all alike
    assert np.histogram(ids, bins=10, range=(0, 1_000_000))[0].min() > 400
    assert len(np.unique(ids % 1000)) > 900
    with pytest.raises(ValueError, match="max_records must be ≥ 1"):
        recorded_ids(10, 0)
    # N = 10^8 with max 10^4: instant, and small
    tracemalloc.start()
    t = time.perf_counter()
    log = SampleWeights(100_000_000, CPU, 10, max_records=10_000)
    seconds, peak = time.perf_counter() - t, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    held = sum(x.numel() * x.element_size() for x in (log.ids, log.w_sample, log.w_pair, log.gate_margin, log.step))
    assert seconds < 1 and peak < 4 << 20 and held < 300_000, (seconds, peak, held)  # 28 B per recorded sample


def test_a_subset_record_keeps_its_ids_only():
    n = 1000
    log = SampleWeights(n, CPU, steps_per_epoch=3, max_records=100)
    kept = set(log.ids.tolist())
    ids = np.arange(0, n, 7)  # some kept, most not
    log.record(1, Batch(ids), info(np.linspace(0.1, 1.0, len(ids))))
    state = log.merged()
    assert set(state) == {"w_sample", "w_pair", "gate_margin", "step", "steps_per_epoch", "ids", "samples"}
    assert state["samples"] == n and len(state["ids"]) == len(state["step"]) == 100
    seen = state["ids"][state["step"] == 1].tolist()
    assert seen == sorted(kept & set(ids.tolist())) and seen  # exactly the batch's kept samples
    where = {int(g): i for i, g in enumerate(ids)}
    for row in np.flatnonzero(state["step"].numpy() == 1):
        g = int(state["ids"][row])
        assert state["w_sample"][row] == pytest.approx(np.linspace(0.1, 1.0, len(ids))[where[g]])
    assert torch.isnan(state["w_sample"][state["step"] < 0]).all()
    assert final_epoch(state).sum() == len(seen)


def test_resume_restores_the_record_and_maps_it_to_another_limit():
    n = 1000
    log = SampleWeights(n, CPU, 3, max_records=100)
    log.record(1, Batch(np.arange(n)), info(np.linspace(0.0, 1.0, n)))
    state = log.merged()
    again = SampleWeights(n, CPU, 3, max_records=100)
    again.load_state_dict(state)
    assert all(torch.equal(again.merged()[k].nan_to_num(-9), state[k].nan_to_num(-9)) for k in ("w_sample", "step"))
    # another limit: the samples both keep are restored, by id
    whole = SampleWeights(n, CPU, 3, max_records=n)
    whole.load_state_dict(state)
    restored = whole.merged()
    assert restored["step"][state["ids"]].tolist() == [1] * 100 and int((restored["step"] == 1).sum()) == 100
    smaller = SampleWeights(n, CPU, 3, max_records=50)
    smaller.load_state_dict(restored)
    part = smaller.merged()
    assert torch.equal(part["w_sample"], restored["w_sample"][part["ids"]])
    with pytest.raises(ValueError, match="covers 1000 samples, but this run's data holds 999"):
        SampleWeights(999, CPU, 3, max_records=100).load_state_dict(state)


def test_training_auc_reads_the_recorded_ids_only(tmp_path, monkeypatch):
    import train.eval.noise_eval as noise_eval

    n, read = 400, []

    class Shards:  # meta.noise by id: every third sample swapped
        def __init__(self, *args):
            pass

        def __len__(self):
            return n

        def get(self, gid):
            read.append(gid)
            return type("Sample", (), {"meta": {"noise": "swap" if gid % 3 == 0 else "clean"}})

    monkeypatch.setattr(noise_eval, "ShardSet", Shards)
    log = SampleWeights(n, CPU, steps_per_epoch=1, max_records=60)
    ids = np.arange(n)
    log.record(1, Batch(ids), info(np.where(ids % 3 == 0, 0.2, 1.0)))
    log.save(str(tmp_path / "sample_weights.pt"))
    out = noise_eval.training_auc(str(tmp_path / "sample_weights.pt"), "unused", "wds")
    assert out["auc_train_w_sample"] == 1.0 and out["n_train_final_epoch"] == 60
    assert sorted(read) == log.ids.tolist()  # no other sample's metadata was read
    monkeypatch.setattr(Shards, "__len__", lambda self: n + 1)
    with pytest.raises(ValueError, match="400 samples, but unused holds 401"):
        noise_eval.training_auc(str(tmp_path / "sample_weights.pt"), "unused", "wds")


def test_config_key():
    assert load_config(None, ["data.train_shards=x"]).validate().run.sample_record_max == 1_000_000
    with pytest.raises(ConfigError, match="run.sample_record_max: must be ≥ 1"):
        load_config(None, ["data.train_shards=x", "run.sample_record_max=0"]).validate()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return str(build_synthetic_shards(tmp_path_factory.mktemp("record_data"), 96, "wds", 24) / "wds")


def test_trainer_records_a_subset_and_resumes_it(shards, tmp_path):
    """An alip run over 96 samples with a 40-sample limit: the file names its 40 ids, the
    checkpoint holds them, and a resumed run keeps what was recorded before the resume."""
    common = dict(loss__mode="alip", data__batch_size=8, optim__max_steps=4, run__ckpt_every=2,
                  run__sample_record_max=40)
    run_main(overrides(shards, tmp_path, "sub", **common))
    saved = torch.load(tmp_path / "sub" / "sample_weights.pt")
    assert saved["samples"] == 96 and saved["ids"].tolist() == recorded_ids(96, 40).tolist()
    assert set(saved["step"].unique().tolist()) <= {-1, 1, 2, 3, 4} and (saved["step"] > 0).any()
    ckpt = checkpoint.load(str(tmp_path / "sub" / "checkpoints" / "step_00000002.pt"))["sample_weights"]
    assert torch.equal(ckpt["ids"], saved["ids"]) and int(ckpt["step"].max()) == 2
    run_main(overrides(shards, tmp_path, "sub", **{**common, "optim__max_steps": 6}) + ["run.resume=latest"])
    after = torch.load(tmp_path / "sub" / "sample_weights.pt")
    before = saved["step"] > 0
    # rows recorded before the resume are there still, unless trained on again since
    assert torch.all(after["step"][before] >= saved["step"][before]) and int(after["step"].max()) == 6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    log = SampleWeights(1000, CPU, 4, max_records=100)
    ids = log.ids[rank::2]  # rank 0 trains the even rows' samples at step 1, rank 1 the odd ones at step 2
    other = int(np.setdiff1d(np.arange(1000), log.ids.numpy())[rank])  # a sample the record does not keep
    log.record(1 + rank, Batch(torch.cat([ids, torch.tensor([other])])),
               info(torch.full((2 * (len(ids) + 1),), 0.1 + rank)), rank=rank)
    state = log.merged(world_size=2)
    if rank == 0:
        torch.save(state, out)
    dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_merge_a_subset(tmp_path):
    mp.spawn(_merge_worker, args=(_free_port(), str(tmp_path / "merged.pt")), nprocs=2, join=True)
    state = torch.load(tmp_path / "merged.pt")
    assert len(state["step"]) == 100 and state["samples"] == 1000
    assert state["step"].tolist() == [1, 2] * 50
    assert torch.allclose(state["w_sample"], torch.tensor([0.1, 1.1] * 50))
