"""What a run leaves behind in runs/<name>/: config.yaml, metrics.jsonl, TensorBoard events,
plots/*.png; and the console progress line. Only rank 0 writes."""
from __future__ import annotations

import json
import os
import time

import yaml


class RunRecorder:
    def __init__(self, run_dir: str, config: dict, enabled: bool, total_steps: int, start_step: int = 0):
        self.run_dir, self.enabled, self.total = run_dir, enabled, total_steps
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        self._metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=start_step, desc=os.path.basename(run_dir), unit="step",
                         dynamic_ncols=True)
        self._last = (time.perf_counter(), start_step)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._bar.update(step - self._bar.n)
        if "loss" in metrics:  # a validation row (eval/*) leaves the training loss shown
            self._bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}",
                                  sps=f"{metrics.get('samples_per_s', 0):.0f}", refresh=False)

    def histogram(self, step: int, name: str, values) -> None:
        if self.enabled:
            self._tb.add_histogram(name, values, step)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            self._metrics.close()
