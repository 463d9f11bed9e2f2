"""Validation during training and the best checkpoint (`eval.every_epochs`, `eval.every_steps`,
`run.keep_best`; docs/training.md, "Validation and the best checkpoint").

Rank 0 evaluates `eval.retrieval_json` (the other ranks hold no copy of the test set and wait);
the kept metric's value is then broadcast, so every rank decides "best" from the same number and
none runs ahead into the next step's all-reduce while rank 0 is still evaluating. A failure on
rank 0 is broadcast too: every rank raises rather than waits for a value that never comes.

The evaluation leaves the RNG states as it found them (its DataLoader draws a seed from torch's),
so a run that validates trains the very same weights as one that does not; and it runs right
before the step's checkpoint, so the best so far that the checkpoint records is current: a
resumed run compares against it and keeps `<run>/best/` unless it does better.
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.distributed as dist

from train import checkpoint
from train.config import TrainConfig, to_dict
from train.distributed import DistEnv
from train.model import export_open_clip


def derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """`mean_r1` (the mean of the two R@1) and `r_mean` (ELIP's selection metric, the mean of the
    six recalls: rsum / 6) beside a retrieval evaluation's own keys."""
    return {**metrics, "mean_r1": (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2, "r_mean": metrics["rsum"] / 6}


def retrieval_evals(cfg: TrainConfig, model, device) -> dict[str, dict[str, float]]:
    """{eval name: retrieval metrics} of `eval.retrieval_json` (the name is the JSON's stem)."""
    from train.eval.evaluate import RetrievalEvalConfig, run_evals  # torchvision and open_clip: seconds

    return run_evals(model, [RetrievalEvalConfig(
        name=os.path.splitext(os.path.basename(cfg.eval.retrieval_json))[0],
        karpathy_json=cfg.eval.retrieval_json, images_root=cfg.eval.images_root,
        caption_prefix=cfg.eval.caption_prefix, image_size=cfg.data.image_size,
        batch_size=cfg.eval.batch_size, workers=cfg.data.workers)], device)


class Validation:
    """Called by the loop after every step it is `due`; holds the best so far (`state_dict`)."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, run_dir: str):
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.every_epochs, self.every_steps = cfg.eval.every_epochs, cfg.eval.every_steps
        self.enabled = bool(cfg.eval.retrieval_json) and (self.every_epochs > 0 or self.every_steps > 0)
        self.metric = cfg.run.keep_best or None
        self.best = {"metric": self.metric, "value": None, "step": None, "epoch": None}
        self._last: tuple[int, dict] | None = None  # (step, evals) of rank 0's latest evaluation

    def due(self, step: int, epoch: int, epoch_end: bool, last: bool) -> bool:
        """At the end of every `every_epochs`-th epoch (0-based `epoch` just finished), every
        `every_steps` steps, and at the run's last step (whose evaluation the end of the run reuses)."""
        if not self.enabled:
            return False
        return (last or (self.every_steps > 0 and step % self.every_steps == 0)
                or (epoch_end and self.every_epochs > 0 and (epoch + 1) % self.every_epochs == 0))

    def __call__(self, step: int, epoch: int, model, recorder) -> None:
        """Evaluate on rank 0, agree on the value everywhere, record the curve, keep the best.
        Collective under DDP: every rank calls it at the same steps."""
        evals, failure = None, None
        if self.env.is_main:
            rng = checkpoint.rng_state()
            try:
                evals = retrieval_evals(self.cfg, model, self.env.device)
            except Exception as e:  # noqa: BLE001 - re-raised below, once the other ranks know
                failure = e
            finally:
                checkpoint.set_rng_state(rng)
        metrics = derived_metrics(next(iter(evals.values()))) if evals else {}
        value = metrics.get(self.metric, math.nan) if self.metric else math.nan
        if self.env.world_size > 1:
            flag = torch.tensor([float(failure is None), value], dtype=torch.float64, device=self.env.device)
            dist.broadcast(flag, 0)
            ok, value = bool(flag[0]), float(flag[1])
            if not ok and failure is None:
                raise RuntimeError(f"validation at step {step} failed on rank 0 (its error is in rank 0's log)")
        if failure is not None:
            raise failure
        improved = self.metric is not None and not math.isnan(value) and (
            self.best["value"] is None or value > self.best["value"])  # ties keep the earlier (ELIP's `>`)
        if improved:
            self.best.update(value=value, step=step, epoch=epoch)
        if not self.env.is_main:
            return
        self._last = (step, evals)
        row = {f"eval/{k}": v for k, v in metrics.items()}
        if self.metric:
            row[f"eval/best_{self.metric}"] = self.best["value"]
        recorder.log(step, row)
        note = f"; best {self.best['value']:.2f} at step {self.best['step']}" if self.metric else ""
        print(f"{self.cfg.run.name}: validation at step {step} (epoch {epoch}): mean R@1 {metrics['mean_r1']:.2f}, "
              f"rsum {metrics['rsum']:.1f}{note}", file=sys.stderr)
        if improved:
            self._save_best(model, step, epoch, evals)

    def _save_best(self, model, step: int, epoch: int, evals: dict) -> None:
        """<run>/best/: checkpoint.pt (weights, adapters included, config, step; lip-eval loads it),
        the open_clip export (and adapters.pt) and results.json/.md of the evaluation that won."""
        from train.eval.evaluate import write_results

        folder = os.path.join(self.run_dir, "best")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "checkpoint.pt")
        torch.save({"model": model.state_dict(), "config": to_dict(self.cfg), "step": step, "epoch": epoch,
                    "best": dict(self.best), "eval": evals}, path + ".tmp")
        os.replace(path + ".tmp", path)
        export_open_clip(model, os.path.join(folder, "open_clip_model.pt"))
        write_results(os.path.join(folder, "results.json"), {self.cfg.run.name: evals})

    def evals_at(self, step: int) -> dict | None:
        """Rank 0's evaluation at `step` when it made one there, else None."""
        return self._last[1] if self._last and self._last[0] == step else None

    def state_dict(self) -> dict:
        return dict(self.best)

    def load_state_dict(self, state: dict | None) -> None:
        """The best so far from a checkpoint; one kept for another metric is not comparable and
        is dropped (best/ is then replaced at the next evaluation)."""
        if not state or state.get("value") is None:
            return
        if state.get("metric") != self.metric:
            if self.env.is_main and self.metric:
                print(f"{self.cfg.run.name}: run.keep_best is {self.metric}, the checkpoint kept "
                      f"{state.get('metric')}: the best so far starts again", file=sys.stderr)
            return
        self.best = dict(state)
