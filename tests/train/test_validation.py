"""Validation during training and the best checkpoint (train/validation.py): `eval.every_epochs`,
`eval.every_steps`, `run.keep_best`, on `lip-tiny` over 64 synthetic images (4 steps per epoch
at batch 16) with a 16-image held-out test set.

1. The curve: eval/<metric> rows in metrics.jsonl and TensorBoard at every epoch end and the last
   step, plots/eval_recall.png; the end of the run reuses the last step's evaluation.
2. The best: with the evaluations scripted, <run>/best/ holds the weights of the best step (equal
   to that step's checkpoint), not the last; lip-eval loads best/checkpoint.pt.
3. Resume keeps the best so far: a resumed run does not replace best/ with a worse evaluation,
   and does replace it with a better one.
4. Validating does not change what trains (the RNG states and the train mode are given back).
5. Config errors name the key; two gloo ranks validate without hanging and agree on the best.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import overrides, run_main
from train import checkpoint, validation
from train.config import ConfigError, load_config

STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """64 train images in wds shards and a Karpathy-style test JSON of 16 others."""
    from tools.convert import make_shards
    from tools.demo import make_synthetic

    root = tmp_path_factory.mktemp("validation_data")
    raw = root / "raw"
    assert make_synthetic.main(["--out", str(raw), "--train", "64", "--test", "16", "--size", "64",
                                "--workers", "1"]) == 0
    assert make_shards.main(["--source", "table", "--input", str(raw / "train.jsonl"), "--image-column", "image",
                             "--caption-column", "caption", "--synthetic-captions", str(raw / "train_syn.jsonl"),
                             "--tokenize", "--format", "wds", "--samples-per-shard", "32",
                             "--out", str(root / "shards"), "--workers", "1", "--quiet"]) == 0
    return {"shards": str(root / "shards" / "wds"), "json": str(raw / "test_karpathy.json"), "raw": str(raw)}


def argv(data, out, name, **changes) -> list[str]:
    values = dict(optim__max_steps="null", optim__epochs=3, eval__retrieval_json=data["json"],
                  eval__images_root=data["raw"], eval__batch_size=16, loss__mode="clip-raw")
    return overrides(data["shards"], out, name, **{**values, **changes})


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def scripted(monkeypatch, values: list[float]) -> list[int]:
    """Replace the evaluation with one whose mean_r1 is the next of `values` (the i2t and t2i R@1
    both equal to it); returns the list the calls' step counts land in."""
    calls, left = [], list(values)

    def fake(cfg, model, device):
        calls.append(1)
        v = left.pop(0)
        keys = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
        return {"test_karpathy": {**{k: v for k in keys}, "rsum": 6 * v}}
    monkeypatch.setattr(validation, "retrieval_evals", fake)
    return calls


def test_curve_in_the_records_and_the_plot(data, tmp_path):
    summary = run_main(argv(data, tmp_path, "curve", eval__every_epochs=1, run__plots="true"))
    run_dir = tmp_path / "curve"
    assert summary["steps"] == 3 * STEPS_PER_EPOCH
    rows = [r for r in read_metrics(run_dir) if "eval/mean_r1" in r]
    assert [r["step"] for r in rows] == [4, 8, 12]
    for r in rows:
        assert {f"eval/{k}" for k in ("i2t_R@1", "t2i_R@1", "rsum", "mean_r1", "r_mean")} <= set(r)
        assert r["eval/mean_r1"] == pytest.approx((r["eval/i2t_R@1"] + r["eval/t2i_R@1"]) / 2)
        assert r["eval/r_mean"] == pytest.approx(r["eval/rsum"] / 6) and 0 <= r["eval/mean_r1"] <= 100
    # the end of the run reports the last step's evaluation (made once)
    results = json.loads((run_dir / "results.json").read_text())["curve"]["test_karpathy"]
    assert results["rsum"] == rows[-1]["eval/rsum"] and summary["eval"]["test_karpathy"] == results
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("eval/mean_r1")] == [4, 8, 12]
    assert (run_dir / "plots" / "eval_recall.png").stat().st_size > 1000
    assert not (run_dir / "best").exists()  # run.keep_best is off
    assert "best" not in summary


def test_every_steps(data, tmp_path, monkeypatch):
    calls = scripted(monkeypatch, [1.0] * 10)
    run_main(argv(data, tmp_path, "steps", eval__every_steps=5, optim__epochs=2))
    assert [r["step"] for r in read_metrics(tmp_path / "steps") if "eval/mean_r1" in r] == [5, 8]  # and the last
    assert len(calls) == 2


def test_best_is_the_best_step_not_the_last(data, tmp_path, monkeypatch):
    scripted(monkeypatch, [5.0, 9.0, 3.0])
    summary = run_main(argv(data, tmp_path, "best", eval__every_epochs=1, run__keep_best="mean_r1",
                            run__keep_checkpoints=5))
    run_dir = tmp_path / "best"
    best = torch.load(run_dir / "best" / "checkpoint.pt", weights_only=False)
    assert (best["step"], best["epoch"], best["best"]["value"]) == (8, 1, 9.0)
    at_8 = checkpoint.load(str(run_dir / "checkpoints" / "step_00000008.pt"))
    assert at_8["validation"] == {"metric": "mean_r1", "value": 9.0, "step": 8, "epoch": 1}
    for k, v in at_8["model"].items():
        assert torch.equal(best["model"][k], v), k
    export = torch.load(run_dir / "best" / "open_clip_model.pt")
    assert all(torch.equal(export[k], at_8["model"]["clip." + k]) for k in export)
    last = torch.load(run_dir / "open_clip_model.pt")
    assert any(not torch.equal(export[k], last[k]) for k in export)  # the last is beside it, different
    assert json.loads((run_dir / "best" / "results.json").read_text())["best"]["test_karpathy"]["rsum"] == 54.0
    rows = [r for r in read_metrics(run_dir) if "eval/mean_r1" in r]
    assert [r["eval/best_mean_r1"] for r in rows] == [5.0, 9.0, 9.0]
    assert summary["best"]["step"] == 8
    # lip-eval takes the best checkpoint (the trainer's layout, adapters included when there are any)
    from train.eval.evaluate import load_model

    model = load_model("lip-tiny", str(run_dir / "best" / "checkpoint.pt"))
    assert torch.equal(model.visual.proj, export["visual.proj"])


def test_resume_keeps_the_best_so_far(data, tmp_path, monkeypatch):
    """2 epochs (best 9 at step 8), resumed to 4 with worse evaluations: best/ stays step 8;
    resumed to 5 with a better one: best/ moves to step 20."""
    scripted(monkeypatch, [5.0, 9.0])
    run_main(argv(data, tmp_path, "resume", optim__epochs=2, eval__every_epochs=1, run__keep_best="rsum"))
    best_dir = tmp_path / "resume" / "best"
    before = (best_dir / "checkpoint.pt").read_bytes()
    scripted(monkeypatch, [3.0, 4.0])
    summary = run_main(argv(data, tmp_path, "resume", optim__epochs=4, eval__every_epochs=1, run__keep_best="rsum",
                            run__resume="latest"))
    assert summary["steps"] == 16 and summary["best"] == {"metric": "rsum", "value": 54.0, "step": 8, "epoch": 1}
    assert (best_dir / "checkpoint.pt").read_bytes() == before
    assert checkpoint.load(str(tmp_path / "resume" / "checkpoints" / "step_00000016.pt"))["validation"]["step"] == 8
    scripted(monkeypatch, [10.0])
    summary = run_main(argv(data, tmp_path, "resume", optim__epochs=5, eval__every_epochs=1, run__keep_best="rsum",
                            run__resume="latest"))
    assert summary["best"] == {"metric": "rsum", "value": 60.0, "step": 20, "epoch": 4}
    assert torch.load(best_dir / "checkpoint.pt", weights_only=False)["step"] == 20


def test_validating_does_not_change_training(data, tmp_path):
    run_main(argv(data, tmp_path, "plain", optim__epochs=2, data__flip="true"))
    run_main(argv(data, tmp_path, "validated", optim__epochs=2, data__flip="true", eval__every_steps=1,
                  run__keep_best="i2t_R@1"))
    a = torch.load(tmp_path / "plain" / "open_clip_model.pt")
    b = torch.load(tmp_path / "validated" / "open_clip_model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_gives_the_rng_states_back(data, tmp_path):
    """The evaluation's DataLoader draws its seed from torch's global generator: a validation in
    the loop would shift every later random draw. It leaves torch's, numpy's and Python's states
    as it found them, and records the curve row."""
    import random

    import numpy as np

    from train.distributed import DistEnv
    from train.model import build_model
    from train.records import RunRecorder

    cfg = load_config(None, argv(data, tmp_path, "rng", eval__every_epochs=1))
    v = validation.Validation(cfg, DistEnv(0, 1, 0, torch.device("cpu")), str(tmp_path / "rng"))
    model = build_model("lip-tiny")
    torch.manual_seed(3)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    v(4, 0, model, RunRecorder(str(tmp_path / "rng"), {}, False, 1))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
    assert v.evals_at(4)["test_karpathy"]["rsum"] >= 0 and v.evals_at(5) is None
    assert model.training  # the evaluation gives the train mode back too


@pytest.mark.parametrize("bad,key", [
    (["run.keep_best=R@1"], "run.keep_best"),
    (["run.keep_best=rsum"], "run.keep_best"),  # no every_*
    (["eval.every_epochs=-1"], "eval.every_epochs"),
    (["eval.every_steps=2", "eval.retrieval_json=null"], "eval.every_steps"),
])
def test_config_errors_name_the_key(bad, key):
    base = ["data.train_shards=x", "eval.retrieval_json=t.json"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config(None, base + bad)
    assert "\n" not in str(e.value)


def _dist_worker(rank: int, world: int, port: int, args: list[str], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from train.distributed import cleanup
    from train.trainer import train

    try:
        result = train(load_config(None, args))
    finally:
        cleanup()
    torch.save({"best": result.get("best"), "steps": result["steps"]}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.dist
@pytest.mark.slow  # two spawned ranks (fresh interpreters importing torch) training and evaluating: ~7 s
def test_two_ranks_validate_and_agree_on_the_best(data, tmp_path):
    """Rank 0 evaluates while rank 1 waits at the broadcast; both end with the same best."""
    from test_trainer import _free_port

    args = argv(data, tmp_path, "ddp", data__batch_size=8, optim__epochs=2, eval__every_steps=2,
                run__keep_best="mean_r1")
    mp.spawn(_dist_worker, args=(2, _free_port(), args, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["steps"] == 8 and ranks[0]["best"]["step"] in (2, 4, 6, 8)
    rows = [r for r in read_metrics(tmp_path / "ddp") if "eval/mean_r1" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert max(r["eval/mean_r1"] for r in rows) == ranks[0]["best"]["value"]
    assert (tmp_path / "ddp" / "best" / "checkpoint.pt").is_file()
