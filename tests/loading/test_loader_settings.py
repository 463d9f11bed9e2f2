"""One definition of the loader's settings (`pipelines/loader_settings.py`): lip-train's `data.*`
keys are the loader's own fields, handed to the loader in one call; one resolution of `auto` for
every tool; and every tool's format choices read from the format registry."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from pipelines.formats.registry import FORMATS
from pipelines.loader import LoaderConfig
from pipelines import loader_settings
from pipelines.loader_settings import CHOICES, LoaderSettings, resolve_backend
from tools.bench import bench_loader, bench_shuffle
from tools.captions import caption_shards
from tools.demo import demo
from train.config import ConfigError, DataConfig, TrainConfig, field_comments, load_config
from train.eval import cli as eval_cli

# lip-train's own defaults where they differ from the loader's (DataConfig's docstring says why)
RUN_DEFAULTS = {"backend": "auto", "device": "auto", "batch_size": 64, "shuffle": "global"}


def choices(parser, option: str) -> tuple:
    return tuple(next(a for a in parser._actions if option in a.option_strings).choices)


@pytest.fixture
def dali(monkeypatch):
    """`import nvidia.dali` succeeds (a stand-in module)."""
    monkeypatch.setitem(sys.modules, "nvidia", sys.modules.get("nvidia") or type(sys)("nvidia"))
    monkeypatch.setitem(sys.modules, "nvidia.dali", type(sys)("nvidia.dali"))


# ------------------------------------------------------------------ one definition


def test_data_config_holds_the_loaders_own_field_definitions():
    """Every loader setting lip-train does not default otherwise is the loader's very field (the same
    dataclass Field: a default or type changed there is lip-train's at once) with its description."""
    settings = {f.name: f for f in dataclasses.fields(LoaderSettings)}
    data = {f.name: f for f in dataclasses.fields(DataConfig)}
    assert set(data) == set(settings) | {"train_shards"}
    redeclared = {name for name in settings if data[name] is not settings[name]}
    assert redeclared == set(RUN_DEFAULTS)
    assert {name: getattr(DataConfig(), name) for name in redeclared} == RUN_DEFAULTS
    notes, loader_notes = field_comments(DataConfig), field_comments(LoaderSettings)
    for name in set(settings) - redeclared:
        assert notes[name] == loader_notes[name] and notes[name]
    assert DataConfig().cache_limit == "8GiB"  # shown as written by --print-config, as before


def test_a_changed_loader_default_is_lip_trains():
    """Edit a default in the loader's source only (workers 2 → 5, in a fresh interpreter): lip-train's
    config has it, and its --print-config shows it."""
    path = loader_settings.__file__
    src = open(path).read()
    assert src.count("workers: int = 2  #") == 1
    code = f"""
import sys, types
mod = types.ModuleType("pipelines.loader_settings")
mod.__file__ = {path!r}
sys.modules[mod.__name__] = mod
exec(compile(open({path!r}).read().replace("workers: int = 2  #", "workers: int = 5  #"), {path!r}, "exec"),
     mod.__dict__)
from train.config import DataConfig, config_keys
print(DataConfig().workers, dict((k, v) for k, v, _ in config_keys())["data.workers"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(path)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "5"]


def test_the_run_hands_its_settings_over_in_one_call():
    data = load_config(None, ["data.train_shards=x", "data.workers=3", "data.cache_limit=1MB",
                              "data.shuffle=block", "data.backend=torch", "data.remix_at_epoch=true"]).data
    cfg = LoaderConfig.from_settings(data, shards=data.train_shards, device="cpu", seed=7, rank=1, world_size=2)
    assert (cfg.shards, cfg.workers, cfg.cache_limit, cfg.shuffle, cfg.backend, cfg.remix_at_epoch) == \
        ("x", 3, 10 ** 6, "block", "torch", True)
    assert (cfg.batch_size, cfg.seed, cfg.rank, cfg.world_size, cfg.split) == (64, 7, 1, 2, "train")


# ------------------------------------------------------------------ one resolution of auto


def test_the_loader_resolves_auto(dali, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = LoaderConfig(shards="x", backend="auto", device="auto")
    assert (cfg.backend, cfg.device) == ("dali", "cpu")
    assert LoaderConfig(shards="x", backend="torch").backend == "torch"


def test_caption_shards_keeps_torch_on_a_cpu(dali, monkeypatch):
    """caption-shards' default (auto): DALI on the GPU, torch on the CPU, as its resumable runs recorded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", "cpu", on_cpu="torch")[0] == "torch"
    assert resolve_backend("auto", "gpu", on_cpu="torch")[0] == "dali"
    assert resolve_backend("auto", "cpu")[0] == "dali"  # lip-train's: DALI's CPU graph
    assert caption_shards.build_parser().parse_args([]).backend == "auto"


def test_without_dali_every_auto_is_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    for device in ("gpu", "cpu", "auto"):
        for on_cpu in ("dali", "torch"):
            backend, why = resolve_backend("auto", device, on_cpu=on_cpu)
            assert backend == "torch" and "nvidia.dali not importable" in why
    assert "nvidia.dali not importable" in bench_loader.skip_reason("dali-cpu", "wds", gpu=False)
    assert bench_loader.skip_reason("torch", "wds", gpu=False) is None


# ------------------------------------------------------------------ the format registry, read everywhere


def test_every_tools_format_choices_are_the_registrys():
    registry = tuple(FORMATS)
    assert CHOICES["format"] == registry
    assert choices(eval_cli.build_parser(), "--format") == registry
    assert choices(eval_cli.build_parser(), "--backend") == CHOICES["backend"]
    assert choices(caption_shards.build_parser(), "--format") == registry
    assert choices(caption_shards.build_parser(), "--backend") == CHOICES["backend"]
    assert choices(bench_shuffle.build_parser(), "--format") == registry
    # comma-separated lists: checked against the registry itself
    assert bench_loader.FORMATS is FORMATS and demo.FORMATS is FORMATS
    assert demo.build_parser().parse_args([]).formats == ",".join(registry)
    for fmt in registry:
        assert load_config(None, ["data.train_shards=x", f"data.format={fmt}"]).data.format == fmt
    with pytest.raises(ConfigError, match=f"data.format: 'tfrecord' is not one of {', '.join(registry)}"):
        load_config(None, ["data.train_shards=x", "data.format=tfrecord"])
    assert TrainConfig().data.format in registry


def test_unknown_formats_are_usage_errors(capsys):
    assert bench_loader.main(["--shards", "x", "--format", "wds,tfrecord", "--quick"]) == 2
    assert "tfrecord" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        demo.main(["--formats", "wds,tfrecord"])
    assert done.value.code == 2
    with pytest.raises(SystemExit):
        eval_cli.build_parser().parse_args(["--checkpoint", "c", "--model", "m", "--format", "tfrecord"])
