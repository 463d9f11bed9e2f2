"""AdamW parameter groups and learning-rate schedules."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """Weight decay off for biases, norms, embeddings and logit_scale (open_clip's rule: every
    parameter with fewer than 2 dims, plus embeddings); `decay_all` decays everything (ALIP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(("bn", "ln"))
        (no_decay if exclude and not decay_all else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_scheduler(opt: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if schedule == "onecycle":  # ALIP: 10 % warm-up, cosine annealing
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total_steps, 2),
                                                   pct_start=0.1)
    warmup = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
