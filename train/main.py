"""Entry point: `python -m train.main --config configs/X.yaml [key=value ...]` (or `lip-train`),
launched directly for one process or by torchrun for many. `--print-config` lists every key with
its value, default and description instead of training."""
from __future__ import annotations

import argparse
import json
import sys

from train.config import ConfigError, describe_config, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lip-train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML stating what differs from the defaults in train/config.py")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=1e-3 run.resume=latest")
    p.add_argument("--print-config", action="store_true",
                   help="print every config key (dotted, e.g. data.batch_size) with its value and description, "
                        "then exit without training; with --config / overrides, the values a run would use "
                        "(and the default where it differs)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, validate=not args.print_config)
    except (ConfigError, FileNotFoundError) as e:
        print(f"lip-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        given = bool(args.config or args.overrides)
        print(describe_config(cfg if given else None))
        if given:
            try:
                cfg.validate()
            except ConfigError as e:
                print(f"lip-train: note: a run with this config would stop: config error: {e}", file=sys.stderr)
        return 0
    from train.cpu_threads import resolve_threads
    from train.distributed import cleanup
    from train.eval.evaluate import INPUT_ERRORS, RetrievalEvalConfig, one_line
    from train.trainer import train

    try:
        if cfg.eval.retrieval_json:  # checked now: the evaluation only runs once training is over
            RetrievalEvalConfig("eval", karpathy_json=cfg.eval.retrieval_json,
                                images_root=cfg.eval.images_root).karpathy_images()
        cfg, threads_note = resolve_threads(cfg)  # the process's threads: this entry point picks them
        result = train(cfg, threads_note=threads_note)
    except ConfigError as e:  # found once the model is built (e.g. token pruning deeper than the tower)
        print(f"lip-train: config error: {e}", file=sys.stderr)
        return 2
    except INPUT_ERRORS as e:  # a missing or wrong shard folder, JSON, images root, checkpoint
        print(f"lip-train: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if result["is_main"]:
        print(json.dumps({"run_dir": result["run_dir"], "steps": result["steps"], **result["final"],
                          **({"eval": result["eval"]} if "eval" in result else {}),
                          **({"best": result["best"]} if "best" in result else {})}))  # run.keep_best's
    return 0


if __name__ == "__main__":
    sys.exit(main())
