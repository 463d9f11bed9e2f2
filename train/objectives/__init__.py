"""Training objectives, one per `loss.mode`: each is a unit in its own module (`base.Objective`
says what one declares and does), and the training loop only calls it.

This registry maps every `loss.mode` to the objective that implements it, named as text
("module:Class") so that reading a config imports no torch: `train/config.py` validates
`loss.mode` against `names()`. A new objective is a new module with an `Objective` subclass and
one `register` line below (or a `register` call with the class itself, for one defined elsewhere).
"""
from __future__ import annotations

import importlib

# loss.mode → (the objective class or "module:Class", keyword options its constructor takes)
OBJECTIVES: dict[str, tuple[object, dict]] = {}


def register(mode: str, objective, **options) -> None:
    """Make `loss.mode=<mode>` build `objective(cfg, env, **options)`."""
    if mode in OBJECTIVES:
        raise ValueError(f"loss.mode {mode!r} is registered already")
    OBJECTIVES[mode] = (objective, options)


def names() -> tuple[str, ...]:
    """Every `loss.mode`, in registration order (the order config errors list them in)."""
    return tuple(OBJECTIVES)


def build_objective(cfg, env):
    """The run's `Objective` for `cfg.loss.mode` (a `TrainConfig`), its loss on `env.device`."""
    if cfg.loss.mode not in OBJECTIVES:
        raise ValueError(f"loss.mode: {cfg.loss.mode!r} is not one of {', '.join(names())}")
    objective, options = OBJECTIVES[cfg.loss.mode]
    if isinstance(objective, str):
        module, attr = objective.split(":")
        objective = getattr(importlib.import_module(module), attr)
    return objective(cfg, env, **options)


# One implementation with an option: clip-raw and clip-both differ only in the texts they pair.
register("clip-raw", "train.objectives.clip:ClipObjective", syn=False)
register("clip-both", "train.objectives.clip:ClipObjective", syn=True)
register("alip", "train.objectives.alip:AlipObjective")
register("evidential", "train.objectives.evidential:EvidentialObjective")
