"""The objective registry (train/objectives/): a registered objective is a `loss.mode` that config
validation accepts and lists, `build_objective` builds it, and the base step feeds its loss the
texts it declares."""
from __future__ import annotations

import types

import pytest
import torch

from train import objectives
from train.config import ConfigError, load_config
from train.distributed import DistEnv
from train.losses import ClipLoss
from train.objectives.base import Objective

CPU = torch.device("cpu")


class SynOnly(Objective):
    """A toy objective: InfoNCE against the synthetic caption alone, scaled by an option."""

    texts = (False, True)

    def __init__(self, cfg, env, weight: float = 1.0):
        super().__init__(cfg, env)
        self.loss_fn, self.weight = ClipLoss(), weight

    def loss(self, image, raw, syn, scale, has_syn):
        assert raw is None
        loss = self.weight * self.loss_fn(image, syn, scale)
        return loss, {"loss_syn": loss.detach()}


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(objectives, "OBJECTIVES", dict(objectives.OBJECTIVES))  # registrations end with the test


def test_a_registered_objective_is_a_loss_mode(registry):
    base = ["data.train_shards=shards/x/wds"]
    with pytest.raises(ConfigError, match=r"loss.mode: 'syn-only' is not one of clip-raw, clip-both, alip, evidential$"):
        load_config(None, base + ["loss.mode=syn-only"])
    objectives.register("syn-only", SynOnly, weight=0.5)
    cfg = load_config(None, base + ["loss.mode=syn-only"])
    with pytest.raises(ConfigError, match=r"'nope' is not one of clip-raw, clip-both, alip, evidential, syn-only$"):
        load_config(None, base + ["loss.mode=nope"])
    with pytest.raises(ValueError, match="registered already"):
        objectives.register("alip", SynOnly)

    objective = objectives.build_objective(cfg, DistEnv(0, 1, 0, CPU))
    assert isinstance(objective, SynOnly) and objective.weight == 0.5
    calls = []

    def forward(images, first, second):  # DualPathCLIP's call: the first text path, an optional second
        calls.append((first, second))
        g = torch.Generator().manual_seed(0)
        feats = [torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(2)]
        return feats[0], feats[1], None, torch.tensor(10.0)

    batch = types.SimpleNamespace(images=torch.zeros(4, 3, 8, 8), raw_tokens=torch.zeros(4, 77, dtype=torch.long),
                                  syn_tokens=torch.ones(4, 77, dtype=torch.long), has_syn=torch.ones(4, dtype=torch.bool))
    loss, info, scale = objective.step(forward, batch, lambda: torch.autocast("cpu", enabled=False), epoch=0)
    assert calls[0][0] is batch.syn_tokens and calls[0][1] is None  # a syn-only loss: the caption down the first path
    assert objective.metrics(info) == {"loss_syn": pytest.approx(float(loss))} and float(scale) == 10.0


def test_every_built_in_mode_builds(registry):
    texts = {"clip-raw": (True, False), "clip-both": (True, True), "alip": (True, True), "evidential": (True, False)}
    assert objectives.names() == tuple(texts)
    for mode, want in texts.items():
        cfg = load_config(None, ["data.train_shards=shards/x/wds", f"loss.mode={mode}"])
        assert objectives.build_objective(cfg, DistEnv(0, 1, 0, CPU)).texts == want, mode
