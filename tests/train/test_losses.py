"""CLIP and ALIP losses (train/losses.py, train/gates.py) against references, on the CPU.

- ClipLoss against open_clip's own ClipLoss: value and gradients, every option, world size 1 and 2.
- AlipLoss against hand-computed gates (orthogonal per-sample subspaces make every logit known),
  an independent numpy re-implementation of docs/design.md §6, and ALIP's train.py gate code written out
  literally; gate state in the state dict; no gradient through the gates; `has_syn`; normalization.
- World size 2 (gloo, spawned processes) against world size 1 on the concatenated batch.

Features are float64 so that agreement can be asked to 1e-10. The distributed tests spawn one gloo
group per scenario (a module fixture, fresh free port each), run every option combination inside
it and leave the asserts to the parent; spawning costs several seconds, so one group serves many
parametrized tests. open_clip's loss.py is loaded as a standalone file (it imports only torch) so
that spawned children do not pay for importing the whole open_clip package.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
import socket
import sys
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from train.losses import AlipLoss, ClipLoss

WORLD = 2
TOL64 = dict(rtol=1e-10, atol=1e-10)
TOL32 = dict(rtol=1e-6, atol=1e-6)
CLIP_COMBOS = list(itertools.product([False, True], repeat=3))  # local_loss, gather_with_grad, cache_labels


def _load_open_clip_loss():
    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_loss_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


oc_loss = _load_open_clip_loss()


# ----------------------------------------------------------------------------------------------
# data

def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def clip_batch(seed: int, n: int, d: int = 8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (unit(torch.randn(n, d, generator=g, dtype=dtype)),
            unit(torch.randn(n, d, generator=g, dtype=dtype)))


def alip_batch(seed: int, n: int = 8, d: int = 6, dtype=torch.float64, consistent=(0, 5)):
    """Image, raw-text and synthetic-caption features; captions near their texts (a spread of
    S_tc) and identical to them for the `consistent` samples (S_tc = 1 > H_tc)."""
    g = torch.Generator().manual_seed(seed)
    raw = unit(torch.randn(n, d, generator=g, dtype=dtype))
    image = unit(raw + 0.8 * torch.randn(n, d, generator=g, dtype=dtype))
    noise = torch.linspace(0.2, 2.0, n, dtype=dtype)[:, None]
    syn = unit(raw + noise * torch.randn(n, d, generator=g, dtype=dtype))
    syn[list(consistent)] = raw[list(consistent)]
    return image, raw, syn


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads_of(loss, tensors):
    return [g.detach() for g in torch.autograd.grad(loss, tensors)]


# ----------------------------------------------------------------------------------------------
# independent references (no train.losses / train.gates code)

def ref_alip(x, t, c, scale, h, has_syn=None, momentum=0.99, gamma_s=2.0, gamma_p=2.0,
             normalize="mean"):
    """docs/design.md §6 with explicit loops in numpy float64. `h` = (H_tc, H_xt, H_xc) before the step.
    Returns (total, w_sample, w_raw, w_syn, new h)."""
    x, t, c = (np.asarray(a.detach(), np.float64) for a in (x, t, c))
    scale = float(scale)
    n = len(x)
    has = np.ones(n, bool) if has_syn is None else np.asarray(has_syn, bool)
    s_tc = np.array([t[i] @ c[i] for i in range(n)])
    s_xt = np.array([x[i] @ t[i] for i in range(n)])
    s_xc = np.array([x[i] @ c[i] for i in range(n)])
    h_tc, h_xt, h_xc = h
    h_xt = momentum * h_xt + (1 - momentum) * s_xt.mean()          # every sample
    if has.any():                                                  # samples with a caption
        h_tc = momentum * h_tc + (1 - momentum) * s_tc[has].mean()
        h_xc = momentum * h_xc + (1 - momentum) * s_xc[has].mean()
    w_s, w_t, w_c = np.ones(n), np.ones(n), np.ones(n)
    for i in range(n):
        if s_tc[i] < h_tc:
            w_t[i] = math.exp(gamma_p * (s_xt[i] - h_xt))
            w_c[i] = math.exp(gamma_p * (s_xc[i] - h_xc))
        w_s[i] = min(1.0, math.exp(gamma_s * (s_tc[i] - h_tc)))
        if not has[i]:
            w_s[i] = w_t[i] = 1.0

    def pair_loss(a, b, i):  # (CE_i2t(i) + CE_t2i(i)) / 2 over the whole batch
        row_i = [scale * (a[i] @ b[j]) for j in range(n)]
        row_t = [scale * (b[i] @ a[j]) for j in range(n)]
        lse = lambda r: max(r) + math.log(sum(math.exp(v - max(r)) for v in r))  # noqa: E731
        return ((lse(row_i) - row_i[i]) + (lse(row_t) - row_t[i])) / 2

    raw_terms = [(w_s[i] * w_t[i], pair_loss(x, t, i)) for i in range(n)]
    syn_terms = [(w_s[i] * w_c[i], pair_loss(x, c, i)) for i in range(n) if has[i]]

    def reduce(terms):
        if not terms:
            return 0.0
        total = sum(w * l for w, l in terms)
        return total / (len(terms) if normalize == "mean" else sum(w for w, _ in terms))

    return reduce(raw_terms) + reduce(syn_terms), w_s, w_t, w_c, (h_tc, h_xt, h_xc)


class AlipLiteral:
    """ALIP's train.py gate and loss code, written out as it reads there (paraphrased in the brief):
    H ← 0.01·mean(S) + 0.99·H, updated before use; weights from exp(·)**2; mean over samples."""

    def __init__(self):
        self.H_tc, self.H_xt, self.H_xc = 1.0, 1.0, 1.0

    def __call__(self, image, text, caption, logit_scale):
        with torch.no_grad():
            S_tc = (text * caption).sum(dim=1)
            S_xt = (image * text).sum(dim=1)
            S_xc = (image * caption).sum(dim=1)
            self.H_tc = 0.01 * S_tc.mean() + 0.99 * self.H_tc
            self.H_xt = 0.01 * S_xt.mean() + 0.99 * self.H_xt
            self.H_xc = 0.01 * S_xc.mean() + 0.99 * self.H_xc
            e_tc = torch.exp(S_tc - self.H_tc) ** 2
            w_sample = torch.minimum(torch.ones_like(e_tc), e_tc)
            w_raw = torch.where(e_tc < 1, torch.exp(S_xt - self.H_xt) ** 2, torch.ones_like(e_tc))
            w_caption = torch.where(e_tc < 1, torch.exp(S_xc - self.H_xc) ** 2, torch.ones_like(e_tc))
        labels = torch.arange(image.shape[0])

        def path(txt, w_pair):
            logits_per_image = logit_scale * image @ txt.t()
            logits_per_text = logit_scale * txt @ image.t()
            ce = (F.cross_entropy(logits_per_image, labels, reduction="none")
                  + F.cross_entropy(logits_per_text, labels, reduction="none")) / 2
            return (ce * w_sample * w_pair).mean()

        return path(text, w_raw) + path(caption, w_caption)


def torch_weighted(x, t, c, scale, w_s, w_t, w_c, has, normalize="mean"):
    """The ALIP total in torch with explicit log-softmax, for gradients; the weights are whatever
    is passed (constants, or differentiable tensors for the sensitivity check)."""
    def per_sample(a, b):
        logits = scale * a @ b.T
        eye = torch.eye(len(a), dtype=torch.bool)
        i2t = -(logits.log_softmax(dim=1)[eye])
        t2i = -(logits.T.log_softmax(dim=1)[eye])
        return (i2t + t2i) / 2

    def reduce(loss, w, m):
        w = w * m
        return (loss * w).sum() / (m.sum() if normalize == "mean" else w.sum())

    m = has.to(x.dtype)
    return reduce(per_sample(x, t), w_s * w_t, torch.ones_like(m)) + reduce(per_sample(x, c), w_s * w_c, m)


# ----------------------------------------------------------------------------------------------
# 1. ClipLoss against open_clip, world size 1

@pytest.mark.parametrize("local_loss,gather_with_grad,cache_labels", CLIP_COMBOS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["f64", "f32"])
def test_clip_loss_matches_open_clip_world1(local_loss, gather_with_grad, cache_labels, dtype, tol):
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels)
    ours, ref = ClipLoss(**kw), oc_loss.ClipLoss(**kw)
    for seed, n in [(1, 6), (2, 5), (3, 6)]:  # a batch-size change exercises the label cache
        image, text = clip_batch(seed, n, dtype=dtype)
        args_ours = leaves(image, text, torch.tensor(1 / 0.07, dtype=dtype))
        args_ref = leaves(image, text, torch.tensor(1 / 0.07, dtype=dtype))
        loss_ours, loss_ref = ours(*args_ours), ref(*args_ref)
        torch.testing.assert_close(loss_ours, loss_ref, **tol)
        for g_ours, g_ref in zip(grads_of(loss_ours, args_ours), grads_of(loss_ref, args_ref)):
            torch.testing.assert_close(g_ours, g_ref, **tol)
    assert set(ours(image, text, 10.0, output_dict=True)) == {"contrastive_loss"}


# ----------------------------------------------------------------------------------------------
# distributed plumbing: spawned gloo processes on localhost

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world_size, port, out_dir, scenario):
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        result = scenario(rank, world_size)
    finally:
        dist.destroy_process_group()
    result["initialized_after_teardown"] = dist.is_initialized()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_dist(scenario, world_size: int, out_dir: Path) -> list[dict]:
    """Run `scenario(rank, world_size) -> dict` in `world_size` spawned gloo processes; the per-rank
    dicts come back through files. Fails on a leaked thread in this (the parent) process."""
    before = set(threading.enumerate())
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_dist_worker, args=(world_size, _free_port(), str(out_dir), scenario),
             nprocs=world_size, join=True)
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads leaked by the spawned group: {leaked}"
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    assert not any(r["initialized_after_teardown"] for r in results)
    return results


def rows(rank, n_global, world_size=WORLD):
    per = n_global // world_size
    return slice(rank * per, (rank + 1) * per)


# Gradient relationship between rank-local gradients at world size W and the single-process
# gradient of the same loss on the concatenated batch (L = loss of the global batch, x_r = rank r's
# local features, every rank with the same local batch size):
# - gather_with_grad=True: all_gather's backward sums, over all ranks, the gradient each rank's
#   loss sends to slot r. Without local_loss every rank's loss is L itself; with local_loss
#   rank k's loss L_k is the mean over its own rows and L = (1/W)·Σ_k L_k. Either way
#   grad(x_r) = Σ_k ∂L_k/∂x_r = W · ∂L/∂x_r, and DDP's mean over ranks of the parameter grads
#   (1/W)·Σ_r W·∂L/∂x_r·∂x_r/∂θ = ∂L/∂θ recovers the single-process gradient exactly.
# - gather_with_grad=False, local_loss=False: the other ranks' slots are constants, rank r
#   computes L with only its own slot live, so grad(x_r) = ∂L/∂x_r (factor 1) and DDP's mean
#   gives (1/W)·∂L/∂θ: open_clip's behaviour, a learning-rate scale of 1/W.
# - gather_with_grad=False, local_loss=True: x_r reaches L_r only through its own rows (its slot
#   in the gathered copy is a constant); no fixed multiple of ∂L/∂x_r, so only values are checked.
# - logit_scale is not gathered: rank k's grad is ∂L_k/∂s, so the mean over ranks is ∂L/∂s in
#   all four cases.
# Loss values: without local_loss every rank's loss is L; with it the mean over ranks is L.
def feature_grad_factor(local_loss, gather_with_grad, world_size=WORLD):
    if gather_with_grad:
        return world_size
    return None if local_loss else 1


def _clip_scenario(rank, world_size):
    out = {}
    for combo in CLIP_COMBOS:
        local_loss, gather_with_grad, cache_labels = combo
        kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                  rank=rank, world_size=world_size)
        losses = {"ours": ClipLoss(**kw), "ref": oc_loss.ClipLoss(**kw)}
        for call, (seed, n) in enumerate(CLIP_DIST_CALLS):
            image, text = clip_batch(seed, n)
            sl = rows(rank, n, world_size)
            for name, fn in losses.items():
                args = leaves(image[sl], text[sl], torch.tensor(1 / 0.07, dtype=torch.float64))
                loss = fn(*args)
                out[(combo, call, name)] = (loss.detach(), *grads_of(loss, args))
    return out


CLIP_DIST_CALLS = [(11, 8), (12, 6), (13, 8)]  # (seed, global batch): sizes change, cache reused


@pytest.fixture(scope="module")
def clip_world2(tmp_path_factory):
    return run_dist(_clip_scenario, WORLD, tmp_path_factory.mktemp("clip_world2"))


@pytest.mark.dist
@pytest.mark.parametrize("local_loss,gather_with_grad,cache_labels", CLIP_COMBOS)
def test_clip_loss_matches_open_clip_world2(clip_world2, local_loss, gather_with_grad, cache_labels):
    combo = (local_loss, gather_with_grad, cache_labels)
    for rank, res in enumerate(clip_world2):
        for call in range(len(CLIP_DIST_CALLS)):
            for ours, ref in zip(res[(combo, call, "ours")], res[(combo, call, "ref")]):
                torch.testing.assert_close(ours, ref, **TOL64, msg=lambda m: f"rank {rank} call {call}: {m}")


@pytest.mark.dist
@pytest.mark.parametrize("local_loss,gather_with_grad", list(itertools.product([False, True], repeat=2)))
def test_clip_loss_world2_relates_to_world1(clip_world2, local_loss, gather_with_grad):
    """The relationship stated above, holding for open_clip (the reference) and for ours."""
    factor = feature_grad_factor(local_loss, gather_with_grad)
    for name in ("ref", "ours"):
        for call, (seed, n) in enumerate(CLIP_DIST_CALLS):
            image, text = clip_batch(seed, n)
            args = leaves(image, text, torch.tensor(1 / 0.07, dtype=torch.float64))
            loss = oc_loss.ClipLoss()(*args)
            g_image, g_text, g_scale = grads_of(loss, args)
            per_rank = [r[((local_loss, gather_with_grad, False), call, name)] for r in clip_world2]
            values = torch.stack([p[0] for p in per_rank])
            if local_loss:
                torch.testing.assert_close(values.mean(), loss.detach(), **TOL64)
            else:
                torch.testing.assert_close(values, loss.detach().expand(WORLD), **TOL64)
            torch.testing.assert_close(torch.stack([p[3] for p in per_rank]).mean(), g_scale, **TOL64)
            if factor is None:
                continue
            for rank, p in enumerate(per_rank):
                sl = rows(rank, n)
                torch.testing.assert_close(p[1], factor * g_image[sl], **TOL64)
                torch.testing.assert_close(p[2], factor * g_text[sl], **TOL64)


# ----------------------------------------------------------------------------------------------
# 2. AlipLoss, world size 1

def hand_triples(values, dims=3):
    """Sample i in its own 3-D block: t = e0, c at angle acos(S_tc) from t, x with the given
    <x,t> and <x,c>. Different samples are orthogonal, so every off-diagonal logit is 0."""
    n = len(values)
    x, t, c = (torch.zeros(n, dims * n, dtype=torch.float64) for _ in range(3))
    for i, (s_tc, s_xt, s_xc) in enumerate(values):
        o = dims * i
        sin = math.sqrt(1 - s_tc ** 2)
        y = 0.0 if sin == 0 else (s_xc - s_xt * s_tc) / sin
        t[i, o] = 1.0
        c[i, o:o + 2] = torch.tensor([s_tc, sin], dtype=torch.float64)
        x[i, o:o + 3] = torch.tensor([s_xt, y, math.sqrt(1 - s_xt ** 2 - y ** 2)], dtype=torch.float64)
    return x, t, c


HAND = [(1.0, 0.5, 0.5),    # S_tc = 1 > H_tc: consistent, pair weights 1
        (0.5, 0.5, 0.5),    # cos 60°
        (0.0, 0.8, 0.0),
        (-0.5, 0.0, 0.5)]


def test_alip_hand_computed_gates_and_loss():
    x, t, c = hand_triples(HAND)
    assert torch.allclose((t * c).sum(1), torch.tensor([1.0, 0.5, 0.0, -0.5], dtype=torch.float64))
    assert torch.allclose((x * t).sum(1), torch.tensor([0.5, 0.5, 0.8, 0.0], dtype=torch.float64))
    assert torch.allclose((x * c).sum(1), torch.tensor([0.5, 0.5, 0.0, 0.5], dtype=torch.float64))
    scale = 10.0
    loss_fn = AlipLoss()

    # Logits are scale·S on the diagonal and 0 elsewhere: (CE_i2t + CE_t2i)/2 = log(1 + 3·e^(−scale·S)).
    def ce(s):
        return math.log(1 + 3 * math.exp(-scale * s))

    s_tc, s_xt, s_xc = [1.0, 0.5, 0.0, -0.5], [0.5, 0.5, 0.8, 0.0], [0.5, 0.5, 0.0, 0.5]
    # step 1: means of S are 0.25, 0.45, 0.375 → H = 0.99·1 + 0.01·mean
    # step 2 (same batch): H = 0.99·H1 + 0.01·mean
    for h_tc, h_xt, h_xc in [(0.9925, 0.9945, 0.99375), (0.985075, 0.989055, 0.9875625)]:
        loss, info = loss_fn(x, t, c, scale)
        for key, want in [("h_tc", h_tc), ("h_xt", h_xt), ("h_xc", h_xc)]:
            assert info[key].item() == pytest.approx(want, abs=1e-12), key
        w_s = [1.0] + [math.exp(2 * (s - h_tc)) for s in s_tc[1:]]
        w_t = [1.0] + [math.exp(2 * (s - h_xt)) for s in s_xt[1:]]
        w_c = [1.0] + [math.exp(2 * (s - h_xc)) for s in s_xc[1:]]
        for key, want in [("w_sample", w_s), ("w_raw", w_t), ("w_syn", w_c)]:
            assert info[key].shape == (4,), key
            np.testing.assert_allclose(info[key].numpy(), want, rtol=1e-12, err_msg=key)
        want = (sum(w_s[i] * w_t[i] * ce(s_xt[i]) for i in range(4)) / 4
                + sum(w_s[i] * w_c[i] * ce(s_xc[i]) for i in range(4)) / 4)
        assert loss.item() == pytest.approx(want, rel=1e-12)


def test_alip_state_dict_round_trip():
    loss_fn = AlipLoss()
    sd = loss_fn.state_dict()
    assert {"gates.h_tc", "gates.h_xt", "gates.h_xc"} <= set(sd)
    assert all(sd[k].item() == 1.0 for k in ("gates.h_tc", "gates.h_xt", "gates.h_xc"))
    for seed in (1, 2):
        loss_fn(*alip_batch(seed), 1 / 0.07)
    sd = loss_fn.state_dict()
    assert all(sd[k].item() != 1.0 for k in ("gates.h_tc", "gates.h_xt", "gates.h_xc"))
    restored = AlipLoss()
    restored.load_state_dict(sd)
    for k in sd:
        assert torch.equal(restored.state_dict()[k], sd[k])
    batch = alip_batch(3)
    (loss_a, info_a), (loss_b, info_b) = loss_fn(*batch, 1 / 0.07), restored(*batch, 1 / 0.07)
    assert torch.equal(loss_a, loss_b)
    for key in ("w_sample", "w_raw", "w_syn", "h_tc", "h_xt", "h_xc"):
        assert torch.equal(info_a[key], info_b[key]), key


def test_alip_h_init_first_batch_starts_at_the_batch_means():
    """loss.h_init=first_batch: the first step's means are that batch's (no cold start from 1.0);
    later steps follow ALIP's update; the reference with those means gives the same loss."""
    image, raw, syn = alip_batch(4)
    loss_fn = AlipLoss(h_init="first_batch")
    loss, info = loss_fn(image, raw, syn, 1 / 0.07)
    s_tc, s_xt, s_xc = ((a * b).sum(-1).mean().item() for a, b in ((raw, syn), (image, raw), (image, syn)))
    assert [info[k].item() for k in ("h_tc", "h_xt", "h_xc")] == pytest.approx([s_tc, s_xt, s_xc], abs=1e-12)
    want, *_ = ref_alip(image, raw, syn, 1 / 0.07, (s_tc, s_xt, s_xc), momentum=0.0)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    batch = alip_batch(5)
    h = tuple(info[k].item() for k in ("h_tc", "h_xt", "h_xc"))
    loss, info = loss_fn(*batch, 1 / 0.07)
    want, _, _, _, h_new = ref_alip(*batch, 1 / 0.07, h)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    assert [info[k].item() for k in ("h_tc", "h_xt", "h_xc")] == pytest.approx(list(h_new), abs=1e-12)
    restored = AlipLoss(h_init="first_batch")
    restored.load_state_dict(loss_fn.state_dict())  # h_started travels: a resumed run keeps its means
    assert restored.gates.h_started and restored.gates.h_tc == loss_fn.gates.h_tc
    with pytest.raises(ValueError, match="h_init"):
        AlipLoss(h_init="zero")


HAS_SYN = torch.tensor([True, False, True, True, False, True, True, False])


@pytest.mark.parametrize("normalize", ["mean", "weight_sum"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["all_syn", "has_syn"])
@pytest.mark.parametrize("momentum,gamma_s,gamma_p", [(0.99, 2.0, 2.0), (0.9, 1.5, 3.0)])
def test_alip_matches_reference(normalize, with_mask, momentum, gamma_s, gamma_p):
    """Three steps against the numpy re-implementation: loss, per-sample weights, running means."""
    loss_fn = AlipLoss(momentum=momentum, gamma_sample=gamma_s, gamma_pair=gamma_p, normalize=normalize)
    h = (1.0, 1.0, 1.0)
    for seed in (1, 2, 3):
        x, t, c = alip_batch(seed)  # captions of has_syn False samples arbitrary: must not count
        has = HAS_SYN if with_mask else None
        loss, info = loss_fn(x, t, c, 1 / 0.07, has_syn=has)
        want, w_s, w_t, w_c, h = ref_alip(x, t, c, 1 / 0.07, h, has, momentum, gamma_s, gamma_p, normalize)
        assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-10)
        np.testing.assert_allclose(info["w_sample"].numpy(), w_s, rtol=1e-10)
        np.testing.assert_allclose(info["w_raw"].numpy(), w_t, rtol=1e-10)
        mask = HAS_SYN.numpy() if with_mask else slice(None)
        np.testing.assert_allclose(info["w_syn"].numpy()[mask], w_c[mask], rtol=1e-10)
        np.testing.assert_allclose([info[k].item() for k in ("h_tc", "h_xt", "h_xc")], h, rtol=1e-12)
        assert 0 < (info["w_sample"] < 1).sum() < len(x)  # both sides of the min are exercised
        assert 0 < (info["w_raw"] != 1).sum() < len(x)    # both sides of S_tc < H_tc


def test_alip_defaults_reproduce_alip_train_py():
    ours, literal = AlipLoss(), AlipLiteral()
    for seed in (1, 2, 3, 4):
        x, t, c = alip_batch(seed)
        scale = torch.tensor(1 / 0.07, dtype=torch.float64)
        loss, info = ours(x, t, c, scale)
        want = literal(x, t, c, scale)
        assert abs(loss.item() - want.item()) < 1e-10
        for key, h in [("h_tc", literal.H_tc), ("h_xt", literal.H_xt), ("h_xc", literal.H_xc)]:
            assert abs(info[key].item() - float(h)) < 1e-12


@pytest.mark.parametrize("placeholder", ["raw_text", "arbitrary"])
def test_alip_has_syn(placeholder):
    """The loader puts the raw text where a sample has no synthetic caption (then S_tc = 1 ≥ H_tc
    and the gates are 1 anyway); arbitrary vectors there show that the mask itself does it."""
    n = len(HAS_SYN)
    x, t, c = alip_batch(7, consistent=())
    if placeholder == "raw_text":
        c = torch.where(HAS_SYN[:, None], c, t)
    loss, info = AlipLoss()(x, t, c, 1 / 0.07, has_syn=HAS_SYN)
    off = ~HAS_SYN
    s_tc, s_xt, s_xc = (t * c).sum(1), (x * t).sum(1), (x * c).sum(1)
    if placeholder == "arbitrary":  # unmasked, these samples would get weights ≠ 1
        assert torch.all(s_tc[off] < info["h_tc"]) and torch.all(s_xt[off] != info["h_xt"])
    assert torch.all(info["w_sample"][off] == 1) and torch.all(info["w_raw"][off] == 1)
    assert info["h_tc"].item() == pytest.approx(0.99 + 0.01 * s_tc[HAS_SYN].mean().item(), abs=1e-14)
    assert info["h_xc"].item() == pytest.approx(0.99 + 0.01 * s_xc[HAS_SYN].mean().item(), abs=1e-14)
    assert info["h_xt"].item() == pytest.approx(0.99 + 0.01 * s_xt.mean().item(), abs=1e-14)
    # Manual total: raw path over all n, synthetic path only over the samples with a caption.
    scale = 1 / 0.07
    w_s, w_t, w_c = info["w_sample"], info["w_raw"], info["w_syn"]

    def ce_pair(a, b):
        lg = scale * a @ b.T
        return torch.stack([(torch.logsumexp(lg[i], 0) + torch.logsumexp(lg[:, i], 0)) / 2 - lg[i, i]
                            for i in range(n)])

    raw, syn = ce_pair(x, t), ce_pair(x, c)
    want = (w_s * w_t * raw).sum() / n + (w_s * w_c * syn)[HAS_SYN].sum() / HAS_SYN.sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert info["loss_syn"].item() == pytest.approx(((w_s * w_c * syn)[HAS_SYN].sum() / HAS_SYN.sum()).item(),
                                                    rel=1e-12)

    # No sample with a caption: no synthetic term at all, H_tc and H_xc stay put.
    none = torch.zeros(n, dtype=torch.bool)
    args = leaves(x, t, t)
    loss, info = AlipLoss()(*args, scale, has_syn=none)
    assert info["loss_syn"].item() == 0.0
    assert info["h_tc"].item() == 1.0 and info["h_xc"].item() == 1.0
    assert info["h_xt"].item() == pytest.approx(0.99 + 0.01 * s_xt.mean().item(), abs=1e-14)
    assert loss.item() == pytest.approx(raw.mean().item(), rel=1e-12)
    loss.backward()  # still differentiable
    assert args[2].grad is not None and torch.all(args[2].grad == 0)


@pytest.mark.parametrize("normalize", ["mean", "weight_sum"])
def test_alip_no_gradient_through_gates(normalize):
    x, t, c = alip_batch(5)
    has = HAS_SYN
    c = torch.where(has[:, None], c, t)
    args = leaves(x, t, c, torch.tensor(1 / 0.07, dtype=torch.float64))
    loss, info = AlipLoss(normalize=normalize)(*args[:3], args[3], has_syn=has)
    for key in ("w_sample", "w_raw", "w_syn"):
        assert not info[key].requires_grad
    got = grads_of(loss, args)

    ref_args = leaves(x, t, c, torch.tensor(1 / 0.07, dtype=torch.float64))
    consts = [info[k].detach().to(torch.float64) for k in ("w_sample", "w_raw", "w_syn")]
    ref = torch_weighted(*ref_args, *consts, has, normalize)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    for g, r in zip(got, grads_of(ref, ref_args)):
        torch.testing.assert_close(g, r, **TOL64)

    # The check can see a leak: with the weights as functions of the features, the grads differ.
    live = leaves(x, t, c, torch.tensor(1 / 0.07, dtype=torch.float64))
    xi, ti, ci, s = live
    h_tc, h_xt, h_xc = info["h_tc"], info["h_xt"], info["h_xc"]
    s_tc, s_xt, s_xc = (ti * ci).sum(1), (xi * ti).sum(1), (xi * ci).sum(1)
    inc = s_tc.detach() < h_tc
    w_s = torch.where(has, torch.exp(2 * (s_tc - h_tc)).clamp(max=1), torch.ones_like(s_tc))
    w_t = torch.where(has & inc, torch.exp(2 * (s_xt - h_xt)), torch.ones_like(s_tc))
    w_c = torch.where(inc, torch.exp(2 * (s_xc - h_xc)), torch.ones_like(s_tc))
    leaky = torch_weighted(*live, w_s, w_t, w_c, has, normalize)
    assert leaky.item() == pytest.approx(ref.item(), rel=1e-10)
    assert max((g - r).abs().max().item() for g, r in zip(got, grads_of(leaky, live))) > 1e-3


def test_alip_rejects_unknown_normalize():
    with pytest.raises(ValueError):
        AlipLoss(normalize="sum")


# ----------------------------------------------------------------------------------------------
# 3. AlipLoss, world size 2 against world size 1 on the concatenated batch

ALIP_COMBOS = [  # local_loss, gather_with_grad, normalize
    *((ll, gwg, "mean") for ll, gwg in itertools.product([False, True], repeat=2)),
    (False, True, "weight_sum"), (False, False, "weight_sum")]
ALIP_SEEDS = (21, 22)       # two steps: the gate state must evolve the same way
ALIP_N = 8
# One sample without a caption on each rank (rows 0-3 and 4-7), so that every rank has the same
# number of synthetic-path samples and the local_loss mean over ranks is the global mean.
ALIP_HAS_SYN = torch.tensor([True, True, False, True, True, True, True, False])


def alip_global(seed):
    x, t, c = alip_batch(seed, ALIP_N)
    return x, t, torch.where(ALIP_HAS_SYN[:, None], c, t)


def _alip_scenario(rank, world_size):
    out = {}
    sl = rows(rank, ALIP_N, world_size)
    for combo in ALIP_COMBOS:
        local_loss, gather_with_grad, normalize = combo
        loss_fn = AlipLoss(normalize=normalize, local_loss=local_loss, gather_with_grad=gather_with_grad,
                           rank=rank, world_size=world_size)
        for step, seed in enumerate(ALIP_SEEDS):
            x, t, c = alip_global(seed)
            args = leaves(x[sl], t[sl], c[sl], torch.tensor(1 / 0.07, dtype=torch.float64))
            loss, info = loss_fn(*args, has_syn=ALIP_HAS_SYN[sl])
            out[(combo, step)] = dict(loss=loss.detach(), grads=grads_of(loss, args),
                                      info={k: v.detach() for k, v in info.items()})
    return out


@pytest.fixture(scope="module")
def alip_world2(tmp_path_factory):
    return run_dist(_alip_scenario, WORLD, tmp_path_factory.mktemp("alip_world2"))


@pytest.mark.dist
@pytest.mark.parametrize("local_loss,gather_with_grad,normalize", ALIP_COMBOS)
def test_alip_world2_equals_world1(alip_world2, local_loss, gather_with_grad, normalize):
    combo = (local_loss, gather_with_grad, normalize)
    single = AlipLoss(normalize=normalize)
    factor = feature_grad_factor(local_loss, gather_with_grad)
    for step, seed in enumerate(ALIP_SEEDS):
        args = leaves(*alip_global(seed), torch.tensor(1 / 0.07, dtype=torch.float64))
        loss, info = single(*args, has_syn=ALIP_HAS_SYN)
        g_x, g_t, g_c, g_s = grads_of(loss, args)
        per_rank = [r[(combo, step)] for r in alip_world2]
        values = torch.stack([p["loss"] for p in per_rank])
        if local_loss:
            torch.testing.assert_close(values.mean(), loss.detach(), **TOL64)
        else:
            torch.testing.assert_close(values, loss.detach().expand(WORLD), **TOL64)
        torch.testing.assert_close(torch.stack([p["grads"][3] for p in per_rank]).mean(), g_s, **TOL64)
        for rank, p in enumerate(per_rank):
            for key in ("w_sample", "w_raw", "w_syn", "syn_mask", "h_tc", "h_xt", "h_xc"):
                torch.testing.assert_close(p["info"][key], info[key], **TOL64,
                                           msg=lambda m: f"step {step} rank {rank} {key}: {m}")
            if factor is None:
                continue
            sl = rows(rank, ALIP_N)
            for got, want in zip(p["grads"][:3], (g_x, g_t, g_c)):
                torch.testing.assert_close(got, factor * want[sl], **TOL64,
                                           msg=lambda m: f"step {step} rank {rank}: {m}")
