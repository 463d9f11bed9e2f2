"""Checkpoints that resume a run exactly: model, optimizer, scheduler, scaler, gate state, RNG
states, step, epoch and the loader position. Written to a temporary name, then renamed."""
from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"step_{step:08d}.pt")


def save(folder: str, step: int, state: dict, keep: int = 2) -> str:
    os.makedirs(folder, exist_ok=True)
    path = checkpoint_path(folder, step)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


def list_checkpoints(folder: str) -> list[str]:
    paths = glob.glob(os.path.join(folder, "step_*.pt"))
    return sorted(paths, key=lambda p: int(re.search(r"step_(\d+)", p).group(1)))


def resolve(resume: str | None, folder: str) -> str | None:
    """`latest` → the newest checkpoint in `folder` (None when there is none yet), else a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"run.resume {resume}: no such checkpoint; use run.resume=latest or a path")
    return resume


def load(path: str) -> dict:
    # The file holds optimizer state and RNG states (numpy arrays): it is our own, so load it fully.
    return torch.load(path, map_location="cpu", weights_only=False)
