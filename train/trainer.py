"""The training loop, top to bottom: set-up from the config, then the accumulation loop.

One step = `optim.accum_steps` micro-batches of `data.batch_size` per rank. Checkpoints land at
step boundaries, so the loader position they record is exact and a resumed run continues with
the very batches the killed run had not consumed yet.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from train import checkpoint
from train.config import ConfigError, TrainConfig, to_dict
from train.cpu_threads import torch_threads
from train.data import train_loader
from train.distributed import DistEnv, init_distributed
from train.model import DualPathCLIP, build_model, export_open_clip
from train.objectives import build_objective
from train.objectives.base import Objective
from train.optim import build_scheduler, param_groups
from train.records import RunRecorder
from train.source_counts import SourceCounts
from train.validation import Validation, retrieval_evals
from train.variants.pruning import apply_token_pruning
from train.variants.tuning import apply_tuning, trainable_summary

MAX_LOGIT_SCALE = math.log(100)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return precision, contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, lambda: torch.autocast(device.type, dtype=dtype)


def evaluate_run(cfg: TrainConfig, model, device, run_dir: str, evals: dict | None = None) -> dict:
    """Zero-shot retrieval on `eval.retrieval_json` at the end of the run → results.json/.md;
    `evals`: the validation's own at the last step, when it made one (not evaluated twice)."""
    from train.eval.evaluate import write_results

    evals = evals or retrieval_evals(cfg, model, device)
    write_results(os.path.join(run_dir, "results.json"), {cfg.run.name: evals})
    model.train()
    return evals


def build_run_model(cfg: TrainConfig, env: DistEnv, objective: Objective) -> tuple[DualPathCLIP, dict]:
    """(the model as this run trains it, its trainable summary): built, tuned, changed by the
    objective and the variants, all before DDP and the optimizer (they take what trains)."""
    model = build_model(cfg.model.name, cfg.model.pretrained, cfg.model.grad_checkpointing,
                        cfg.model.trim_text).to(env.device)
    apply_tuning(model, cfg.model.tuning, cfg.model.adapter_init)
    objective.prepare(model)
    if cfg.model.token_pruning.enabled:
        try:  # the layers and ratios are checked against the built tower
            tp = cfg.model.token_pruning
            apply_token_pruning(model, tp.layers, tp.keep, tp.act_layers, tp.text_rescale)
        except ValueError as e:
            raise ConfigError(f"model.token_pruning: {e}") from None
    trainable = trainable_summary(model)
    if env.is_main and cfg.model.tuning != "none":  # full training: 100 %, logged in metrics only
        print(f"{cfg.run.name}: model.tuning={cfg.model.tuning}, {trainable['line']}", file=sys.stderr)
    return model, trainable


def plan_steps(cfg: TrainConfig, loader) -> tuple[int, int]:
    """(optimizer steps per epoch, steps the run takes)."""
    accum = cfg.optim.accum_steps
    steps_per_epoch = loader.batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch holds {loader.batches_per_epoch} batches, fewer than "
                         f"optim.accum_steps={accum}")
    total_steps = cfg.optim.epochs * steps_per_epoch
    return steps_per_epoch, min(total_steps, cfg.optim.max_steps) if cfg.optim.max_steps else total_steps


@dataclass
class Run:
    """What a run trains with, around the built model; a checkpoint holds its state (`save`,
    `resume`)."""
    cfg: TrainConfig
    env: DistEnv
    dir: str
    model: DualPathCLIP
    trainable: dict
    objective: Objective
    loader: Any
    seen: SourceCounts
    validation: Validation
    ddp: nn.Module  # `model`, DDP-wrapped when distributed: its no_sync() skips an all-reduce
    forward: Any  # what the step calls: `ddp`, compiled when model.compile
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    autocast: Any  # () → the precision's autocast context
    total_steps: int

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.dir, "checkpoints")

    def optimizer_step(self) -> tuple[torch.Tensor, float]:
        """Clip, step, schedule → (the gradient norm, the rate this step used)."""
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad or float("inf"))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        lr = self.sched.get_last_lr()[0]  # the rate this step used; sched.step() sets the next one
        self.sched.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return grad_norm, lr

    def save(self, step: int) -> str:
        """Collective under DDP (source counts, the objective's records): every rank calls it."""
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                 "loader": self.loader.state_dict(), "rng": checkpoint.rng_state(), "step": step,
                 "epoch": self.loader.epoch, "config": to_dict(self.cfg), "sources_seen": self.seen.state_dict(),
                 "validation": self.validation.state_dict(), **self.objective.checkpoint_state(self.env.world_size)}
        return checkpoint.save(self.ckpt_dir, step, state, self.cfg.run.keep_checkpoints) if self.env.is_main else ""

    def resume(self) -> int:
        """Load `run.resume`'s checkpoint, if any → the step to go on from."""
        resume_from = checkpoint.resolve(self.cfg.run.resume, self.ckpt_dir)
        if not resume_from:
            return 0
        state = checkpoint.load(resume_from)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.objective.load_checkpoint_state(state)
        self.loader.load_state_dict(state["loader"], accum_steps=self.cfg.optim.accum_steps)  # an epoch with < accum left is over
        self.seen.load_state_dict(state.get("sources_seen"))
        self.validation.load_state_dict(state.get("validation"))  # the best so far stays the one to beat
        checkpoint.set_rng_state(state["rng"])
        return state["step"]


def start_run(cfg: TrainConfig, env: DistEnv, run_dir: str, model: DualPathCLIP, trainable: dict,
              objective: Objective, loader) -> Run:
    """DDP, compilation, optimizer, schedule, precision, validation and records around the model."""
    seen = SourceCounts(loader, env)
    steps_per_epoch, total_steps = plan_steps(cfg, loader)
    objective.begin_run(loader, steps_per_epoch)
    validation = Validation(cfg, env, run_dir)  # eval.every_epochs / every_steps, run.keep_best
    ddp = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None) \
        if env.world_size > 1 else model
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_all),
                            lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            fused=env.device.type in ("cpu", "cuda") if cfg.optim.fused is None else cfg.optim.fused)
    sched = build_scheduler(opt, cfg.optim.schedule, cfg.optim.lr, total_steps, cfg.optim.warmup_steps)
    precision, autocast = autocast_for(cfg.optim.precision, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    return Run(cfg, env, run_dir, model, trainable, objective, loader, seen, validation, ddp,
               torch.compile(ddp) if cfg.model.compile else ddp, opt, sched, scaler, autocast, total_steps)


def note_sources(run: Run, notes: list[str | None]) -> None:
    """Why data.backend (and run.threads, where lip-train picked them) hold what they do, the sources
    as resolved (comments: config.yaml stays a --config); a mixed run's sources on the console."""
    with open(os.path.join(run.dir, "config.yaml"), "a") as f:
        f.writelines(f"# {note}\n" for note in notes if note)
        f.write(run.seen.describe())
    for src in run.seen.sources if len(run.seen.sources) > 1 else []:
        print(f"{run.cfg.run.name}: source {src['name']} ({src['format']}, {src['shards']}): {src['samples']} samples "
              f"× weight {src['weight']} = {src['per_epoch']} per epoch", file=sys.stderr)


def finish_run(run: Run, step: int, last: dict, step_times: list[float]) -> dict:
    """The objective's records, the open_clip export, the final evaluation and plots → train()'s result."""
    env, cfg = run.env, run.cfg
    run.objective.finish(run.dir)
    result = {"run_dir": run.dir, "steps": step, "final": last, "step_times": step_times,
              "is_main": env.is_main, **({"best": run.validation.state_dict()} if run.validation.metric else {})}
    if env.is_main:
        export_open_clip(run.model, os.path.join(run.dir, "open_clip_model.pt"))
        if cfg.eval.retrieval_json:
            result["eval"] = evaluate_run(cfg, run.model, env.device, run.dir, run.validation.evals_at(step))
        if cfg.run.plots:
            from train.plot import plot_run

            plot_run(run.dir)
    return result


def train(cfg: TrainConfig, loader=None, threads_note: str | None = None) -> dict:
    """Run the configured training. `loader` replaces the shard loader (benchmarks feed batches
    from memory); it needs the `pipelines.loader.Loader` interface. torch's CPU threads are
    `run.threads` meanwhile (0: as the caller has them; lip-train picks them, train/cpu_threads.py,
    and says why in `threads_note`, logged with the backend's line once the data opens)."""
    with torch_threads(cfg.run.threads):
        return _train(cfg, loader, threads_note)


def _train(cfg: TrainConfig, loader=None, threads_note: str | None = None) -> dict:
    env = init_distributed(cfg.data.device)
    seed_everything(cfg.run.seed)  # identical init on every rank (DDP also broadcasts it)
    objective = build_objective(cfg, env)  # loss.mode: the loss, the texts it pairs, its records
    model, trainable = build_run_model(cfg, env, objective)
    cfg, loader, backend_note = train_loader(cfg, env, loader)
    if threads_note and env.is_main:
        print(f"{cfg.run.name}: {threads_note}", file=sys.stderr)
    run = start_run(cfg, env, os.path.join(cfg.run.out_dir, cfg.run.name), model, trainable, objective, loader)
    step = run.resume()
    recorder = RunRecorder(run.dir, to_dict(cfg), env.is_main, run.total_steps, step)
    if env.is_main:
        note_sources(run, [backend_note, threads_note])
    model.train()
    accum = cfg.optim.accum_steps
    global_batch = cfg.data.batch_size * env.world_size * accum
    tick, tick_step = time.perf_counter(), step
    last = {}
    step_times: list[float] = []  # wall clock after each step: benchmarks time a window of steps
    while step < run.total_steps:
        # A trailing partial accumulation is never begun. An epoch resumed at another world size
        # (elastic) holds fewer batches than the rest: `epoch_batches` counts them.
        batches_per_epoch = loader.epoch_batches // accum * accum
        if loader.batches_yielded >= batches_per_epoch:  # left early (accumulation remainder)
            loader.set_epoch(loader.epoch + 1)
            continue
        for batch in loader:
            micro = loader.batches_yielded
            run.seen.add(batch)
            sync = micro % accum == 0
            with (contextlib.nullcontext() if sync or env.world_size == 1 else run.ddp.no_sync()):
                loss, info, scale = objective.step(run.forward, batch, run.autocast, loader.epoch)
                run.scaler.scale(loss / accum).backward()
            objective.record(step + 1, batch, info)
            if (micro - 1) % accum == 0:  # the logged loss is the step's: its micro-batches' mean
                step_loss = torch.zeros((), device=env.device)
            step_loss += loss.detach() / accum
            if not sync:
                continue
            grad_norm, lr = run.optimizer_step()
            step += 1
            if step % cfg.run.log_every == 0 or step == run.total_steps:
                now = time.perf_counter()
                last = {"loss": float(step_loss), "lr": lr, "logit_scale": float(scale.detach()),
                        "grad_norm": float(grad_norm), "epoch": loader.epoch,
                        "trainable_fraction": trainable["trainable_fraction"],
                        "samples_per_s": (step - tick_step) * global_batch / (now - tick),
                        **objective.metrics(info), **run.seen.metrics()}
                for name, values in objective.histograms(info).items():
                    recorder.histogram(step, name, values)
                recorder.log(step, last)
                tick, tick_step = now, step
            if run.validation.due(step, loader.epoch, micro == batches_per_epoch, step == run.total_steps):
                run.validation(step, loader.epoch, model, recorder)  # before save(): it records the best so far
            if step % cfg.run.ckpt_every == 0 or step == run.total_steps or micro == batches_per_epoch:
                run.save(step)
            step_times.append(time.perf_counter())
            if step >= run.total_steps or micro == batches_per_epoch:
                break
    recorder.close()
    return finish_run(run, step, last, step_times)
