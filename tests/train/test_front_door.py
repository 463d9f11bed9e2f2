"""lip-train's front door: `data.backend=auto` (the default) picks DALI on GPU, DALI's CPU graph
without CUDA, torch without DALI, and says so in one line; explicit backends stay as set;
`--print-config` lists every key with its value and description and trains nothing."""
from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import yaml

from conftest import build_synthetic_shards, overrides, run_main
from pipelines.loader_settings import backend_line, resolve_backend
from train.config import TrainConfig, config_keys, field_comments, load_config
from train.main import main


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


# ------------------------------------------------------------------ data.backend=auto


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
    return str(build_synthetic_shards(tmp_path_factory.mktemp("front_door_data"), 32, "wds", 16) / "wds")


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


# ------------------------------------------------------------------ --print-config


def dataclass_leaves(cls, prefix: str = "") -> dict[str, tuple[type, str]]:
    """Every leaf field of the config dataclasses, walked here independently: key → (class, name)."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(dataclass_leaves(type(default), f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (cls, f.name)
    return out


def printed(capsys, argv: list[str]) -> dict[str, str]:
    """`lip-train --print-config ...` → key → its line; asserts exit 0 and nothing trained."""
    assert main(["--print-config", *argv]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        key = line.split(" = ", 1)[0]
        assert key not in rows, f"{key} printed twice"
        rows[key] = line
    return rows


def test_print_config_lists_every_field_with_a_description(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    leaves = dataclass_leaves(TrainConfig)
    rows = printed(capsys, [])
    assert set(rows) == set(leaves)
    defaults = {k: v for k, v, _ in config_keys()}
    for key, (cls, name) in leaves.items():
        note = field_comments(cls).get(name, "")
        assert note.strip(), f"{key} has no description in train/config.py"
        line = rows[key]
        value, comment = line.split("  # ", 1)
        assert comment.strip() == note and "(default:" not in value
    assert rows["data.batch_size"].startswith("data.batch_size = 64 ") and "# per rank" in rows["data.batch_size"]
    assert rows["data.backend"].startswith("data.backend = auto ")
    assert defaults["optim.betas"] == (0.9, 0.98) and rows["optim.betas"].startswith("optim.betas = [0.9, 0.98] ")
    assert not (tmp_path / "runs").exists()


def test_print_config_shows_what_a_run_would_use(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  batch_size: 128\n  backend: torch\n")
    rows = printed(capsys, ["--config", str(cfg), "optim.lr=1e-3", f"run.out_dir={tmp_path / 'runs'}"])
    assert rows["data.batch_size"].startswith("data.batch_size = 128  (default: 64)")
    assert rows["data.backend"].startswith("data.backend = torch  (default: auto)")
    assert rows["optim.lr"].startswith("optim.lr = 0.001  (default: 0.0005)")
    assert rows["data.workers"].startswith("data.workers = 2 ") and "default" not in rows["data.workers"].split("#")[0]
    assert not (tmp_path / "runs").exists()


def test_print_config_config_errors_still_fail(capsys):
    assert main(["--print-config", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_help_mentions_print_config(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "--print-config" in capsys.readouterr().out
