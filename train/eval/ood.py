"""Out-of-distribution retrieval (ELIP's protocol, after Qiu et al., "Benchmarking robustness of
multimodal image-text models under distribution shift", 2022): the Karpathy-style retrieval test
re-run with corrupted images or perturbed captions at severities 1-5 (MM_Robustness's sets, made by
`imagecorruptions` and `nlpaug`: train/eval/ood_sets.py), plus the evidential uncertainty u = K / S
(train/variants/evidential.py) as ELIP's evaluation computes it: α = exp(100·cos) + 1, no clamp, K = the
candidates. Reported: the mean u over the queries whose top-1 is right and over those whose top-1
is wrong (ELIP's figure; its code reports the right ones), the mean over all, and the AUROC of u
for "the top-1 candidate is wrong" (ranked by log u: exact where u underflows).

Image→text u comes in two kinds, each under its own keys: `*_u_i2t` is ELIP's statistic (the
default; heliossun/ELIP train_retrieval.py `compute_entropy`): K = the number of images N, the
candidates one caption per image drawn with the seed, for every image but the last (the reference
builds `i*5 + randint(0, 4)` for i < N − 1), so u = N / Σ over N − 1 captions and may reach
N / (N − 1); `*_u_i2t_all` (`i2t_u="all"` or `"both"`) takes every caption as a candidate, K = their
number. Right and wrong are the full retrieval's top-1 in both, as the reference's ranks are.
Text→image u is the same in both: K = N images, all candidates.

- Image corruptions act on the decoded uint8 image at its own resolution, before the eval transform
  (resize, centre crop, normalise), as MM_Robustness corrupts the dataset's original images; each
  image is seeded by (seed, corruption, severity, index).
- Text perturbations are seeded per caption by (seed, perturbation, severity, caption index).
- Severity 0 is the identity: its numbers are the clean run's.
- Presets: `full` (every set, ood_sets.CORRUPTIONS) and `elip` (the subset ELIP reports).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from pipelines.backends.torch_loader import torchvision_transform
from pipelines.augment.transforms import AugmentSpec
from train.eval.evaluate import (EvalConfigError, ImageFiles, RetrievalEvalConfig, encode_images, encode_texts,
                            retrieval_metrics)
from train.variants.evidential import EVIDENTIAL_SCALE, log_uncertainty
from train.eval.noise_eval import auc
from train.eval.ood_sets import (CORRUPTIONS, IMAGE_CORRUPTIONS, LEFT_OUT, PRESETS, MissingExtra, corrupt, mix_seed,
                            perturb_text, require)

METRIC_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum",
               "mean_u_i2t", "u_right_i2t", "u_wrong_i2t", "auroc_u_i2t",
               "mean_u_t2i", "u_right_t2i", "u_wrong_t2i", "auroc_u_t2i")
# i2t_u="all" / "both": the all-captions image→text u, beside (both) or instead of (all) ELIP's
ALL_CAPTION_KEYS = ("mean_u_i2t_all", "u_right_i2t_all", "u_wrong_i2t_all", "auroc_u_i2t_all")
I2T_U = {"reference": "ELIP's: K = images, one caption per image drawn with the seed, the last image dropped",
         "all": "every caption a candidate, K = captions", "both": "both, ELIP's as *_i2t, every caption as *_i2t_all"}
_CHUNK = 1024  # uncertainty rows at once: the [Q, K] evidence of COCO-5k x 25k need not fit at once


def _as_is(image: Image.Image) -> Image.Image:  # module level: ImageFiles pickles to workers
    return image


@dataclass
class CorruptedFiles(torch.utils.data.Dataset):
    """ImageFiles' decoded image i, corrupted with seed mix_seed(seed, name, severity, i), then the
    eval transform. name None or severity 0: the clean pixels, untouched."""

    paths: Sequence[str]
    transform: Callable[[Image.Image], torch.Tensor]
    name: str | None = None
    severity: int = 0
    seed: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = ImageFiles(self.paths, _as_is)[i]  # its decode and its one-line error for a bad file
        if self.name and self.severity:
            x = corrupt(np.asarray(image.convert("RGB")), self.name, self.severity,
                        mix_seed(self.seed, self.name, self.severity, i))
            image = Image.fromarray(x)
        return self.transform(image)


# ------------------------------------------------------------------ metrics

def _numpy(x) -> np.ndarray:
    return x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def auroc(scores, positive) -> float:
    """Rank AUROC (Mann-Whitney U, ties counting half) of `scores` for the boolean `positive`;
    NaN when either class is empty (e.g. a model that is never wrong)."""
    s, p = _numpy(scores).astype(np.float64), _numpy(positive).astype(bool)
    if p.all() or not p.any():
        return float("nan")
    return auc(s[p], s[~p])


def reference_i2t_candidates(text_to_image: Sequence[int], seed: int = 0) -> list[int]:
    """The caption indices ELIP's image→text u is computed over: one of each image's captions,
    drawn uniformly with `seed`, for images 0 … N − 2 (the reference's `compute_entropy` loops
    `range(N − 1)`: the last image has no candidate). The draw depends on the seed and the caption
    counts only, so every corruption of a test set scores the same captions."""
    t2i = np.asarray(text_to_image, dtype=np.int64)
    order = np.argsort(t2i, kind="stable")
    n = int(t2i.max()) + 1 if t2i.size else 0
    starts = np.searchsorted(t2i[order], np.arange(n + 1))
    rng = np.random.default_rng(seed)
    return [int(order[starts[i] + rng.integers(starts[i + 1] - starts[i])]) for i in range(n - 1)]


def ood_metrics(img: torch.Tensor, txt: torch.Tensor, text_to_image: Sequence[int],
                logit_scale: float = EVIDENTIAL_SCALE, per_query: dict | None = None,
                i2t_u: str = "reference", seed: int = 0) -> dict[str, float]:
    """retrieval_metrics of unit-norm features plus, per direction, the uncertainty of the queries
    from logits `logit_scale`·cos (unclamped): its mean over all queries, over those whose top-1 is
    right and over those whose top-1 is wrong (NaN when there are none), and its AUROC for a wrong
    top-1. Top-1 is torch's argmax, the first maximum: the tie rule of retrieval_metrics, so
    1 - share wrong = R@1. `i2t_u` (I2T_U): which image→text u, ELIP's (`*_u_i2t`, candidates
    drawn with `seed`) and/or the all-captions one (`*_u_i2t_all`). `per_query` (a dict) receives
    every query's u and whether its top-1 is wrong, per direction and kind."""
    if i2t_u not in I2T_U:
        raise EvalConfigError(f"i2t_u: {i2t_u!r} is not one of {', '.join(I2T_U)}")
    sim = img @ txt.T
    out = retrieval_metrics(sim, text_to_image)
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=sim.device)
    wrong = {"i2t": t2i[sim.argmax(1)] != torch.arange(sim.shape[0], device=sim.device),
             "t2i": sim.argmax(0) != t2i}
    kinds = []  # (key suffix, direction, [Q, C] similarities, K)
    if i2t_u in ("reference", "both"):
        chosen = torch.as_tensor(reference_i2t_candidates(text_to_image, seed), dtype=torch.long, device=sim.device)
        kinds.append(("i2t", "i2t", sim[:, chosen], sim.shape[0]))
    if i2t_u in ("all", "both"):
        kinds.append(("i2t_all", "i2t", sim, None))
    kinds.append(("t2i", "t2i", sim.T, None))
    for key, d, rows, k in kinds:
        if rows.shape[1] == 0:  # one image: ELIP's statistic has no candidate
            log_u = torch.full((rows.shape[0],), math.nan, dtype=torch.float64, device=sim.device)
        else:  # float64 before the scale: an error of 1e-7 in 100·cos would be one of 1e-5 in u
            log_u = torch.cat([log_uncertainty(logit_scale * rows[s:s + _CHUNK].double(), k)
                               for s in range(0, rows.shape[0], _CHUNK)])
        u = log_u.exp()
        out[f"mean_u_{key}"] = u.mean().item()
        out[f"u_right_{key}"] = u[~wrong[d]].mean().item() if (~wrong[d]).any() else float("nan")
        out[f"u_wrong_{key}"] = u[wrong[d]].mean().item() if wrong[d].any() else float("nan")
        out[f"auroc_u_{key}"] = auroc(log_u, wrong[d])
        if per_query is not None:
            per_query[f"u_{key}"], per_query[f"wrong_{d}"] = u.cpu().tolist(), wrong[d].cpu().tolist()
    return out


# ------------------------------------------------------------------ the run

@torch.no_grad()
def run_ood(model, karpathy_json: str, images_root: str | None, image_size: int, device, corruptions=None,
            severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0, scale: float | None = EVIDENTIAL_SCALE,
            batch_size: int = 64,
            workers: int = 0, amp: bool = False, caption_prefix: str = "", progress: bool = True,
            per_query: dict | None = None, i2t_u: str = "reference") -> dict:
    """{"clean": {0: metrics}, corruption: {severity: metrics}} (ood_metrics' keys) for every name
    of `corruptions` (default: the `full` preset, ood_sets.CORRUPTIONS). `model`: open_clip's or the trainer's DualPathCLIP (DDP
    unwrapped here); clean text features serve every image corruption and clean image features every
    text perturbation. One progress line per run to stderr unless not `progress`. `per_query` (a
    dict) receives the clean run's per-query uncertainty (ood_metrics). `scale`: the uncertainty's
    logit scale (ELIP's 100), None for the model's exp(logit_scale). `i2t_u`: which image→text u
    (ood_metrics; ELIP's candidates drawn with `seed`)."""
    names = list(CORRUPTIONS if corruptions is None else corruptions)
    bad = [n for n in names if n not in CORRUPTIONS] + [str(s) for s in severities if s not in range(6)]
    if bad:
        raise EvalConfigError(f"unknown OOD corruption or severity {bad} (corruptions: {', '.join(CORRUPTIONS)}; "
                              "severities 0-5)")
    try:
        require(names)
    except MissingExtra as e:
        raise EvalConfigError(str(e)) from None
    cfg = RetrievalEvalConfig("ood", karpathy_json=karpathy_json, images_root=images_root, image_size=image_size,
                              batch_size=batch_size, workers=workers, amp=amp)
    paths, captions = cfg.karpathy_images()
    texts = [t for caps in captions for t in caps]
    text_to_image = [i for i, caps in enumerate(captions) for _ in caps]
    device, model = torch.device(device), getattr(model, "module", model)
    transform = torchvision_transform(AugmentSpec(image_size, train=False))  # RetrievalEvaluator's own

    def images(name=None, severity=0):
        data = CorruptedFiles(paths, transform, name, severity, seed)
        return encode_images(model, torch.utils.data.DataLoader(data, batch_size, num_workers=workers), device, amp)

    def encode(captions):
        return encode_texts(model, [caption_prefix + t for t in captions], device, batch_size, amp)

    def say(name, severity, m, t0):
        if progress:
            print(f"ood: {name} s{severity}: i2t R@1 {m['i2t_R@1']:.1f} t2i R@1 {m['t2i_R@1']:.1f} "
                  f"rsum {m['rsum']:.1f} ({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)

    was_training = model.training  # the trainer may call this mid-run: give its mode back
    model.eval()
    try:
        scale = float(model.logit_scale.exp()) if scale is None else scale
        t0 = time.time()
        img, txt = images(), encode(texts)
        results = {"clean": {0: ood_metrics(img, txt, text_to_image, scale, per_query, i2t_u, seed)}}
        say("clean", 0, results["clean"][0], t0)
        for name in names:
            results[name] = {}
            for s in severities:
                t0 = time.time()
                if s == 0:
                    m = dict(results["clean"][0])
                elif name in IMAGE_CORRUPTIONS:
                    m = ood_metrics(images(name, s), txt, text_to_image, scale, i2t_u=i2t_u, seed=seed)
                else:
                    changed = [perturb_text(t, name, s, mix_seed(seed, name, s, i)) for i, t in enumerate(texts)]
                    m = ood_metrics(img, encode(changed), text_to_image, scale, i2t_u=i2t_u, seed=seed)
                results[name][s] = m
                say(name, s, m, t0)
    finally:
        model.train(was_training)
    return results


# ------------------------------------------------------------------ reporting

def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _cell(v, digits: int | str) -> str:
    """`digits` after the point, or a format spec (u: ".3g", its values reach 1e-40 and below)."""
    spec = digits if isinstance(digits, str) else f".{digits}f"
    return "–" if v is None or math.isnan(v) else f"{v:{spec}}"


def _by_severity(results: Mapping) -> dict[str, dict[int, dict]]:
    """Severity keys as ints, whether the results come from run_ood or from its JSON."""
    return {name: {int(s): m for s, m in runs.items()} for name, runs in results.items()}


def to_markdown_ood(results: Mapping) -> str:
    """ELIP's table: per corruption the mean over its severities >= 1 of i2t / t2i R@1, RSUM, the
    mean u of right and of wrong top-1s and the uncertainty AUROCs (clean: its one run); then every
    run's numbers. The image→text u columns name their kind: "(ELIP)" for ELIP's statistic,
    "(all captions)" for the all-captions one; only the kinds the results hold are shown."""
    res = _by_severity(results)
    held = {k for runs in res.values() for m in runs.values() for k in m}
    cols = [("i2t_R@1", "I2T R@1", 1), ("t2i_R@1", "T2I R@1", 1), ("rsum", "RSUM", 1),
            ("u_right_i2t", "u right I2T (ELIP)", ".3g"), ("u_wrong_i2t", "u wrong I2T (ELIP)", ".3g"),
            ("auroc_u_i2t", "AUROC u I2T (ELIP)", 3),
            ("u_right_i2t_all", "u right I2T (all captions)", ".3g"),
            ("u_wrong_i2t_all", "u wrong I2T (all captions)", ".3g"), ("auroc_u_i2t_all", "AUROC u I2T (all captions)", 3),
            ("u_right_t2i", "u right T2I", ".3g"), ("u_wrong_t2i", "u wrong T2I", ".3g"), ("auroc_u_t2i", "AUROC u T2I", 3)]
    cols = [c for c in cols if c[0] in held]
    keys = [k for k in (*METRIC_KEYS, *ALL_CAPTION_KEYS) if k in held]
    lines = ["| corruption | kind | " + " | ".join(h for _, h, _ in cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for name, runs in res.items():
        used = [m for s, m in runs.items() if s >= 1] or list(runs.values())
        kind = "clean" if name == "clean" else "image" if name in IMAGE_CORRUPTIONS else "text"
        lines.append(f"| {name} | {kind} | " + " | ".join(_cell(_mean(m.get(k) for m in used), d) for k, _, d in cols)
                     + " |")
    lines += ["", "| corruption | severity | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for name, runs in res.items():
        for s, m in sorted(runs.items()):
            cells = [_cell(m.get(k), 3 if k.startswith("auroc") else ".3g" if "u_" in k else 1) for k in keys]
            lines.append(f"| {name} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ood(results: Mapping, path: str) -> None:
    """Mean R@1 ((i2t + t2i) / 2) against severity, 0 being the clean run: one line per corruption,
    images solid, text dashed. Agg canvas on a bare Figure: no pyplot state, no global backend."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = _by_severity(results)
    clean = res.get("clean", {}).get(0)
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = colormaps["tab20"].colors + colormaps["tab20b"].colors  # 28 lines: tab10 would repeat colours
    for i, (name, runs) in enumerate((n, r) for n, r in res.items() if n != "clean"):
        points = {**({0: clean} if clean else {}), **runs}
        xs = sorted(points)
        ax.plot(xs, [(points[s]["i2t_R@1"] + points[s]["t2i_R@1"]) / 2 for s in xs], marker="o", markersize=3,
                linestyle="-" if name in IMAGE_CORRUPTIONS else "--", color=colours[i % len(colours)], label=name)
    ax.set(xlabel="severity", ylabel="mean R@1 (i2t, t2i) %", xticks=range(6), title="Retrieval under corruption")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_ood(results: Mapping, out_dir: str) -> tuple[str, str, str]:
    """ood.md (to_markdown_ood), ood.json (NaN as null: strict JSON) and ood.png (plot_ood) in
    `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md, js, png = (os.path.join(out_dir, f"ood.{ext}") for ext in ("md", "json", "png"))
    Path(md).write_text(to_markdown_ood(results))
    clean = {name: {str(s): {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in m.items()}
                    for s, m in runs.items()} for name, runs in results.items()}
    Path(js).write_text(json.dumps(clean, indent=2))
    plot_ood(results, png)
    return md, js, png


# ------------------------------------------------------------------ lip-eval --ood

def _corruption_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CORRUPTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {bad or 'empty list'}; choose from {','.join(CORRUPTIONS)}")
    return names


def _severity_list(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 <= s <= 5 for s in values):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated severities in 0-5")
    return values


def _scale(text: str) -> float | None:
    from train.config import evidential_scale  # loss.evidential_scale's rule
    try:
        return evidential_scale(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_ood_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("OOD retrieval (train/eval/ood.py)")
    g.add_argument("--ood", action="store_true", help="re-run --retrieval-json under corruptions")
    g.add_argument("--ood-preset", choices=sorted(PRESETS), default="full",
                   help="full: every set (19 image corruptions, 9 text perturbations); elip: the subset ELIP "
                        f"reports ({','.join(PRESETS['elip'])})")
    g.add_argument("--ood-corruptions", type=_corruption_list,
                   help=f"instead of the preset, any of: {','.join(CORRUPTIONS)}")
    g.add_argument("--ood-severities", type=_severity_list, default=[1, 2, 3, 4, 5], help="default 1,2,3,4,5")
    g.add_argument("--ood-out", help="folder for ood.md/.json/.png (default: ood/ beside --out, else ./ood)")
    g.add_argument("--ood-seed", type=int, default=0)
    g.add_argument("--ood-i2t-u", choices=list(I2T_U), default="reference",
                   help="the image→text uncertainty: reference (ELIP's compute_entropy: K = images, one caption "
                        "per image drawn with --ood-seed, the last image dropped; keys *_u_i2t), all (every "
                        "caption, K = captions; keys *_u_i2t_all) or both")
    g.add_argument("--evidential-scale", type=_scale, default=EVIDENTIAL_SCALE,
                   help="the uncertainty's logit scale: 100 (ELIP) or 'learned' (the model's); never clamped")


def main_ood(a: argparse.Namespace, model, configs: Sequence) -> tuple[str, str, str]:
    """lip-eval's --ood: run_ood on its retrieval JSON config, written and printed."""
    cfg = next((c for c in configs if getattr(c, "karpathy_json", None)), None)
    if cfg is None:
        raise EvalConfigError("--ood needs --retrieval-json (a Karpathy-style test JSON)")
    per_query: dict = {}
    names = a.ood_corruptions or PRESETS[a.ood_preset]
    results = run_ood(model, cfg.karpathy_json, cfg.images_root, cfg.image_size, a.device, names,
                      a.ood_severities, a.ood_seed, a.evidential_scale, cfg.batch_size, cfg.workers, cfg.amp,
                      cfg.caption_prefix, per_query=per_query, i2t_u=a.ood_i2t_u)
    out = a.ood_out or os.path.join(os.path.dirname(a.out) if a.out else ".", "ood")
    paths = write_ood(results, out)
    Path(out, "uncertainty_per_query.json").write_text(json.dumps(per_query))  # clean test, u = K / S
    print(f"wrote {', '.join(paths)}")
    print(f"image→text u ({a.ood_i2t_u}): {I2T_U[a.ood_i2t_u]}")
    print("left out (they need downloaded models or word lists): "
          + "; ".join(f"{k}: {v}" for k, v in LEFT_OUT.items()))
    print(to_markdown_ood(results).split("\n\n")[0])
    return paths
