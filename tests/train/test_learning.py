"""The trainer learns, not only runs: a tiny CPU run on the synthetic set (clean raw texts, so
both paths carry signal) must bring the contrastive loss clearly below ln(batch size), where an
untrained model sits, and retrieve held-out images far above chance. Catches "trains but learns
nothing" regressions (a lost backward, a frozen tower, a broken loader pairing) that smoke tests
pass. Also: the gates' per-sample weights are recorded during training (sample_weights.pt) and
the training-time AUC reads them."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tools.convert import make_shards
from tools.demo import make_synthetic
from train.config import load_config
from train.eval.noise_eval import training_auc
from train.trainer import train

BATCH, STEPS, N_TRAIN, N_TEST = 32, 150, 320, 100


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("learning")
    raw = root / "raw"
    assert make_synthetic.main(["--out", str(raw), "--train", str(N_TRAIN), "--test", str(N_TEST), "--size", "64",
                                "--max-side-ratio", "1", "--workers", "1", "--swap-fraction", "0.3",
                                "--truncate-fraction", "0", "--offtopic-fraction", "0", "--hashtag-fraction", "0",
                                "--mojibake-fraction", "0"]) == 0
    out = root / "shards"
    assert make_shards.main(["--source", "table", "--input", str(raw / "train.jsonl"), "--image-column", "image",
                             "--caption-column", "caption", "--synthetic-captions", str(raw / "train_syn.jsonl"),
                             "--tokenize", "--format", "wds", "--samples-per-shard", "160", "--out", str(out),
                             "--workers", "1", "--quiet"]) == 0
    return raw, out / "wds"


@pytest.mark.slow  # 150 steps of a 64-token model: ~15 s; at 100 it misses the retrieval bar (rsum 158 < 160)
def test_tiny_run_learns(data, tmp_path):
    raw, shards = data
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"), [
        f"data.train_shards={shards}", f"data.batch_size={BATCH}", "data.workers=0", "data.backend=torch",
        "loss.mode=alip",
        "model.name=lip-demo-p8",  # 64 tokens: at this tiny budget the demo's 16-token model is near chance
        f"optim.max_steps={STEPS}", f"optim.warmup_steps={STEPS // 10}", "optim.epochs=1000",
        f"run.out_dir={tmp_path}", "run.name=learn", "run.plots=false", "run.log_every=10",
        f"run.ckpt_every={10 * STEPS}", f"eval.retrieval_json={raw / 'test_karpathy.json'}", f"eval.images_root={raw}"])
    result = train(cfg)

    chance_loss = math.log(BATCH)  # per path, for features that tell nothing apart
    assert result["final"]["loss_syn"] < 0.6 * chance_loss, result["final"]
    evals = result["eval"]["test_karpathy"]
    mean_r1 = (evals["i2t_R@1"] + evals["t2i_R@1"]) / 2
    assert mean_r1 > 5 * 100 / N_TEST, evals  # chance: 1 %
    assert evals["rsum"] > 5 * 2 * (1 + 5 + 10) * 100 / N_TEST, evals

    weights = torch.load(Path(result["run_dir"]) / "sample_weights.pt")
    seen = weights["step"] >= 0
    assert seen.sum() >= N_TRAIN - BATCH and weights["step"].max() == STEPS  # every sample, up to the end
    assert torch.all((weights["w_sample"][seen] > 0) & (weights["w_sample"][seen] <= 1))
    aucs = training_auc(str(Path(result["run_dir"]) / "sample_weights.pt"), str(shards), "wds")
    assert 0.0 <= aucs["auc_train_w_sample"] <= 1.0 and aucs["n_train_final_epoch"] >= N_TRAIN - BATCH
    assert 0.0 <= aucs["auc_train_gate_margin"] <= 1.0 and 0.0 <= aucs["passed_swap"] <= 1.0
    # the clip ties, the margin does not: W_s = min(1, exp(γ·margin)) per sample
    assert torch.allclose(weights["w_sample"][seen], torch.exp(2.0 * weights["gate_margin"][seen]).clamp(max=1.0))


class _Batch:
    def __init__(self, keys, ids=None):
        self.keys, self.ids = keys, ids

    def __len__(self):
        return len(self.keys)


class _ShardSet:
    def __init__(self, keys):
        self.keys = keys

    def __len__(self):
        return len(self.keys)

    def key(self, gid):
        return self.keys[gid]


def test_sample_weights_record_by_id_or_key_and_keep_the_last():
    from train.sample_weights import SampleWeights, final_epoch

    log = SampleWeights(5, torch.device("cpu"), steps_per_epoch=2, shardset=_ShardSet(list("abcde")))
    # rank 1 of 2: its rows are the second half of the global-batch weights
    info = {"w_sample": torch.tensor([9.0, 9.0, 0.5, 1.0]), "w_raw": torch.tensor([9.0, 9.0, 0.5, 2.0]),
            "s_tc": torch.tensor([9.0, 9.0, 0.25, 0.75]), "h_tc": torch.tensor(0.5, dtype=torch.float64),
            "syn_mask": torch.tensor([True, True, True, False])}
    log.record(1, _Batch(["c", "a"], torch.tensor([2, 0])), info, rank=1)
    info = {"w_sample": torch.tensor([0.25, 0.75]), "w_raw": torch.tensor([1.0, 1.0]),
            "s_tc": torch.tensor([0.0, 0.375]), "h_tc": torch.tensor(0.5, dtype=torch.float64),
            "syn_mask": torch.tensor([True, True])}
    log.record(3, _Batch(["a", "e"]), info)  # no ids: looked up by key
    state = log.merged()
    assert state["step"].tolist() == [3, -1, 1, -1, 3]
    assert state["w_sample"].tolist()[::2] == [0.25, 0.5, 0.75]
    assert state["w_pair"].tolist()[::2] == [0.25, 0.25, 0.75]
    assert state["gate_margin"].tolist()[::2] == [-0.5, -0.25, -0.125]
    assert torch.isnan(state["w_sample"][[1, 3]]).all() and torch.isnan(state["gate_margin"][[1, 3]]).all()
    # a sample without a synthetic caption is never gated: margin +inf
    log.record(4, _Batch(["b"], torch.tensor([1])), {**info, "syn_mask": torch.tensor([False, True])})
    assert log.merged()["gate_margin"][1] == float("inf")
    assert final_epoch(state).tolist() == [True, False, False, False, True]  # steps 2..3
