"""`lip-train --print-config` lists every config key with its value (and the default where the
value differs) and its description from train/config.py, and trains nothing; config errors still fail."""
from __future__ import annotations

import dataclasses

import pytest

from train.config import TrainConfig, config_keys, field_comments
from train.main import main


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
