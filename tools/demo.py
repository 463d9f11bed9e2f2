"""`make demo`: the whole story on a small synthetic dataset, with nothing from outside.

synthetic noisy dataset → shards in every format (verified) → loader throughput → train
clip-raw, clip-both and alip for the same steps and seed → evaluate each on the clean held-out
split (retrieval) and on the training set's noise labels (gate AUC) → one results table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tools import bench_loader, make_shards, make_synthetic, verify_shards

FORMATS = ("wds", "arrow", "rec")
MODES = ("clip-raw", "clip-both", "alip")


def convert(raw: str, out: str, fmt: str, workers: int) -> tuple[dict, dict]:
    argv = ["--source", "table", "--input", os.path.join(raw, "train.jsonl"),
            "--image-column", "image", "--caption-column", "caption",
            "--synthetic-captions", os.path.join(raw, "train_syn.jsonl"),
            "--format", fmt, "--out", out, "--samples-per-shard", "500", "--tokenize",
            "--workers", str(workers), "--overwrite"]
    args = make_shards.build_parser().parse_args(argv)
    stats = make_shards.run(make_shards.config_from_args(args), out, workers, overwrite=True, progress=False)
    return stats, verify_shards.verify_folder(os.path.join(out, fmt), progress=False)


def train_and_evaluate(mode: str, args, shards: str, raw: str) -> dict:
    from train.config import load_config
    from train.model import build_model
    from train.noise_eval import noise_auc
    from train.trainer import train

    overrides = [f"data.train_shards={shards}", f"loss.mode={mode}", f"run.name={mode}",
                 f"run.out_dir={args.runs}", f"optim.max_steps={args.steps}", f"data.workers={args.workers}",
                 f"eval.retrieval_json={os.path.join(raw, 'test_karpathy.json')}", f"eval.images_root={raw}"]
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"), overrides)
    start = time.perf_counter()
    result = train(cfg)  # evaluates on the clean held-out split at the end
    seconds = time.perf_counter() - start
    model = build_model(cfg.model.name, os.path.join(result["run_dir"], "open_clip_model.pt")).eval()
    gates = noise_auc(model, shards, "wds", cfg.data.image_size, workers=args.workers)
    row = {"mode": mode, "seconds": round(seconds, 1), **result["eval"]["test_karpathy"], **gates}
    with open(os.path.join(result["run_dir"], "demo_results.json"), "w") as f:
        json.dump(row, f, indent=1)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="shards/demo")
    p.add_argument("--runs", default="runs/demo")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--steps", type=int, default=300, help="training steps per mode")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    raw = os.path.join(args.out, "raw")
    print(f"[1/5] synthetic dataset: {args.train} train + {args.test} test images → {raw}", flush=True)
    make_synthetic.main(["--out", raw, "--train", str(args.train), "--test", str(args.test),
                         "--workers", str(args.workers)])

    print("[2/5] converting to every format (one format at a time, timed) and verifying each", flush=True)
    rows = []
    for fmt in FORMATS:
        stats, report = convert(raw, os.path.join(args.out, "train"), fmt, args.workers)
        rows.append((fmt, report["shards"], stats["read"], report["samples"], stats["skipped"],
                     stats["with_synthetic_caption"], report["bytes"], stats["samples_per_second"]))
    conversion = ["| format | shards | read | written | skipped | with synthetic | MiB | convert samples/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
    conversion += [f"| {f} | {s} | {r} | {w} | {k} | {y} | {b / 2**20:.1f} | {v:.0f} |"
                   for f, s, r, w, k, y, b, v in rows]
    print("\n".join(conversion) + "\n", flush=True)

    print("[3/5] loader throughput on the demo shards (train augmentation, tokens delivered)", flush=True)
    bench_loader.main(["--shards", os.path.join(args.out, "train"), "--format", ",".join(FORMATS),
                       "--backends", "dali-cpu,torch", "--batch-size", "64", "--image-size", "64",
                       "--workers", str(args.workers), "--seconds", "4", "--repeats", "1",
                       "--out", os.path.join(args.runs, "loader.json")])

    print(f"\n[4/5] training clip-raw, clip-both and alip for {args.steps} steps each (same seed, same batches)",
          flush=True)
    shards = os.path.join(args.out, "train", "wds")
    results = [train_and_evaluate(mode, args, shards, raw) for mode in MODES]

    print("\n[5/5] results: retrieval on the clean held-out split, gate AUC on the noisy training set\n")
    lines = ["| mode | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM | "
             "AUC language gate (S_tc) | AUC description gate (S_xt) | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['i2t_R@1']:.1f} | {r['i2t_R@5']:.1f} | {r['i2t_R@10']:.1f} | "
                     f"{r['t2i_R@1']:.1f} | {r['t2i_R@5']:.1f} | {r['t2i_R@10']:.1f} | {r['rsum']:.1f} | "
                     f"{r['auc_language_gate']:.3f} | {r['auc_description_gate']:.3f} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    print(f"\nAUC: swapped raw texts ({results[0]['n_swap']}) vs clean ones ({results[0]['n_clean']}), "
          "ranked by low similarity. Runs, metrics and plots: " + args.runs)
    with open(os.path.join(args.runs, "results.md"), "w") as f:
        f.write("\n".join(conversion) + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
