"""`data.backend=auto`, lip-train's default, picks DALI on GPU, DALI's CPU graph without CUDA, torch
without DALI, and says so in one line (and in the run's config.yaml); explicit backends stay as set."""
from __future__ import annotations

import sys

import pytest
import torch
import yaml

from conftest import build_synthetic_shards, overrides, run_main
from pipelines.loader_settings import backend_line, resolve_backend
from train.config import TrainConfig, load_config


@pytest.fixture
def no_dali(monkeypatch):
    """`import nvidia.dali` fails, as where DALI is not installed."""
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)


@pytest.fixture
def dali(monkeypatch):
    """`import nvidia.dali` succeeds (a stand-in module: nothing of DALI runs here, nor need it be installed)."""
    monkeypatch.setitem(sys.modules, "nvidia", sys.modules.get("nvidia") or type(sys)("nvidia"))
    monkeypatch.setitem(sys.modules, "nvidia.dali", type(sys)("nvidia.dali"))


def cuda(monkeypatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


def test_auto_is_the_default():
    assert TrainConfig().data.backend == "auto"
    assert load_config(None, ["data.train_shards=x"]).data.backend == "auto"


@pytest.mark.parametrize("has_cuda", [False, True])
def test_auto_without_dali_is_torch(no_dali, monkeypatch, has_cuda):
    cuda(monkeypatch, has_cuda)
    backend, why = resolve_backend("auto")
    assert backend == "torch" and "nvidia.dali not importable" in why


def test_auto_with_dali_and_no_cuda_is_dalis_cpu_graph(dali, monkeypatch):
    cuda(monkeypatch, False)
    assert resolve_backend("auto") == ("dali", "cpu graph: no CUDA device")


def test_auto_with_dali_and_cuda_is_dalis_gpu_graph(dali, monkeypatch):
    cuda(monkeypatch, True)
    assert resolve_backend("auto") == ("dali", "gpu graph: CUDA device available")
    # data.device=cpu keeps the run (so DALI's graph) on the CPU even with a GPU present
    assert resolve_backend("auto", "cpu", key="data.") == ("dali", "cpu graph: data.device=cpu")


@pytest.mark.parametrize("installed", [False, True])
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_explicit_backends_are_kept(monkeypatch, backend, installed):
    monkeypatch.setitem(sys.modules, "nvidia", sys.modules.get("nvidia") or type(sys)("nvidia"))
    monkeypatch.setitem(sys.modules, "nvidia.dali", type(sys)("nvidia.dali") if installed else None)
    cuda(monkeypatch, installed)
    assert resolve_backend(backend) == (backend, "set explicitly")
    assert load_config(None, ["data.train_shards=x", f"data.backend={backend}"]).data.backend == backend


def test_the_log_line_names_choice_and_reason(dali, monkeypatch):
    cuda(monkeypatch, False)
    assert backend_line("auto", key="data.") == ("dali", "data.backend=auto -> dali (cpu graph: no CUDA device)")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return str(build_synthetic_shards(tmp_path_factory.mktemp("backend_auto_data"), 32, "wds", 16) / "wds")


def test_an_auto_run_logs_one_line_and_records_the_choice(shards, tmp_path, no_dali, capsys):
    """A tiny run (DALI made unimportable: torch, as the trainer tests use) under the default."""
    argv = [a for a in overrides(shards, tmp_path, "auto", optim__max_steps=1) if not a.startswith("data.backend=")]
    summary = run_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "data.backend=" in line]
    assert len(lines) == 1 and lines[0].startswith("auto: data.backend=auto -> torch (nvidia.dali not importable"), err
    config_yaml = f"{summary['run_dir']}/config.yaml"
    with open(config_yaml) as f:
        text = f.read()
    assert yaml.safe_load(text)["data"]["backend"] == "torch"  # the resolved value, not "auto"
    assert "# data.backend=auto -> torch (nvidia.dali not importable" in text  # and why
    assert load_config(config_yaml).data.backend == "torch"  # still a valid --config
