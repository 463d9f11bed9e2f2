"""PNG plots of a run from its metrics.jsonl: loss per path, learning rate, logit scale, gate
means and weight quantiles, and the validation curve (eval/*, when the run validated: recall and
RSUM with the best so far). `python -m train.plot runs/<name>` redraws them on demand."""
from __future__ import annotations

import argparse
import json
import os
import sys

PANELS = {
    "loss": ["loss", "loss_raw", "loss_syn"],
    "lr": ["lr"],
    "logit_scale": ["logit_scale"],
    "gate_means": ["gate/h_tc", "gate/h_xt", "gate/h_xc"],
    "gate_weights": ["gate/w_sample_q10", "gate/w_sample_q50", "gate/w_sample_q90",
                     "gate/w_raw_mean", "gate/w_syn_mean"],
    "eval_recall": ["eval/i2t_R@1", "eval/t2i_R@1", "eval/mean_r1", "eval/best_mean_r1"],
    "eval_rsum": ["eval/rsum", "eval/best_rsum"],
}


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics; is {run_dir} a training run folder?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for panel, keys in PANELS.items():
        present = [k for k in keys if any(k in r for r in rows)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in present:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            # validation points are few: marked, so one evaluation is a visible dot
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="o" if len(pts) < 50 else None,
                    markersize=3)
        ax.set_xlabel("step")
        ax.set_title(f"{os.path.basename(run_dir)}: {panel}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{panel}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    try:
        for path in plot_run(args.run_dir):
            print(path)
    except FileNotFoundError as e:
        print(f"plot: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
