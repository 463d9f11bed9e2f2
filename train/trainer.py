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

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from train import checkpoint
from train.config import ConfigError, TrainConfig, evidential_scale, to_dict
from train.variants.evidential import EvidentialLoss
from train.data import train_loader
from train.distributed import DistEnv, init_distributed
from train.losses import AlipLoss, ClipLoss
from train.model import build_model, export_open_clip
from train.optim import build_scheduler, param_groups
from train.variants.pruning import apply_token_pruning
from train.records import RunRecorder
from train.variants.tuning import apply_tuning, trainable_summary
from train.sample_weights import SampleWeights
from train.source_counts import SourceCounts
from train.validation import Validation, retrieval_evals

MAX_LOGIT_SCALE = math.log(100)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_losses(cfg: TrainConfig, env: DistEnv):
    common = dict(local_loss=cfg.loss.local_loss, gather_with_grad=cfg.loss.gather_with_grad,
                  cache_labels=True, rank=env.rank, world_size=env.world_size)
    if cfg.loss.mode == "alip":
        return AlipLoss(cfg.loss.momentum, cfg.loss.gamma_sample, cfg.loss.gamma_pair,
                        cfg.loss.normalize, cfg.loss.h_init, **common).to(env.device)
    if cfg.loss.mode == "evidential":
        return EvidentialLoss(cfg.loss.evidential_clamp, cfg.loss.kl_anneal_epochs,
                              evidential_scale(cfg.loss.evidential_scale), **common).to(env.device)
    return ClipLoss(**common).to(env.device)


def texts_used(mode: str, text: str) -> tuple[bool, bool]:
    """(raw, syn): which texts a loss pairs with the images."""
    if mode == "evidential":
        return text in ("raw", "both"), text in ("syn", "both")
    return True, mode != "clip-raw"


def compute_loss(mode: str, loss_fn, image, raw, syn, scale, has_syn, text: str = "raw") -> tuple[torch.Tensor, dict]:
    """Features in float32 whatever the autocast dtype: the softmax over the global batch and the
    gates' exponentials need the range. Two-text modes without ALIP's gates sum one term per text."""
    if mode == "alip":
        return loss_fn(image.float(), raw.float(), syn.float(), scale.float(), has_syn)
    use_raw, use_syn = texts_used(mode, text)
    terms = {}
    if use_raw:
        terms["loss_raw"] = loss_fn(image.float(), raw.float(), scale.float())
    if use_syn:
        terms["loss_syn"] = loss_fn(image.float(), syn.float(), scale.float())
    return sum(terms.values()), {k: v.detach() for k, v in terms.items()}


def gate_metrics(info: dict) -> dict:
    out = {f"gate/{k}": float(info[k]) for k in ("h_tc", "h_xt", "h_xc")}
    for k in ("w_sample", "w_raw", "w_syn"):
        w = info[k].float()
        if k == "w_syn":
            w = w[info["syn_mask"]] if info["syn_mask"].any() else w
        q = torch.quantile(w, torch.tensor([0.1, 0.5, 0.9], device=w.device))
        out.update({f"gate/{k}_mean": float(w.mean()), f"gate/{k}_q10": float(q[0]),
                    f"gate/{k}_q50": float(q[1]), f"gate/{k}_q90": float(q[2])})
    return out


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


def train(cfg: TrainConfig, loader=None) -> dict:
    """Run the configured training. `loader` replaces the shard loader (benchmarks feed batches
    from memory); it needs the `pipelines.loader.Loader` interface."""
    env = init_distributed(cfg.data.device)
    seed_everything(cfg.run.seed)  # identical init on every rank (DDP also broadcasts it)
    run_dir = os.path.join(cfg.run.out_dir, cfg.run.name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")

    model = build_model(cfg.model.name, cfg.model.pretrained, cfg.model.grad_checkpointing).to(env.device)
    apply_tuning(model, cfg.model.tuning, cfg.model.adapter_init)  # before DDP and the optimizer: they take what trains
    if cfg.loss.mode == "evidential" and evidential_scale(cfg.loss.evidential_scale) is not None:
        model.clip.logit_scale.requires_grad_(False)  # no loss term reads it: DDP wants no unused trainables
    if cfg.model.token_pruning.enabled:
        try:  # the layers and ratios are checked against the built tower
            tp = cfg.model.token_pruning
            apply_token_pruning(model, tp.layers, tp.keep, tp.act_layers, tp.text_rescale)
        except ValueError as e:
            raise ConfigError(f"model.token_pruning: {e}") from None
    trainable = trainable_summary(model)
    if env.is_main and cfg.model.tuning != "none":  # full training: 100 %, logged in metrics only
        print(f"{cfg.run.name}: model.tuning={cfg.model.tuning}, {trainable['line']}", file=sys.stderr)
    cfg, loader, backend_note = train_loader(cfg, env, loader)
    seen = SourceCounts(loader, env)
    accum = cfg.optim.accum_steps
    steps_per_epoch = loader.batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch holds {loader.batches_per_epoch} batches, fewer than "
                         f"optim.accum_steps={accum}")
    total_steps = cfg.optim.epochs * steps_per_epoch
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)

    loss_fn = build_losses(cfg, env)
    validation = Validation(cfg, env, run_dir)  # eval.every_epochs / every_steps, run.keep_best
    # The gates' last weight per sample id (alip only): the training-time AUC reads it.
    weights = SampleWeights.for_loader(loader, env.device, steps_per_epoch, cfg.run.sample_record_max) \
        if cfg.loss.mode == "alip" else None
    ddp = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None) \
        if env.world_size > 1 else model
    forward = torch.compile(ddp) if cfg.model.compile else ddp
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_all),
                            lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            fused=env.device.type in ("cpu", "cuda") if cfg.optim.fused is None else cfg.optim.fused)
    sched = build_scheduler(opt, cfg.optim.schedule, cfg.optim.lr, total_steps, cfg.optim.warmup_steps)
    precision, autocast = autocast_for(cfg.optim.precision, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")

    step = 0
    resume_from = checkpoint.resolve(cfg.run.resume, ckpt_dir)
    if resume_from:
        state = checkpoint.load(resume_from)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        loss_fn.load_state_dict(state["loss"])
        if weights is not None and "sample_weights" in state:
            weights.load_state_dict(state["sample_weights"])
        loader.load_state_dict(state["loader"], accum_steps=accum)  # an epoch with < accum left is over
        seen.load_state_dict(state.get("sources_seen"))
        validation.load_state_dict(state.get("validation"))  # the best so far stays the one to beat
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]

    def save() -> str:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict(), "loss": loss_fn.state_dict(), "loader": loader.state_dict(),
                 "rng": checkpoint.rng_state(), "step": step, "epoch": loader.epoch, "config": to_dict(cfg),
                 "sources_seen": seen.state_dict()}  # collective under DDP: every rank calls save()
        state["validation"] = validation.state_dict()
        if weights is not None:  # merging is collective: every rank calls save()
            state["sample_weights"] = weights.merged(env.world_size)
        return checkpoint.save(ckpt_dir, step, state, cfg.run.keep_checkpoints) if env.is_main else ""

    recorder = RunRecorder(run_dir, to_dict(cfg), env.is_main, total_steps, step)
    if env.is_main:  # why data.backend holds what it does, the sources as resolved (comments: the file stays a --config)
        with open(os.path.join(run_dir, "config.yaml"), "a") as f:
            f.write(f"# {backend_note}\n" if backend_note else "")
            f.write(seen.describe())
        for src in seen.sources if len(seen.sources) > 1 else []:
            print(f"{cfg.run.name}: source {src['name']} ({src['format']}, {src['shards']}): {src['samples']} samples "
                  f"× weight {src['weight']} = {src['per_epoch']} per epoch", file=sys.stderr)
    model.train()
    use_raw, use_syn = texts_used(cfg.loss.mode, cfg.loss.text)
    global_batch = cfg.data.batch_size * env.world_size * accum
    tick, tick_step = time.perf_counter(), step
    last = {}
    step_times: list[float] = []  # wall clock after each step: benchmarks time a window of steps
    while step < total_steps:
        # A trailing partial accumulation is never begun. An epoch resumed at another world size
        # (elastic) holds fewer batches than the rest: `epoch_batches` counts them.
        batches_per_epoch = loader.epoch_batches // accum * accum
        if loader.batches_yielded >= batches_per_epoch:  # left early (accumulation remainder)
            loader.set_epoch(loader.epoch + 1)
            continue
        for batch in loader:
            micro = loader.batches_yielded
            seen.add(batch)
            sync = micro % accum == 0
            with (contextlib.nullcontext() if sync or env.world_size == 1 else ddp.no_sync()):
                if isinstance(loss_fn, EvidentialLoss):
                    loss_fn.epoch = loader.epoch  # the KL term's annealing
                with autocast():  # a syn-only loss sends the synthetic tokens down the first path
                    image, first, second, scale = forward(
                        batch.images, batch.raw_tokens if use_raw else batch.syn_tokens,
                        batch.syn_tokens if use_raw and use_syn else None)
                raw, syn = (first, second) if use_raw else (None, first)
                loss, info = compute_loss(cfg.loss.mode, loss_fn, image, raw, syn, scale, batch.has_syn,
                                          cfg.loss.text)
                scaler.scale(loss / accum).backward()
            if weights is not None:
                weights.record(step + 1, batch, info, env.rank)  # info holds the global batch
            if (micro - 1) % accum == 0:  # the logged loss is the step's: its micro-batches' mean
                step_loss = torch.zeros((), device=env.device)
            step_loss += loss.detach() / accum
            if not sync:
                continue
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad or float("inf"))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            lr = sched.get_last_lr()[0]  # the rate this step used; sched.step() sets the next one
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            step += 1
            if step % cfg.run.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                last = {"loss": float(step_loss), "lr": lr, "logit_scale": float(scale.detach()),
                        "grad_norm": float(grad_norm), "epoch": loader.epoch,
                        "trainable_fraction": trainable["trainable_fraction"],
                        "samples_per_s": (step - tick_step) * global_batch / (now - tick),
                        **{k: float(info[k]) for k in ("loss_raw", "loss_syn") if k in info}, **seen.metrics()}
                if cfg.loss.mode == "alip":
                    last.update(gate_metrics(info))
                    recorder.histogram(step, "gate/w_sample", info["w_sample"])
                recorder.log(step, last)
                tick, tick_step = now, step
            if validation.due(step, loader.epoch, micro == batches_per_epoch, step == total_steps):
                validation(step, loader.epoch, model, recorder)  # before save(): it records the best so far
            if step % cfg.run.ckpt_every == 0 or step == total_steps or micro == batches_per_epoch:
                save()
            step_times.append(time.perf_counter())
            if step >= total_steps or micro == batches_per_epoch:
                break
    recorder.close()
    if weights is not None:
        weights.save(os.path.join(run_dir, "sample_weights.pt"), env.world_size, env.is_main)
    result = {"run_dir": run_dir, "steps": step, "final": last, "step_times": step_times,
              "is_main": env.is_main, **({"best": validation.state_dict()} if validation.metric else {})}
    if env.is_main:
        export_open_clip(model, os.path.join(run_dir, "open_clip_model.pt"))
        if cfg.eval.retrieval_json:
            result["eval"] = evaluate_run(cfg, model, env.device, run_dir, validation.evals_at(step))
        if cfg.run.plots:
            from train.plot import plot_run

            plot_run(run_dir)
    return result
