"""Where ALIP starts to pay off: the demo's modes trained at several shares of swapped raw texts.

For each swap fraction: a synthetic set like the demo's (the other noise kinds held fixed), wds
shards, then every mode and seed as `tools/demo/demo.py` trains them. Writes a Markdown table
(mean R@1 ± std over seeds per mode, and the gates' AUCs), the rows as JSON, and one PNG of mean
R@1 against the swap fraction, one line per mode, error bars over seeds. Finished runs are reused
(`--fresh` retrains), so an interrupted sweep continues where it stopped.

    python -m tools.demo.noise_sweep --fractions 0 0.3 0.5 0.7 --seeds 0 1 2 --plot docs/noise_sweep.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tools.demo import demo


def sweep_table(rows: list[dict], fractions: list[float], variants: list[str]) -> str:
    """Markdown: one line per swap fraction; mean R@1 (mean ± std over seeds) per variant, then
    the alip gate AUCs (post hoc S_tc, training-time W_s) where the data has swaps."""
    alips = [v for v in variants if v.startswith("alip")]
    head = [f"{v} mean R@1" for v in variants] + [f"{v} AUC S_tc / W_s" for v in alips]
    lines = ["| swap fraction | " + " | ".join(head) + " |", "|---:|" + "---:|" * len(head)]
    for frac in fractions:
        at = [r for r in rows if r["swap"] == frac]
        cells = []
        for v in variants:
            s = demo.summarize([r for r in at if r["variant"] == v], "mean_R@1")
            cells.append("–" if s is None else f"{s[0]:.1f} ± {s[1]:.1f}")
        for v in alips:
            post = demo.summarize([r for r in at if r["variant"] == v], "auc_language_gate")
            trained = demo.summarize([r for r in at if r["variant"] == v], "auc_train_w_sample")
            cells.append("–" if post is None else f"{post[0]:.3f} / {trained[0]:.3f}" if trained else f"{post[0]:.3f}")
        lines.append(f"| {frac:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], fractions: list[float], variants: list[str], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for v in variants:
        stats = [demo.summarize([r for r in rows if r["swap"] == f and r["variant"] == v], "mean_R@1")
                 for f in fractions]
        xs = [f for f, s in zip(fractions, stats) if s]
        ax.errorbar(xs, [s[0] for s in stats if s], yerr=[s[1] for s in stats if s], marker="o",
                    capsize=3, label=v)
    ax.set_xlabel("fraction of raw texts swapped with another image's")
    ax.set_ylabel("mean R@1 on 500 clean test images (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="noise-sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="shards/sweep", help="synthetic sets and shards, one folder per fraction")
    p.add_argument("--runs", default="runs/sweep")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--modes", default=",".join(demo.MODES), help=f"of {', '.join(demo.VARIANTS)}")
    p.add_argument("--steps", type=int, default=600, help="per run (the demo's)")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--plot", default=None, help="PNG path (default: RUNS/noise_sweep.png)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already have results")
    p.add_argument("--include", action="append", default=[], metavar="FRACTION=RESULTS_JSON",
                   help="take this fraction's rows from a `tools.demo` results.json instead of training "
                        "(the demo's data is this sweep's at --swap-fraction; steps must match), e.g. "
                        "0.5=runs/demo-seeds/results.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra trainer override (repeatable), e.g. --set optim.lr=1e-3")
    args = p.parse_args(argv)
    variants = args.modes.split(",")
    if unknown := [v for v in variants if v not in demo.VARIANTS]:
        p.error(f"unknown mode(s) {unknown}; choose from {', '.join(demo.VARIANTS)}")
    if any(not 0 <= f <= 1 - sum(demo.OTHER_NOISE.values()) for f in args.fractions):
        p.error(f"fractions must lie in [0, {1 - sum(demo.OTHER_NOISE.values()):g}] (other noise is fixed)")

    included = {}
    for item in args.include:
        frac, _, path = item.partition("=")
        with open(path) as f:
            found = [r for r in json.load(f) if r["variant"] in variants]  # every seed it holds
        if bad := [r["variant"] for r in found if r["steps"] != args.steps]:
            p.error(f"--include {item}: runs {bad} have other step counts than --steps {args.steps}")
        included[float(frac)] = found

    rows = []
    for frac in args.fractions:
        if frac in included:
            print(f"swap fraction {frac:g}: {len(included[frac])} runs from --include", flush=True)
            rows += [{**r, "swap": frac} for r in included[frac]]
            continue
        folder = os.path.join(args.out, f"swap{frac:g}")
        raw, shards = os.path.join(folder, "raw"), os.path.join(folder, "train", "wds")
        if not os.path.isfile(os.path.join(shards, "manifest.json")):
            demo.make_data(raw, args.train, args.test, frac, args.workers)
            demo.convert(raw, os.path.join(folder, "train"), "wds", args.workers)
        print(f"swap fraction {frac:g}: training {', '.join(variants)}, seed(s) {args.seeds}", flush=True)
        found = demo.run_grid(variants, args.seeds, shards, raw, os.path.join(args.runs, f"swap{frac:g}"),
                              args.steps, args.workers, args.overrides, gate_auc=frac > 0,
                              reuse=not args.fresh)
        rows += [{**r, "swap": frac} for r in found]

    text = sweep_table(rows, args.fractions, variants)
    per_point = sorted({len({(r["variant"], r["seed"]) for r in rows if r["swap"] == f}) // len(variants)
                        for f in args.fractions})  # --include may bring other seed counts
    seeds = f"{per_point[0]}" if len(per_point) == 1 else f"{per_point[0]}–{per_point[-1]}"
    title = f"{args.steps} steps per run, {seeds} seed(s) per point; configs/demo.yaml"
    png = plot(rows, args.fractions, variants, args.plot or os.path.join(args.runs, "noise_sweep.png"), title)
    print("\n" + text + f"\n\nplot: {png}")
    demo.save_tables(args.runs, "sweep", text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
