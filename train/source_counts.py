"""Samples seen per data source: what a mixed run logs (metrics.jsonl, TensorBoard, the step line)
and keeps in its checkpoints, so a resumed run's counts go on from the killed run's."""
from __future__ import annotations

import torch
import torch.distributed as dist


class SourceCounts:
    def __init__(self, loader, env):
        describe = getattr(loader, "describe", None)  # benchmark loaders feeding from memory have none
        self.sources = describe() if describe else []
        self.env = env
        self.local = torch.zeros(len(self.sources), dtype=torch.int64)  # this rank's, since this process began
        self.before = torch.zeros(len(self.sources), dtype=torch.int64)  # every rank's, from the checkpoint

    def add(self, batch) -> None:
        sources = getattr(batch, "sources", None)
        if sources is not None and self.sources:
            self.local += torch.bincount(sources, minlength=len(self.sources))

    def totals(self) -> torch.Tensor:
        """Samples every rank has yielded, per source (collective under DDP)."""
        counts = self.local.clone()
        if self.env.world_size > 1:
            counts = counts.to(self.env.device)
            dist.all_reduce(counts)
        return self.before + counts.cpu()

    def metrics(self) -> dict:
        if len(self.sources) < 2:  # one folder: samples seen are steps × global batch
            return {}
        return {f"data/samples/{s['name']}": int(n) for s, n in zip(self.sources, self.totals())}

    def state_dict(self) -> dict:
        return {s["name"]: int(n) for s, n in zip(self.sources, self.totals())}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.before = torch.tensor([int(state.get(s["name"], 0)) for s in self.sources], dtype=torch.int64)

    def describe(self) -> str:
        """The sources as resolved, as YAML comments for the run's config.yaml."""
        lines = [f"#   - {{name: {s['name']}, shards: {s['shards']}, format: {s['format']}, samples: {s['samples']}, "
                 f"weight: {s['weight']}, per_epoch: {s['per_epoch']}}}\n" for s in self.sources]
        return "# data sources, as resolved:\n" + "".join(lines) if lines else ""
