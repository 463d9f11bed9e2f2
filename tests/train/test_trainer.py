"""The trainer (train/) on the CPU, with `lip-tiny` (train/model_configs/lip-tiny.json: 64-pixel
images, 2-layer towers of width 64, context 32) on 200 synthetic images in four wds shards.

1. Smoke: `main()` in-process for every loss mode leaves config.yaml, metrics.jsonl, TensorBoard
   events, checkpoints, the open_clip export and (when asked) plots; `python -m train.plot`
   redraws; the logged lr is the rate each step used.
2. Resume: a run SIGKILLed mid-epoch (a `python -m train.main` subprocess) and continued with
   run.resume=latest — and one continued from the epoch-end checkpoint — end bitwise where a
   straight run does (model, optimizer, gate means, loader position, scheduler, RNG, metrics),
   across an epoch boundary, with DataLoader workers and with accumulation, and with DALI's CPU graph.
3. DDP: two spawned gloo ranks (DualPathCLIP under DDP, the trainer's losses) against one process
   on the concatenated batch — loss, all-reduced gradients, gate means; and the whole trainer on
   two ranks with accumulation.
4. Export: open_clip.create_model(..., pretrained=export) gives the trained model's embeddings.
5. Config errors: exit status 2, one stderr line naming the key.
6. Accumulation: the stepped gradient is the mean of the micro-batch gradients; a step never
   takes micro-batches from two epochs.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipelines.loader import LoaderConfig, build_loader
from conftest import build_synthetic_shards, overrides, run_main
from train import checkpoint
from train.config import TrainConfig, load_config
from train.distributed import DistEnv
from train.main import main
from train.model import EOT_TOKEN, build_model
from train.objectives import build_objective
from train.trainer import seed_everything

REPO = Path(__file__).resolve().parents[2]
MODEL = "lip-tiny"
MODES = ("clip-raw", "clip-both", "alip")
SOT_TOKEN = 49406
CPU = torch.device("cpu")


# --- data and helpers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """200 synthetic photos (64 px) with synthetic captions, tokenized, in four wds shards."""
    return str(build_synthetic_shards(tmp_path_factory.mktemp("trainer_data"), 200, "wds", 50) / "wds")


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_same(a, b, where: str = "") -> None:
    """Bitwise equality through nested dicts, lists, tuples, tensors and arrays."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def tokens(lengths: list[int], generator: torch.Generator, width: int = 77) -> torch.Tensor:
    """[B, 77] CLIP-style token rows: SOT, `n` random word ids, EOT, zero padding."""
    out = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0] = SOT_TOKEN
        out[i, 1:n + 1] = torch.randint(1, 49000, (n,), generator=generator)
        out[i, n + 1] = EOT_TOKEN
    return out


# --- 1. smoke: every loss mode end to end, in-process ---------------------------------------------

@pytest.fixture(scope="module")
def smoke_runs(shards, tmp_path_factory) -> dict[str, dict]:
    """One 3-step run per loss mode (checkpoints at 2 and 3); plots drawn by the alip run only."""
    out = tmp_path_factory.mktemp("smoke_runs")
    runs = {}
    for mode in MODES:
        summary = run_main(overrides(shards, out, mode, loss__mode=mode, run__ckpt_every=2,
                                     run__plots="true" if mode == "alip" else "false"))
        runs[mode] = {"dir": out / mode, "summary": summary}
    return runs


@pytest.mark.parametrize("mode", MODES)
def test_smoke_run_leaves_every_record(smoke_runs, mode):
    run_dir, summary = smoke_runs[mode]["dir"], smoke_runs[mode]["summary"]
    assert summary["run_dir"] == str(run_dir) and summary["steps"] == 3

    saved = load_config(str(run_dir / "config.yaml"))  # the saved config is a valid --config
    assert saved.loss.mode == mode and saved.model.name == MODEL and saved.optim.max_steps == 3

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    expected = {"loss", "lr", "logit_scale", "grad_norm", "epoch", "samples_per_s", "loss_raw"}
    expected |= {"loss_syn"} if mode != "clip-raw" else set()
    expected |= {f"gate/{k}" for k in ("h_tc", "h_xt", "h_xc")} if mode == "alip" else set()
    expected |= {f"gate/{w}_{s}" for w in ("w_sample", "w_raw", "w_syn")
                 for s in ("mean", "q10", "q50", "q90")} if mode == "alip" else set()
    for r in rows:
        assert expected <= set(r), f"missing {expected - set(r)}"
        assert all(math.isfinite(r[k]) for k in expected), r
        assert r["samples_per_s"] > 0
        assert 0 < r["logit_scale"] <= 100 + 1e-4  # exp(clamped log scale)
        if mode != "clip-raw":
            assert r["loss"] == pytest.approx(r["loss_raw"] + r["loss_syn"], rel=1e-5)
    if mode == "alip":  # running means start at 1.0 and move by 1 % of a cosine per step
        h = [r["gate/h_tc"] for r in rows]
        assert all(0.9 < v < 1.0 for v in h) and h == sorted(h, reverse=True)
    assert rows[-1]["loss"] == pytest.approx(summary["loss"])

    events = glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))
    assert len(events) == 1 and os.path.getsize(events[0]) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert {"loss", "lr", "logit_scale"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    if mode == "alip":
        assert "gate/w_sample" in acc.Tags()["histograms"]

    ckpts = checkpoint.list_checkpoints(str(run_dir / "checkpoints"))
    assert [os.path.basename(p) for p in ckpts] == ["step_00000002.pt", "step_00000003.pt"]
    state = checkpoint.load(ckpts[-1])
    assert {"model", "optimizer", "scheduler", "scaler", "loss", "loader", "rng", "step", "epoch",
            "config"} <= set(state)
    assert state["step"] == 3 and state["loader"]["batches_yielded"] == 3 and state["epoch"] == 0
    gates = {"gates.h_tc", "gates.h_xt", "gates.h_xc"}
    assert set(state["loss"]) == (gates if mode == "alip" else set())
    if mode == "alip":
        assert state["loss"]["gates.h_tc"].item() == pytest.approx(rows[-1]["gate/h_tc"])
    assert (run_dir / "open_clip_model.pt").is_file()

    pngs = {p.name for p in (run_dir / "plots").glob("*.png")} if (run_dir / "plots").is_dir() else set()
    if mode == "alip":
        assert {"loss.png", "lr.png", "logit_scale.png", "gate_means.png", "gate_weights.png"} <= pngs
    else:
        assert pngs == set()  # run.plots=false


def test_logged_lr_is_the_rate_each_step_used(smoke_runs):
    """Linear warm-up over 2 steps, then cosine to 0 over the remaining 1: the three steps ran at
    lr·1/2, lr·2/2 and lr·cos-factor(0) = lr; `lr` at step k is the rate step k used (open_clip's
    convention), not the rate the scheduler set for step k+1."""
    lr = TrainConfig().optim.lr
    for mode in MODES:
        assert [r["lr"] for r in read_metrics(smoke_runs[mode]["dir"])] == pytest.approx([lr / 2, lr, lr])


def test_plot_command_redraws(smoke_runs):
    run_dir = smoke_runs["clip-both"]["dir"]
    proc = subprocess.run([sys.executable, "-m", "train.plot", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pngs = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert {"loss.png", "lr.png", "logit_scale.png"} <= pngs and "gate_means.png" not in pngs
    assert all((run_dir / "plots" / p).stat().st_size > 1000 for p in pngs)


# --- 4. export: open_clip loads the weights and gives the trained model's embeddings --------------

@pytest.mark.parametrize("mode", ["clip-raw", "alip"])
def test_export_loads_in_open_clip_with_the_same_embeddings(smoke_runs, mode):
    run_dir = smoke_runs[mode]["dir"]
    trained = build_model(MODEL)
    trained.load_state_dict(checkpoint.load(str(run_dir / "checkpoints" / "step_00000003.pt"))["model"])
    trained.eval()
    exported = open_clip.create_model(MODEL, pretrained=str(run_dir / "open_clip_model.pt")).eval()
    assert_same(exported.state_dict(), trained.clip.state_dict(), "state_dict")
    seed_everything(0)  # the export holds the trained weights, not the initial ones
    assert not torch.equal(build_model(MODEL).clip.visual.proj, exported.visual.proj)

    g = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 64, 64, generator=g)
    captions = ["a photo of a dog", "two red apples on a wooden table",
                " ".join(["a very long caption that runs past the context"] * 6), ""]
    tok = open_clip.get_tokenizer(MODEL)
    assert tok.context_length == 32
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_image(images), trained.clip.encode_image(images),
                                   rtol=0, atol=0)
        short = tok(captions)
        torch.testing.assert_close(exported.encode_text(short), trained.clip.encode_text(short),
                                   rtol=0, atol=0)
        # The trainer's path: [B, 77] tokens from the shards, cropped to the tower's context.
        image, raw, syn, scale = trained(images, open_clip.tokenize(captions), None)
        torch.testing.assert_close(image, F.normalize(exported.encode_image(images), dim=-1))
        torch.testing.assert_close(raw, F.normalize(exported.encode_text(short), dim=-1))
        assert syn is None and scale.item() == pytest.approx(exported.logit_scale.exp().item())


# --- 5. config errors: exit status 2 and one line naming the key ---------------------------------

@pytest.mark.parametrize("bad,key", [
    (["optim.lrr=1"], "optim.lrr"),
    (["loss.mode=foo"], "loss.mode"),
    (["optim.lr=abc"], "optim.lr"),
    (["data.batch_size=1.5"], "data.batch_size"),
    (["optim.betas=0.9"], "optim.betas"),
    (["runn.name=x"], "runn"),
    (["optim.lr"], "optim.lr"),
    (["optim.betas=[0.9"], "optim.betas"),  # not YAML
    ([], "data.train_shards"),
])
def test_config_error_is_one_line_naming_the_key(bad, key, capsys, tmp_path):
    argv = bad + ([f"data.train_shards={tmp_path}"] if key != "data.train_shards" else []) \
        + [f"run.out_dir={tmp_path / 'runs'}"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and lines[0].startswith("lip-train: config error:"), err
    assert not (tmp_path / "runs").exists()


def test_string_overrides_keep_their_text():
    """A string field takes the override's text as written, even where YAML would read a number,
    a date or nothing (run names like 001 or 2024-06-01; an empty caption prefix); null still
    clears an optional one, and other fields keep YAML's typing."""
    cfg = load_config(None, ["data.train_shards=2024", "run.name=001", "eval.caption_prefix=",
                             "run.resume=2024-06-01", "model.pretrained=null", "optim.lr=1e-3",
                             "optim.max_steps=7", "run.plots=false"])
    assert (cfg.data.train_shards, cfg.run.name, cfg.eval.caption_prefix) == ("2024", "001", "")
    assert cfg.run.resume == "2024-06-01" and cfg.model.pretrained is None
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.run.plots) == (1e-3, 7, False)


def test_config_file_errors_are_one_line_too(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("loss:\n  mode: alip\n  momentun: 0.9\n")
    assert main(["--config", str(cfg), f"data.train_shards={tmp_path}"]) == 2
    assert main(["--config", str(tmp_path / "missing.yaml"), f"data.train_shards={tmp_path}"]) == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss:\n  mode: [alip\n")
    assert main(["--config", str(broken), f"data.train_shards={tmp_path}"]) == 2
    listed = tmp_path / "listed.yaml"
    listed.write_text("- loss\n- model\n")
    assert main(["--config", str(listed), f"data.train_shards={tmp_path}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4, lines
    assert "loss.momentun" in lines[0] and "missing.yaml" in lines[1] and "broken.yaml" in lines[2]
    assert "listed.yaml" in lines[3] and all(line.startswith("lip-train: config error:") for line in lines)


def test_every_shipped_config_loads_and_every_launcher_names_one():
    root = Path(__file__).resolve().parents[2] / "configs"
    configs = sorted(root.glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        load_config(str(path))
    for script in root.glob("*.sh"):
        for name in re.findall(r"configs/([\w.-]+\.yaml)", script.read_text()):
            assert (root / name).is_file(), f"{script.name} names a missing {name}"


# --- 6. gradient accumulation divides the loss -----------------------------------------------------

@pytest.mark.parametrize("mode", ["clip-raw", "alip"])
def test_accumulation_averages_micro_batch_gradients(shards, tmp_path, monkeypatch, mode):
    """accum_steps=2 × batch 8: the gradient the optimizer steps on (caught where the trainer clips
    it) is the mean of the two micro-batches' gradients, each computed alone at the initial
    weights. (It is not the batch-16 gradient: a contrastive loss does not split over
    micro-batches, so that is not the thing to compare with.)"""
    caught = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        caught.append([p.grad.detach().clone() for p in params])
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    argv = overrides(shards, tmp_path, "accum", loss__mode=mode, data__batch_size=8,
                     optim__accum_steps=2, optim__max_steps=1)
    run_main(argv)
    assert len(caught) == 1  # one optimizer step
    state = checkpoint.load(str(tmp_path / "accum" / "checkpoints" / "step_00000001.pt"))
    assert state["loader"]["batches_yielded"] == 2

    cfg = load_config(None, argv)
    seed_everything(cfg.run.seed)  # as train() does before building the model
    model = build_model(MODEL).train()
    objective = build_objective(cfg, DistEnv(0, 1, 0, CPU))
    loader = build_loader(LoaderConfig(shards=shards, format="wds", backend="torch", device="cpu",
                                       batch_size=8, image_size=64, seed=cfg.run.seed, workers=0))
    grads = []
    for micro, batch in zip(range(2), loader):
        model.zero_grad(set_to_none=True)
        image, raw, syn, scale = model(batch.images, batch.raw_tokens,
                                       None if mode == "clip-raw" else batch.syn_tokens)
        loss, _ = objective.loss(image, raw, syn, scale, batch.has_syn)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(grads) == 2
    names = [n for n, _ in model.named_parameters()]
    assert len(caught[0]) == len(names)
    for name, got, g1, g2 in zip(names, caught[0], *grads):
        torch.testing.assert_close(got, (g1 + g2) / 2, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")
    assert_same(state["loss"], objective.loss_fn.state_dict(), "gates")  # gates moved once per micro-batch


def test_accumulation_never_spans_an_epoch_boundary(shards, tmp_path):
    """200 samples in batches of 64: 3 batches an epoch, one step of 2; the third batch would
    start an accumulation the epoch cannot finish, so it is never drawn and each step's two
    micro-batches come from one epoch."""
    from pipelines.loader import Loader
    from train.trainer import train

    class Recording(Loader):
        seen: list = []

        def __iter__(self):
            for batch in super().__iter__():
                self.seen.append((self.epoch, self.batches_yielded))
                yield batch

    cfg = load_config(None, overrides(shards, tmp_path, "epochs", data__batch_size=64, optim__accum_steps=2,
                                      optim__epochs=2, optim__max_steps="null", loss__mode="clip-raw"))
    loader = Recording(LoaderConfig(shards=shards, format="wds", backend="torch", device="cpu", batch_size=64,
                                    image_size=64, seed=cfg.run.seed, workers=0))
    assert len(loader) == 3
    result = train(cfg, loader=loader)
    assert result["steps"] == 2
    assert Recording.seen == [(0, 1), (0, 2), (1, 1), (1, 2)]
    ckpts = checkpoint.list_checkpoints(str(tmp_path / "epochs" / "checkpoints"))
    here = loader.state_dict()  # the epoch-end step's checkpoint, then the last one
    assert [checkpoint.load(p)["loader"] for p in ckpts] == [dict(here, epoch=0, batches_yielded=2),
                                                             dict(here, epoch=1, batches_yielded=2)]


# --- 2. resume: a SIGKILLed run continued with run.resume=latest ends bitwise where a straight run does

def start_trainer(argv: list[str], log: Path) -> subprocess.Popen:
    # Two trainers run at once: with an OpenMP pool of one thread per core each, their pools spin
    # against each other (two concurrent 14-step runs: 20-28 s, against 7 s with one thread each).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "train.main", *argv], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert rc == 0, log.read_text()[-3000:]


RESUME_VARIANTS = {
    # 200 samples: 12 batches of 16 per epoch; 14 steps cross into epoch 1 at step 12.
    "batch16-workers2": dict(data__batch_size=16, data__workers=2),
    # 25 batches of 8 per epoch, 12 steps of 2: batch 25 is never begun (the remainder path).
    "batch8-accum2": dict(data__batch_size=8, optim__accum_steps=2),
    # DALI's CPU graph: the resumed pipeline crops and flips what the straight run's did (issue 26).
    "dali-batch8-accum2-workers2": dict(data__backend="dali", data__device="cpu", data__batch_size=8,
                                        optim__accum_steps=2, data__workers=2),
}


@pytest.mark.slow  # four trainer processes, each ~4 s of imports: ~13 s per variant
@pytest.mark.parametrize("variant", RESUME_VARIANTS)
def test_resume_after_sigkill_is_exact(shards, tmp_path, variant):
    total, every = 14, 4
    common = dict(loss__mode="alip", optim__epochs=2, optim__max_steps=total, run__ckpt_every=every,
                  run__keep_checkpoints=3, **RESUME_VARIANTS[variant])
    straight_argv = overrides(shards, tmp_path, "straight", **common)
    killed_argv = overrides(shards, tmp_path, "killed", **common)
    straight = start_trainer(straight_argv, tmp_path / "straight.log")
    killed = start_trainer(killed_argv, tmp_path / "killed.log")
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        while not (ckpt_dir / f"step_{every:08d}.pt").exists():
            assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the trainer and its DataLoader workers
        killed.wait()
    assert killed.returncode == -signal.SIGKILL
    latest = checkpoint.list_checkpoints(str(ckpt_dir))[-1]
    killed_at = checkpoint.load(latest)["step"]
    assert killed_at in (4, 8), f"the kill should land mid-run, before the epoch boundary: {latest}"
    assert not (tmp_path / "killed" / "open_clip_model.pt").exists()

    resumed = start_trainer(killed_argv + ["run.resume=latest"], tmp_path / "resumed.log")
    finish(straight, tmp_path / "straight.log")
    # Also from the straight run's epoch-end checkpoint (step 12: the loader sits at the end of
    # epoch 0, or one batch short of it with accumulation) into a fresh run folder.
    epoch_end = tmp_path / "straight" / "checkpoints" / "step_00000012.pt"
    assert checkpoint.load(str(epoch_end))["loader"]["epoch"] == 0
    from_end_argv = overrides(shards, tmp_path, "from_epoch_end", **common) + [f"run.resume={epoch_end}"]
    from_end = start_trainer(from_end_argv, tmp_path / "from_epoch_end.log")
    finish(resumed, tmp_path / "resumed.log")
    finish(from_end, tmp_path / "from_epoch_end.log")

    final = f"step_{total:08d}.pt"
    a = checkpoint.load(str(tmp_path / "straight" / "checkpoints" / final))
    assert a["step"] == total and a["epoch"] == 1
    assert a["loader"]["epoch"] == 1 and a["loader"]["batches_yielded"] == \
        (total - 12) * (2 if "accum" in variant else 1)
    assert set(a["loss"]) == {"gates.h_tc", "gates.h_xt", "gates.h_xc"}
    for run in ("killed", "from_epoch_end"):
        b = checkpoint.load(str(tmp_path / run / "checkpoints" / final))
        assert b["step"] == total and b["epoch"] == 1
        assert_same(a["model"], b["model"], f"{run}: model")
        assert_same(a["optimizer"], b["optimizer"], f"{run}: optimizer")
        assert_same(a["loss"], b["loss"], f"{run}: gate means")
        assert_same(a["loader"], b["loader"], f"{run}: loader")
        assert_same(a["scheduler"], b["scheduler"], f"{run}: scheduler")
        assert_same(a["rng"], b["rng"], f"{run}: rng")
        assert_same(torch.load(tmp_path / "straight" / "open_clip_model.pt"),
                    torch.load(tmp_path / run / "open_clip_model.pt"), f"{run}: export")

    # Metrics: the killed run logged steps 1..k (and maybe a few more before the kill), the resumed
    # run k+1..total; every logged value equals the straight run's at that step.
    ref = {r["step"]: r for r in read_metrics(tmp_path / "straight")}
    got = read_metrics(tmp_path / "killed")
    assert sorted(ref) == list(range(1, total + 1))
    assert {r["step"] for r in got} == set(ref)
    assert [r["step"] for r in got[killed_at - total:]] == list(range(killed_at + 1, total + 1))
    from_end_rows = read_metrics(tmp_path / "from_epoch_end")
    assert [r["step"] for r in from_end_rows] == list(range(13, total + 1))
    skip = {"time", "samples_per_s"}
    for r in got + from_end_rows:
        assert {k: v for k, v in r.items() if k not in skip} == \
            {k: v for k, v in ref[r["step"]].items() if k not in skip}, f"step {r['step']}"


# --- 3. two-process gloo DDP against one process on the concatenated batch ------------------------
#
# Gradient factor. Let L be the loss of the global batch (8 samples) and f_r rank r's features.
# - gather_with_grad=True: every rank computes L itself (from all-gathered features); the
#   all_gather backward sums over ranks the gradient each rank's L sends to slot r, so rank r
#   receives W·∂L/∂f_r and its parameter gradient is W·∂L/∂f_r·∂f_r/∂θ. DDP averages over
#   the W ranks: (1/W)·Σ_r W·∂L/∂f_r·∂f_r/∂θ = ∂L/∂θ, the single-process gradient. With local_loss
#   rank r's loss is the mean over its own rows, L = (1/W)·Σ_r L_r, and the same sum gives ∂L/∂θ.
# - gather_with_grad=False (the default, open_clip's): the other ranks' slots are constants, rank
#   r receives only ∂L/∂f_r, and the DDP average is (1/W)·∂L/∂θ for the towers — a learning-rate
#   scale of 1/W (harmless under Adam, up to eps and clipping) — while logit_scale, which is not
#   gathered, gets the full ∂L/∂s on every rank and so the full gradient.
# The gates see the gathered features, so the running means match the single process's too.

WORLD = 2
GLOBAL_BATCH = 8
DDP_CASES = [  # (mode, local_loss, gather_with_grad)
    ("clip-raw", False, True), ("clip-both", False, True), ("alip", False, True),
    ("clip-raw", True, True), ("clip-raw", False, False), ("alip", False, False)]


def ddp_batch():
    g = torch.Generator().manual_seed(7)
    images = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=g)
    raw = tokens([3, 12, 40, 5, 8, 20, 2, 33], g)  # 40 and 33 words: cut at the 32-token context
    syn = tokens([6, 4, 9, 15, 3, 7, 11, 5], g)
    has_syn = torch.tensor([True, True, False, True, True, False, True, True])
    return images, raw, syn, has_syn


def ddp_step(mode: str, local_loss: bool, gather_with_grad: bool, env: DistEnv) -> dict:
    """One forward and backward as train() builds them: seeded model (DDP-wrapped when
    distributed), trainer's loss, this rank's slice of the global batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = TrainConfig()
    cfg.loss.mode, cfg.loss.local_loss, cfg.loss.gather_with_grad = mode, local_loss, gather_with_grad
    seed_everything(0)
    model = build_model(MODEL).train()
    wrapped = DDP(model) if env.world_size > 1 else model
    objective = build_objective(cfg, env)
    per = GLOBAL_BATCH // env.world_size
    rows = slice(env.rank * per, (env.rank + 1) * per)
    images, raw, syn, has_syn = (t[rows] for t in ddp_batch())
    image, raw_f, syn_f, scale = wrapped(images, raw, None if mode == "clip-raw" else syn)
    loss, _ = objective.loss(image, raw_f, syn_f, scale, has_syn)
    loss.backward()
    return {"loss": loss.detach(), "gates": objective.loss_fn.state_dict(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from train.distributed import cleanup, init_distributed

    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.device) == (rank, world, CPU)
    try:
        out = {case: ddp_step(*case, env) for case in DDP_CASES}
    finally:
        cleanup()
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    before = set(threading.enumerate())
    mp.spawn(_ddp_worker, args=(WORLD, _free_port(), str(out_dir)), nprocs=WORLD, join=True)
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads leaked by the spawned group: {leaked}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.dist
@pytest.mark.slow  # the module's ddp_results: two spawned ranks, fresh interpreters importing torch: ~6 s
@pytest.mark.parametrize("case", DDP_CASES, ids=lambda c: f"{c[0]}-local{int(c[1])}-gather{int(c[2])}")
def test_ddp_two_ranks_match_one_process(ddp_results, case):
    mode, local_loss, gather_with_grad = case
    single = ddp_step(*case, DistEnv(0, 1, 0, CPU))
    tol = dict(rtol=1e-5, atol=1e-5)
    losses = torch.stack([res[case]["loss"] for res in ddp_results])
    if local_loss:  # each rank's loss is the mean over its rows: their mean is the global loss
        torch.testing.assert_close(losses.mean(), single["loss"], **tol)
    else:
        for loss in losses:
            torch.testing.assert_close(loss, single["loss"], **tol)
    assert set(single["grads"]) == set(ddp_results[0][case]["grads"])
    assert len(single["grads"]) == len(list(build_model(MODEL).parameters()))  # every parameter used
    for name, ref in single["grads"].items():
        # DDP's all-reduce leaves the same averaged gradient on both ranks.
        torch.testing.assert_close(ddp_results[0][case]["grads"][name], ddp_results[1][case]["grads"][name],
                                   rtol=0, atol=0)
        factor = 1.0 if gather_with_grad or name.endswith("logit_scale") else 1 / WORLD
        torch.testing.assert_close(ddp_results[0][case]["grads"][name], factor * ref, **tol,
                                   msg=lambda m: f"{name}: {m}")
        assert ref.abs().max() > 0, name
    for res in ddp_results:
        assert set(res[case]["gates"]) == set(single["gates"])
        for k, v in single["gates"].items():
            torch.testing.assert_close(res[case]["gates"][k], v, rtol=0, atol=1e-9)


def _train_worker(rank: int, world: int, port: int, argv: list[str], out_dir: str) -> None:
    """`main(argv)` as a torchrun-launched rank would run it; the model it trained comes back."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import train.trainer

    built = []
    train.trainer.build_model = lambda *a, **k: built.append(build_model(*a, **k)) or built[-1]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        rc = main(argv)
    torch.save({"rc": rc, "stdout": stdout.getvalue(), "model": built[0].state_dict()},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.dist
@pytest.mark.slow  # two spawned ranks (fresh interpreters importing torch) training: ~6 s
def test_two_rank_training_run(shards, tmp_path):
    """The whole trainer under two gloo ranks, with accumulation (DDP's no_sync on the first
    micro-batch): both ranks end with the same weights, only rank 0 writes the run folder."""
    argv = overrides(shards, tmp_path, "ddp", data__batch_size=8, optim__accum_steps=2, optim__max_steps=2,
                     loss__mode="alip", loss__gather_with_grad="true", run__ckpt_every=1)
    mp.spawn(_train_worker, args=(WORLD, _free_port(), argv, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["rc"] for r in ranks] == [0, 0]
    assert json.loads(ranks[0]["stdout"])["steps"] == 2 and ranks[1]["stdout"] == ""
    assert_same(ranks[0]["model"], ranks[1]["model"], "rank 1 vs rank 0")
    state = checkpoint.load(str(tmp_path / "ddp" / "checkpoints" / "step_00000002.pt"))
    assert_same(state["model"], ranks[0]["model"], "checkpoint")
    assert state["loader"]["world_size"] == 2 and state["loader"]["batches_yielded"] == 4
    seed_everything(0)  # it trained: not the initial weights
    assert not torch.equal(build_model(MODEL).clip.visual.proj, state["model"]["clip.visual.proj"])
    assert [r["step"] for r in read_metrics(tmp_path / "ddp")] == [1, 2]
    assert sorted(os.listdir(tmp_path / "ddp")) == ["checkpoints", "config.yaml", "metrics.jsonl",
                                                    "open_clip_model.pt", "sample_weights.pt", "tensorboard"]
    # the gates' per-sample record holds both ranks' samples: 2 ranks x 4 micro-batches x 8
    weights = torch.load(tmp_path / "ddp" / "sample_weights.pt")
    assert int((weights["step"] >= 0).sum()) == 64 and set(weights["step"].unique().tolist()) == {-1, 1, 2}



@pytest.mark.dist
@pytest.mark.slow  # spawned ranks training on two, then resuming on one: ~7 s
def test_resume_at_another_world_size(shards, tmp_path):
    """`run.resume=latest` after a change of nproc_per_node (elastic): two ranks train 2 steps of
    2 × 8 samples, one process continues the same epoch from the 32 samples both ranks used."""
    argv = overrides(shards, tmp_path, "elastic", data__batch_size=8, optim__max_steps=2, run__ckpt_every=1,
                     loss__mode="clip-raw")
    mp.spawn(_train_worker, args=(WORLD, _free_port(), argv, str(tmp_path)), nprocs=WORLD, join=True)
    saved = checkpoint.load(str(tmp_path / "elastic" / "checkpoints" / "step_00000002.pt"))["loader"]
    assert (saved["world_size"], saved["batches_yielded"], saved["offset"]) == (2, 2, 0)
    result = run_main(argv + ["optim.max_steps=4", "run.resume=latest"])
    assert result["steps"] == 4
    state = checkpoint.load(str(tmp_path / "elastic" / "checkpoints" / "step_00000004.pt"))["loader"]
    # At world size 1 the epoch goes on after the 2 × 2 × 8 samples both ranks had used.
    assert (state["world_size"], state["epoch"], state["offset"], state["batches_yielded"]) == (1, 0, 32, 2)
