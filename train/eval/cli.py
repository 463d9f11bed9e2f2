"""`lip-eval`: zero-shot evaluation of checkpoints from the command line (train/eval/evaluate.py),
and with --ood the OOD retrieval test (train/eval/ood.py). Its own module, so that evaluate and ood
import each other nowhere: both are libraries, this is their one front end."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from pipelines.loader_settings import CHOICES
from train.eval.evaluate import (INPUT_ERRORS, ClassificationEvalConfig, EvalConfigError, RetrievalEvalConfig,
                                 load_model, one_line, run_evals, to_markdown, write_results)
from train.eval.ood import add_ood_args, main_ood


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lip-eval", description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--checkpoint", required=True, help="open_clip-layout state dict or trainer checkpoint")
    add("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    add("--model-config", help="a JSON model config to register (name = file stem)")
    add("--retrieval-json", help="Karpathy-style test JSON")
    add("--retrieval-shards", help="eval shard folder (one caption per image)")
    add("--images-root", help="folder the JSON's image paths are relative to (default: the JSON's)")
    add("--retrieval-name", default="retrieval")
    add("--caption-prefix", default="", help='e.g. "a photo of " as in ALIP')
    add("--classification-folder", help="ImageFolder tree: one subfolder per class")
    add("--classification-shards", help="shards labelled by meta['label'] or meta['class']")
    add("--classification-name", default="classification")
    add("--classnames", help="text file, one class name per line, in label order")
    add("--format", default="wds", choices=CHOICES["format"])
    add("--backend", default="torch", choices=CHOICES["backend"],
        help="shards' loader; auto: DALI when it imports (pipelines/loader_settings.py), else torch")
    add("--image-size", type=int, help="default: the model's own")
    add("--batch-size", type=int, default=64)
    add("--workers", type=int, default=min(4, os.cpu_count() or 1))
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--amp", action="store_true", help="bf16 autocast")
    add("--run-name", help="row name in the table (default: the checkpoint's file name)")
    add("--out", help="results JSON; the Markdown table is written beside it")
    add_ood_args(p)  # --ood, --ood-*, --evidential-scale
    return p


def _configs(a: argparse.Namespace, image_size: int) -> list[RetrievalEvalConfig | ClassificationEvalConfig]:
    text = Path(a.classnames).read_text() if a.classnames else ""  # missing: main's one-line FileNotFoundError
    classnames = [n.strip() for n in text.splitlines() if n.strip()] or None
    common = dict(format=a.format, backend=a.backend, image_size=image_size, batch_size=a.batch_size,
                  workers=a.workers, amp=a.amp)
    configs: list = []
    if a.retrieval_json or a.retrieval_shards:
        configs.append(RetrievalEvalConfig(a.retrieval_name, a.retrieval_json, a.images_root, a.caption_prefix,
                                           shards=a.retrieval_shards, **common))
    if a.classification_folder or a.classification_shards:
        configs.append(ClassificationEvalConfig(a.classification_name, a.classification_folder, classnames,
                                                shards=a.classification_shards, **common))
    if not configs:
        raise EvalConfigError("nothing to evaluate: pass --retrieval-json/-shards or --classification-folder/-shards")
    for c in configs:
        if getattr(c, "karpathy_json", None):
            c.karpathy_images()  # a bad JSON or images root fails here, before the model loads
    return configs


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.ood and not a.retrieval_json:
            raise EvalConfigError("--ood needs --retrieval-json (a Karpathy-style test JSON)")
        configs = _configs(a, a.image_size or 224)  # paths checked before the model is built
        model = load_model(a.model, a.checkpoint, a.device, a.model_config)
        if a.image_size is None:  # the model's own input size (open_clip keeps it as (H, W))
            size = torch.tensor(getattr(model.visual, "image_size", 224)).flatten()[0].item()
            configs = [dataclasses.replace(c, image_size=size) for c in configs]
        results = {a.run_name or os.path.basename(a.checkpoint): run_evals(model, configs, a.device)}
        if a.ood:  # train/eval/ood.py: the retrieval test under image corruptions and text perturbations
            main_ood(a, model, configs)
    except INPUT_ERRORS as e:  # bad input: one line, no traceback
        print(f"lip-eval: error: {one_line(e)}", file=sys.stderr)
        return 2
    if a.out:  # rows accumulate: one call per checkpoint builds the table of runs
        results = {**(json.loads(Path(a.out).read_text()) if os.path.isfile(a.out) else {}), **results}
        print(f"wrote {a.out} and {write_results(a.out, results)}")
    print(to_markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
