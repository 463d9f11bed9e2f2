"""`make demo`: the whole story on a small synthetic dataset, with nothing from outside.

synthetic noisy dataset → shards in every format (verified) → train clip-raw, clip-both and alip
for the same steps, seed and batches → evaluate each on the clean held-out split (retrieval), and
the gates on the training set's noise labels (AUC, post hoc and as trained) → one results table,
mean ± std over seeds when several are given (`--seeds 0 1 2`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from pipelines.formats.registry import FORMATS
from tools.demo import make_synthetic
from tools.convert import verify_shards
from tools.convert.reaper import reaped

# Training variants: a name and the overrides it adds to configs/demo.yaml. The alip-* ones are
# the cold-start and normalization options of the gates (the noise sweep reports them).
VARIANTS = {
    "clip-raw": ["loss.mode=clip-raw"],
    "clip-both": ["loss.mode=clip-both"],
    "alip": ["loss.mode=alip"],
    "alip-first-batch": ["loss.mode=alip", "loss.h_init=first_batch"],
    "alip-weight-sum": ["loss.mode=alip", "loss.normalize=weight_sum"],
}
MODES = ("clip-raw", "clip-both", "alip")
# The raw-text noise besides swaps (make-synthetic's kinds): held fixed while the swap share varies.
OTHER_NOISE = {"truncate": 0.05, "offtopic": 0.05, "hashtag": 0.1, "mojibake": 0.05}
CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml")
# (column, result key, format): what the tables show per variant.
COLUMNS = [("i2t R@1", "i2t_R@1", ".1f"), ("t2i R@1", "t2i_R@1", ".1f"), ("mean R@1", "mean_R@1", ".1f"),
           ("RSUM", "rsum", ".1f"), ("AUC S_tc (post hoc)", "auc_language_gate", ".3f"),
           ("AUC S_xt (post hoc)", "auc_description_gate", ".3f"),
           ("AUC S_tc−H_tc (training)", "auc_train_gate_margin", ".3f"),
           ("AUC W_s (training)", "auc_train_w_sample", ".3f"),
           ("AUC W_s·W_t (training)", "auc_train_w_sample_raw", ".3f"), ("train s", "seconds", ".0f")]


def make_data(raw: str, n_train: int, n_test: int, swap: float, workers: int, alt_style: str = "caption") -> None:
    """The demo's synthetic set: 64-px square images (the size the model sees; square, so the
    evaluation's centre crop keeps shapes at the edges), `swap` of the raw texts swapped. Raw texts
    in the captions' own style by default (`caption`): with web-style alt-text the tiny text tower
    kept the two styles apart, so the language gate measured style, not content (docs/results.md)."""
    argv = ["--out", raw, "--train", str(n_train), "--test", str(n_test), "--size", "64",
            "--max-side-ratio", "1", "--workers", str(workers), "--swap-fraction", str(swap),
            "--alt-style", alt_style]
    for kind, share in OTHER_NOISE.items():
        argv += [f"--{kind}-fraction", str(share)]
    make_synthetic.main(argv)


def convert(raw: str, out: str, fmt: str, workers: int) -> tuple[dict, dict]:
    """make-shards as a user runs it, in a fresh process: forking its workers from this one, after
    earlier conversions left reader threads behind, can hang them."""
    argv = [sys.executable, "-m", "tools.convert.make_shards", "--source", "table",
            "--input", os.path.join(raw, "train.jsonl"), "--image-column", "image", "--caption-column", "caption",
            "--synthetic-captions", os.path.join(raw, "train_syn.jsonl"),
            "--format", fmt, "--out", out, "--samples-per-shard", "500", "--tokenize",
            "--workers", str(workers), "--overwrite", "--quiet"]
    with reaped():  # make-shards and its workers die with the demo, however it ends
        subprocess.run(argv, check=True)
    with open(os.path.join(out, fmt, "stats.json")) as f:
        stats = json.load(f)
    return stats, verify_shards.verify_folder(os.path.join(out, fmt), progress=False)


def train_and_evaluate(variant: str, seed: int, shards: str, raw: str, runs: str, steps: int,
                       workers: int, extra: list[str] | None = None, *, gate_auc: bool = True,
                       reuse: bool = False) -> dict:
    """Train one variant on `shards` (a wds folder), evaluate it; the row also lands in
    runs/<variant>[-s<seed>]/demo_results.json. `gate_auc` needs swapped samples in the data;
    `reuse` returns an earlier row of the same run name and steps instead of training again."""
    from train.config import load_config
    from train.model import build_model
    from train.eval.noise_eval import noise_auc, training_auc
    from train.trainer import train

    name = variant if seed == 0 else f"{variant}-s{seed}"
    overrides = [f"data.train_shards={shards}", *VARIANTS[variant], f"run.name={name}", f"run.seed={seed}",
                 f"run.out_dir={runs}", f"optim.max_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}",
                 f"data.workers={workers}", f"eval.retrieval_json={os.path.join(raw, 'test_karpathy.json')}",
                 f"eval.images_root={raw}", *(extra or [])]
    cfg = load_config(CONFIG, overrides)
    saved = os.path.join(runs, name, "demo_results.json")
    if reuse and os.path.isfile(saved):
        with open(saved) as f:
            row = json.load(f)
        if row.get("steps") == steps and row.get("overrides") == overrides:
            return row
    start = time.perf_counter()
    result = train(cfg)  # evaluates on the clean held-out split at the end
    seconds = time.perf_counter() - start
    retrieval = result["eval"]["test_karpathy"]
    row = {"variant": variant, "seed": seed, "steps": result["steps"], "seconds": round(seconds, 1),
           **retrieval, "mean_R@1": (retrieval["i2t_R@1"] + retrieval["t2i_R@1"]) / 2,
           "overrides": overrides}
    weights = os.path.join(result["run_dir"], "sample_weights.pt")
    if gate_auc:
        model = build_model(cfg.model.name, os.path.join(result["run_dir"], "open_clip_model.pt")).eval()
        row.update(noise_auc(model, shards, "wds", cfg.data.image_size, workers=workers))
        if os.path.isfile(weights):
            row.update(training_auc(weights, shards, "wds"))
    with open(saved, "w") as f:
        json.dump(row, f, indent=1)
    return row


def summarize(rows: list[dict], key: str) -> tuple[float, float] | None:
    """(mean, sample std; 0 for one value) of `key` over rows that have it."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: list[dict], variants: list[str]) -> str:
    """Markdown: one line per variant; mean ± std when the rows hold several seeds."""
    lines = ["| mode | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        cells = []
        for _, key, fmt in COLUMNS:
            s = summarize(mine, key)
            cells.append("–" if s is None else f"{s[0]:{fmt}}" + (f" ± {s[1]:{fmt}}" if len(mine) > 1 else ""))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[str]:
    """The demo's claims (issue 9), each with its measured figures and whether it holds."""
    mean = {v: {k: summarize([r for r in rows if r["variant"] == v], k) for k in ("rsum", "mean_R@1")}
            for v in MODES if any(r["variant"] == v for r in rows)}
    if len(mean) < len(MODES):
        return []
    out = []
    for key in ("rsum", "mean_R@1"):
        a, b, c = (mean[v][key][0] for v in ("alip", "clip-both", "clip-raw"))
        out.append(f"alip > clip-both > clip-raw on {key}: {a:.1f} > {b:.1f} > {c:.1f}: "
                   f"{'yes' if a > b > c else 'NO'}")
    both = mean["clip-both"]["mean_R@1"][0]
    out.append(f"clip-both mean R@1 >= 10 %: {both:.1f}: {'yes' if both >= 10 else 'NO'}")
    for key, what in (("auc_language_gate", "post hoc S_tc"), ("auc_train_gate_margin", "training-time S_tc − H_tc"),
                      ("auc_train_w_sample", "training-time W_s")):
        s = summarize([r for r in rows if r["variant"] == "alip"], key)
        if s:
            out.append(f"alip language gate AUC ({what}) >= 0.90: {s[0]:.3f}: {'yes' if s[0] >= 0.9 else 'NO'}")
    swap, clean = (summarize([r for r in rows if r["variant"] == "alip"], k) for k in ("passed_swap", "passed_clean"))
    if swap and clean:  # why W_s's AUC trails the margin's: W_s = 1 for every sample the gate passes
        out.append(f"alip W_s = 1 (passed by the gate, tied) for {100 * swap[0]:.0f} % of swapped and "
                   f"{100 * clean[0]:.0f} % of clean raw texts in the final epoch")
    return out


def save_tables(folder: str, stem: str, text: str, rows: list[dict]) -> None:
    """<folder>/<stem>.md (the Markdown shown) and <stem>.json (the rows behind it)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{stem}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(folder, f"{stem}.json"), "w") as f:
        json.dump(rows, f, indent=1)


def run_grid(variants: list[str], seeds: list[int], shards: str, raw: str, runs: str, steps: int,
             workers: int, extra: list[str] | None = None, **kwargs) -> list[dict]:
    rows = []
    for seed in seeds:  # seed-major: one seed's full table comes first
        for v in variants:
            rows.append(train_and_evaluate(v, seed, shards, raw, runs, steps, workers, extra, **kwargs))
            print(json.dumps({k: rows[-1][k] for k in ("variant", "seed", "mean_R@1", "rsum", "seconds")}),
                  flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="shards/demo")
    p.add_argument("--runs", default="runs/demo")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--swap-fraction", type=float, default=0.5, help="raw texts swapped with another image's")
    p.add_argument("--alt-style", choices=("web", "plain", "caption"), default="caption",
                   help="make-synthetic's raw alt-text style before noise")
    p.add_argument("--steps", type=int, default=600, help="training steps per mode (warm-up: 10 %%)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the data stays the same)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma-separated, of {', '.join(FORMATS)}: converted and verified (training reads wds)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--reuse", action="store_true",
                   help="keep runs that already have results for the same settings (add seeds to a table)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra trainer override (repeatable), e.g. --set optim.lr=1e-3")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    variants = args.modes.split(",")
    formats = [f for f in args.formats.split(",") if f]
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown mode(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if unknown := [f for f in formats if f not in FORMATS]:
        p.error(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if "wds" not in formats:
        p.error("--formats must include wds (the demo trains on it)")
    start = time.perf_counter()
    raw = os.path.join(args.out, "raw")
    print(f"[1/4] synthetic dataset: {args.train} train + {args.test} test images, "
          f"{args.swap_fraction:.0%} of raw texts swapped → {raw}", flush=True)
    make_data(raw, args.train, args.test, args.swap_fraction, args.workers, args.alt_style)

    print("[2/4] converting to every format and verifying each", flush=True)
    rows = []
    for fmt in formats:
        stats, report = convert(raw, os.path.join(args.out, "train"), fmt, args.workers)
        rows.append((fmt, report["shards"], stats["read"], report["samples"], stats["skipped"],
                     stats["with_synthetic_caption"], report["bytes"], stats["samples_per_second"]))
    conversion = ["| format | shards | read | written | skipped | with synthetic | MiB | convert samples/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
    conversion += [f"| {f} | {s} | {r} | {w} | {k} | {y} | {b / 2**20:.1f} | {v:.0f} |"
                   for f, s, r, w, k, y, b, v in rows]
    print("\n".join(conversion) + "\n(loader throughput: `bench-loader`, see docs/benchmarks.md)\n", flush=True)

    print(f"[3/4] training {', '.join(variants)} for {args.steps} steps each, seed(s) "
          f"{' '.join(map(str, args.seeds))} (same batches per seed)", flush=True)
    shards = os.path.join(args.out, "train", "wds")
    results = run_grid(variants, args.seeds, shards, raw, args.runs, args.steps, args.workers, args.overrides,
                       reuse=args.reuse)

    print("\n[4/4] results: retrieval on the 500 clean held-out images (R@1 in %), gate AUC on the "
          "noisy training set (swapped vs clean raw texts)\n")
    text = table(results, variants)
    checks = check_targets(results)
    print(text + "\n\n" + "\n".join(checks))
    print(f"\n{len(args.seeds)} seed(s); chance R@1 on {args.test} images: {100 / max(1, args.test):.1f} %. "
          f"Total {time.perf_counter() - start:.0f} s. Runs, metrics and plots: {args.runs}")
    save_tables(args.runs, "results", "\n".join(conversion) + "\n\n" + text + "\n\n" + "\n".join(checks), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
