"""torch's CPU threads of a lip-train run (`run.threads`, train/cpu_threads.py): on a CPU the cores the
loader's decoding leaves, at least half, at most torch's own default; OMP_NUM_THREADS, a given
`run.threads` and a GPU leave it alone; `train()` holds the choice for its duration only, and
lip-train logs it and records it in config.yaml."""
from __future__ import annotations

import os

import pytest
import torch
import yaml

from conftest import build_synthetic_shards, overrides, run_main
from pipelines.loader import LoaderConfig, decode_threads
from train import cpu_threads, trainer
from train.config import ConfigError, load_config


@pytest.fixture
def machine(monkeypatch):
    """A machine of `cores` cores on which torch would start `default` threads."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_up(cores: int, default: int | None = None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(torch, "get_num_threads", lambda: cores if default is None else default)
    return set_up


def config(**data):
    return load_config(None, ["data.train_shards=x", "data.device=cpu", *(f"data.{k}={v}" for k, v in data.items())])


@pytest.mark.parametrize("cores, workers, default, expected", [
    (2, 2, None, 1),   # the project's VM: the two workers take a core, torch keeps one
    (2, 0, None, 2),   # workers=0: the calling thread decodes, torch keeps every core
    (16, 2, None, 14),
    (16, 12, None, 8),  # never fewer than half the cores
    (16, 2, 8, 8),     # never more than torch's own default (e.g. physical cores under SMT)
    (1, 4, None, 1),
])
def test_the_cores_the_decoders_leave(machine, cores, workers, default, expected):
    machine(cores, default)
    cfg, note = cpu_threads.resolve_threads(config(backend="torch", workers=workers))
    assert cfg.run.threads == expected
    assert note == f"run.threads=0 -> {expected} (torch's CPU threads: {cores} cores, the loader (torch) decodes in {workers})"


def test_dalis_cpu_graph_counts_its_thread_pool(machine):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from pipelines.backends.dali import decode_threads as dali_threads

    machine(8)
    loader = LoaderConfig(shards="x", backend="dali", device="cpu", workers=2)
    assert decode_threads(loader) == dali_threads(loader) == 3  # in-process: the workers' threads + 1
    assert cpu_threads.resolve_threads(config(backend="dali", workers=2))[0].run.threads == 5
    assert decode_threads(LoaderConfig(shards="x", backend="dali", device="gpu", workers=2)) == 0  # nvJPEG decodes


def test_ranks_of_a_node_share_its_cores(machine, monkeypatch):
    machine(8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads.resolve_threads(config(backend="torch", workers=2))[0].run.threads == 2


@pytest.mark.parametrize("case", ["omp", "given", "gpu"])
def test_left_alone(machine, monkeypatch, case):
    machine(2)
    cfg = config(backend="torch", workers=2)
    if case == "omp":
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torchrun's 1 for several ranks a node, or the user's
    elif case == "given":
        cfg = load_config(None, ["data.train_shards=x", "data.device=cpu", "data.backend=torch", "run.threads=3"])
    else:
        cfg = load_config(None, ["data.train_shards=x", "data.device=gpu", "data.backend=torch"])
    resolved, note = cpu_threads.resolve_threads(cfg)
    assert note is None and resolved.run.threads == cfg.run.threads


def test_negative_threads_are_a_config_error():
    with pytest.raises(ConfigError, match="run.threads: must be ≥ 0"):
        load_config(None, ["data.train_shards=x", "run.threads=-1"]).validate()


def test_train_holds_its_threads_then_restores_the_callers(monkeypatch):
    before = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(trainer, "_train", lambda cfg, loader, note: seen.append(torch.get_num_threads()))
    trainer.train(load_config(None, ["data.train_shards=x", "run.threads=1"]))
    trainer.train(load_config(None, ["data.train_shards=x"]))  # 0: the caller's, untouched
    assert seen == [1, before] and torch.get_num_threads() == before
    monkeypatch.setattr(trainer, "_train", lambda cfg, loader, note: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer.train(load_config(None, ["data.train_shards=x", "run.threads=1"]))
    assert torch.get_num_threads() == before


def test_lip_train_logs_and_records_its_pick(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    shards = str(build_synthetic_shards(tmp_path, 16, "wds", 16) / "wds")
    before = torch.get_num_threads()
    summary = run_main(overrides(shards, tmp_path, "threads", optim__max_steps=1))
    picked = min(before, len(os.sched_getaffinity(0)))  # the torch backend, workers=0: every core
    assert f"threads: run.threads=0 -> {picked} (torch's CPU threads:" in capsys.readouterr().err
    with open(f"{summary['run_dir']}/config.yaml") as f:
        text = f.read()
    assert yaml.safe_load(text)["run"]["threads"] == picked  # the resolved value, and why as a comment
    assert f"# run.threads=0 -> {picked} (torch's CPU threads:" in text
    assert torch.get_num_threads() == before
