"""Zero-shot evaluation: image-text retrieval and classification (DESIGN.md section 8).

big_vision's protocol: one evaluator per task, built from a small config, `run(model, device)`
returning `{metric: value}`. The metrics are pure functions of a similarity matrix, so they can be
checked on hand-made matrices. Any model with open_clip's `encode_image` / `encode_text` works;
features are L2-normalized here, so `logit_scale` (which never changes a ranking) is not used.

Retrieval data: a Karpathy-style test JSON (the ALBEF/BLIP list of `{"image", "caption": [...]}`,
or Karpathy's own `dataset_*.json` with `images[].sentences[].raw`, test split) or eval shards,
where each sample's raw text is its one caption. Classification data: an ImageFolder tree (class
= subfolder) or shards labelled by `meta["label"]` or `meta["class"]` (an index or a name).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.loader import LoaderConfig, build_loader
from pipelines.shardset import ShardError
from pipelines.text import tokenize
from pipelines.torch_loader import torchvision_transform
from pipelines.transforms import AugmentSpec

KS = (1, 5, 10)
RETRIEVAL_KEYS = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in KS] + ["rsum"]
# open_clip's SIMPLE_IMAGENET_TEMPLATES (CLIP's 7-prompt ensemble), as format strings so that
# configs stay JSON-serializable and this module does not import open_clip (~4 s) to evaluate.
DEFAULT_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                     "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
_CHUNK = 1024  # similarity rows compared at once: bounds memory at COCO-5k x 25k scale


class EvalConfigError(ValueError):
    """A bad evaluation setting or input; the CLI prints it as one line."""


# ---------------------------------------------------------------- metrics (pure functions)

def _ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of column `target[r]` in each row of `scores` [R, C], sorted descending with
    ties broken by lower column index (a stable sort), so equal scores never flatter a model
    differently from run to run. Counting, not sorting: O(R*C) memory per chunk."""
    out = []
    for s in range(0, scores.shape[0], _CHUNK):
        rows, tgt = scores[s:s + _CHUNK], target[s:s + _CHUNK]
        true = rows.gather(1, tgt[:, None])
        col = torch.arange(rows.shape[1], device=rows.device)[None]
        out.append(((rows > true) | ((rows == true) & (col < tgt[:, None]))).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def retrieval_metrics(sim: torch.Tensor, text_to_image: torch.Tensor | Sequence[int]) -> dict[str, float]:
    """Recall@{1,5,10} both ways and their sum, in percent.

    sim: float [n_images, n_texts]; text_to_image: int [n_texts], the image index of each text.
    Image->text: an image counts as a hit at k if ANY of its texts ranks in the top k (so its best
    text's rank decides). Text->image: each text has exactly one correct image.
    """
    sim = sim.float()
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=sim.device)
    n_img, n_txt = sim.shape
    if t2i.shape != (n_txt,) or (n_txt and (t2i.min() < 0 or t2i.max() >= n_img)):
        raise ValueError(f"text_to_image must hold {n_txt} image indices in [0, {n_img})")
    counts = torch.bincount(t2i, minlength=n_img)
    if n_img == 0 or (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} of {n_img} images have no text")
    # Each image's best-scoring own text; ties among its own texts go to the lowest text index,
    # the one a stable descending sort meets first. Scatters keep this O(n_texts), no mask matrix.
    cols = torch.arange(n_txt, device=sim.device)
    own = sim[t2i, cols]
    best = torch.full((n_img,), float("-inf"), device=sim.device).scatter_reduce(0, t2i, own, "amax")
    candidate = torch.where(own == best[t2i], cols, n_txt)
    first_best = torch.full((n_img,), n_txt, device=sim.device).scatter_reduce(0, t2i, candidate, "amin")
    i2t_rank = _ranks(sim, first_best)
    t2i_rank = _ranks(sim.T, t2i)
    out = {}
    for name, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in KS:
            out[f"{name}_R@{k}"] = 100.0 * (rank < k).float().mean().item()
    out["rsum"] = sum(out[k] for k in RETRIEVAL_KEYS[:-1])
    return out


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> dict[str, float]:
    """top1, top5 (when there are >= 5 classes) and mean per-class accuracy, in percent.

    logits: float [n, classes], one row per real image (padding rows must not be passed);
    labels: int [n]. Ties between logits are broken by lower class index, as in retrieval.
    Mean per class averages the recall of the classes that occur in `labels`.
    """
    logits = logits.float()
    labels = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
    n, classes = logits.shape
    if labels.shape != (n,) or n == 0:
        raise ValueError(f"need one label per logits row and at least one row, got {tuple(labels.shape)} "
                         f"labels for {n} rows")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels must lie in [0, {classes})")
    rank = _ranks(logits, labels)
    out = {"top1": 100.0 * (rank < 1).float().mean().item()}
    if classes >= 5:
        out["top5"] = 100.0 * (rank < 5).float().mean().item()
    hits = torch.zeros(classes, device=logits.device).index_add_(0, labels, (rank < 1).float())
    counts = torch.bincount(labels, minlength=classes)
    present = counts > 0
    out["mean_per_class"] = 100.0 * (hits[present] / counts[present]).mean().item()
    return out


# ---------------------------------------------------------------- configs

@dataclass
class RetrievalEvalConfig:
    name: str  # the column group in the results table: "flickr", "coco", ...
    karpathy_json: str | None = None
    shards: str | None = None  # a make-shards format folder (split="eval")
    format: str = "wds"
    backend: str = "torch"  # torch | dali (shards only)
    images_root: str | None = None  # image paths in the JSON are relative to it; default: the JSON's folder
    image_size: int = 224
    batch_size: int = 64
    caption_prefix: str = ""  # ALIP prepends "a photo of "
    workers: int = 4
    amp: bool = False  # bf16 autocast around the encoders

    def __post_init__(self) -> None:
        _check_source(self.name, {"karpathy_json": self.karpathy_json, "shards": self.shards})
        if self.karpathy_json and not os.path.isfile(self.karpathy_json):
            raise EvalConfigError(f"{self.name}: retrieval JSON {self.karpathy_json} does not exist")
        if self.karpathy_json and self.images_root is None:
            self.images_root = os.path.dirname(os.path.abspath(self.karpathy_json))
        if self.images_root is not None and not os.path.isdir(self.images_root):
            raise EvalConfigError(f"{self.name}: images root {self.images_root} is not a folder")


@dataclass
class ClassificationEvalConfig:
    name: str
    folder: str | None = None  # ImageFolder layout: one subfolder per class
    shards: str | None = None  # labelled by meta["label"] or meta["class"]
    format: str = "wds"
    backend: str = "torch"
    classnames: Sequence[str] | None = None  # default: the subfolder names ("_" -> " ") or shard labels
    templates: Sequence[str] = DEFAULT_TEMPLATES  # "{}" stands for the class name
    image_size: int = 224
    batch_size: int = 64
    workers: int = 4
    amp: bool = False

    def __post_init__(self) -> None:
        _check_source(self.name, {"folder": self.folder, "shards": self.shards})
        if self.folder and not os.path.isdir(self.folder):
            raise EvalConfigError(f"{self.name}: image folder {self.folder} is not a folder")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise EvalConfigError(f"{self.name}: every prompt template needs a '{{}}' for the class name")


def _check_source(name: str, sources: dict[str, str | None]) -> None:
    given = [k for k, v in sources.items() if v]
    if len(given) != 1:
        raise EvalConfigError(f"{name}: give exactly one of {' or '.join(sources)} (got {given or 'none'})")
    if sources.get("shards") and not os.path.isdir(sources["shards"]):
        raise EvalConfigError(f"{name}: shard folder {sources['shards']} does not exist")


# ---------------------------------------------------------------- data and encoders

def load_karpathy(path: str) -> tuple[list[str], list[list[str]]]:
    """(image paths relative to the images root, captions per image) of the test split."""
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and "images" in data:  # Karpathy's dataset_coco.json / dataset_flickr30k.json
        rows = [(os.path.join(im.get("filepath", ""), im["filename"]), [s["raw"] for s in im["sentences"]])
                for im in data["images"] if im.get("split") == "test"]
    elif isinstance(data, list) and all(isinstance(r, dict) and "image" in r and "caption" in r for r in data):
        rows = [(r["image"], [r["caption"]] if isinstance(r["caption"], str) else list(r["caption"]))
                for r in data]
    else:
        raise EvalConfigError(f"{path}: expected a list of {{image, caption}} rows or a Karpathy "
                              "dataset_*.json with images[].sentences")
    if not rows:
        raise EvalConfigError(f"{path}: no test images")
    empty = [p for p, caps in rows if not caps]
    if empty:
        raise EvalConfigError(f"{path}: {len(empty)} images have no caption, e.g. {empty[0]}")
    return [p for p, _ in rows], [caps for _, caps in rows]


class ImageFiles(torch.utils.data.Dataset):
    """Images read from paths through a transform (a module-level class: it pickles to workers)."""

    def __init__(self, paths: Sequence[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


def _image_batches(dataset, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    for batch in loader:
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


@torch.no_grad()
def encode_images(model, batches: Iterable[torch.Tensor], device: torch.device, amp: bool = False) -> torch.Tensor:
    """float32 [N, D] unit-norm features of image batches (float [B, 3, H, W] each)."""
    feats = []
    for images in batches:
        with _autocast(device, amp):
            f = model.encode_image(images.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=-1))
    return torch.cat(feats)


@torch.no_grad()
def encode_texts(model, texts: Sequence[str], device: torch.device, batch_size: int = 256,
                 amp: bool = False) -> torch.Tensor:
    """float32 [len(texts), D] unit-norm features; texts are CLIP-BPE tokenized to int64 [B, 77]."""
    feats = []
    for s in range(0, len(texts), batch_size):
        tokens = torch.from_numpy(tokenize(texts[s:s + batch_size])).long().to(device)
        with _autocast(device, amp):
            f = model.encode_text(tokens)
        feats.append(F.normalize(f.float(), dim=-1))
    return torch.cat(feats)


def _encode_shards(model, cfg, device: torch.device) -> tuple[torch.Tensor, list]:
    """Image features [N, D] of every eval-shard sample, and each sample's (txt, meta) in the same
    order. The loader does the images; text and meta are read from its ShardSet by key."""
    loader = build_loader(LoaderConfig(shards=cfg.shards, format=cfg.format, backend=cfg.backend,
                                       device="gpu" if device.type == "cuda" else "cpu", split="eval",
                                       batch_size=cfg.batch_size, image_size=cfg.image_size,
                                       workers=cfg.workers))
    keys: list[str] = []

    def batches() -> Iterator[torch.Tensor]:
        for batch in loader:
            keys.extend(batch.keys)
            yield batch.images

    feats = encode_images(model, batches(), device, cfg.amp)
    records = {}
    for i in range(len(loader.shardset)):
        s = loader.shardset.get(i)
        records[s.key] = (s.txt, s.meta)
    # One rank, no padding: every sample exactly once, so the rows are all real.
    if len(keys) != len(records) or set(keys) != set(records):
        raise RuntimeError(f"{cfg.shards}: loader yielded {len(keys)} samples, shard set holds {len(records)}")
    return feats, [records[k] for k in keys]


class _EvalMode:
    """Put the model in eval mode for the evaluation and restore its training flag afterwards
    (the trainer evaluates mid-run)."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# ---------------------------------------------------------------- evaluators

class RetrievalEvaluator:
    def __init__(self, cfg: RetrievalEvalConfig):
        self.cfg = cfg

    def run(self, model, device: str | torch.device = "cpu") -> dict[str, float]:
        """Image<->text Recall@{1,5,10} and rsum (see `retrieval_metrics`)."""
        cfg, device = self.cfg, torch.device(device)
        with _EvalMode(model):
            if cfg.karpathy_json:
                paths, captions = load_karpathy(cfg.karpathy_json)
                full = [os.path.join(cfg.images_root, p) for p in paths]
                missing = [p for p in full if not os.path.isfile(p)]
                if missing:
                    raise EvalConfigError(f"{cfg.name}: {len(missing)} of {len(full)} images missing under "
                                          f"{cfg.images_root}, e.g. {missing[0]}")
                transform = torchvision_transform(AugmentSpec(cfg.image_size, train=False))
                img = encode_images(model, _image_batches(ImageFiles(full, transform), cfg.batch_size,
                                                          cfg.workers), device, cfg.amp)
            else:
                img, records = _encode_shards(model, cfg, device)
                captions = [[txt] for txt, _ in records]
            texts = [cfg.caption_prefix + c for caps in captions for c in caps]
            text_to_image = [i for i, caps in enumerate(captions) for _ in caps]
            txt = encode_texts(model, texts, device, cfg.batch_size, cfg.amp)
        return retrieval_metrics(img @ txt.T, text_to_image)


class ClassificationEvaluator:
    def __init__(self, cfg: ClassificationEvalConfig):
        self.cfg = cfg

    def run(self, model, device: str | torch.device = "cpu") -> dict[str, float]:
        """top1 / top5 / mean_per_class of zero-shot logits `100 * img @ classifier.T`."""
        cfg, device = self.cfg, torch.device(device)
        with _EvalMode(model):
            if cfg.folder:
                from torchvision.datasets import ImageFolder

                dataset = ImageFolder(cfg.folder, torchvision_transform(AugmentSpec(cfg.image_size, train=False)))
                classnames = self._names([c.replace("_", " ") for c in dataset.classes])
                labels = torch.tensor(dataset.targets)
                img = encode_images(model, _image_batches(dataset, cfg.batch_size, cfg.workers), device, cfg.amp)
            else:
                img, records = _encode_shards(model, cfg, device)
                classnames, labels = self._shard_labels([meta for _, meta in records])
            classifier = self.classifier(model, classnames, device)
        return classification_metrics(100.0 * img @ classifier.T, labels.to(img.device))

    def _names(self, found: list[str]) -> list[str]:
        if self.cfg.classnames is None:
            return found
        if len(self.cfg.classnames) != len(found):
            raise EvalConfigError(f"{self.cfg.name}: {len(self.cfg.classnames)} class names given for "
                                  f"{len(found)} classes")
        return list(self.cfg.classnames)

    def _shard_labels(self, metas: list[dict]) -> tuple[list[str], torch.Tensor]:
        raw = [m.get("label", m.get("class")) for m in metas]
        if any(r is None for r in raw):
            raise EvalConfigError(f"{self.cfg.name}: {sum(r is None for r in raw)} shard samples have no "
                                  "meta['label'] or meta['class']")
        if all(isinstance(r, int) for r in raw):
            if self.cfg.classnames is None:
                raise EvalConfigError(f"{self.cfg.name}: shard labels are indices; pass classnames")
            return list(self.cfg.classnames), torch.tensor(raw)
        names = list(self.cfg.classnames) if self.cfg.classnames is not None else sorted({str(r) for r in raw})
        unknown = {str(r) for r in raw} - set(names)
        if unknown:
            raise EvalConfigError(f"{self.cfg.name}: shard labels not among the class names: {sorted(unknown)[:5]}")
        index = {n: i for i, n in enumerate(names)}
        return names, torch.tensor([index[str(r)] for r in raw])

    def classifier(self, model, classnames: Sequence[str], device: torch.device) -> torch.Tensor:
        """float32 [classes, D]: per class the mean of its normalized prompt embeddings,
        re-normalized (CLIP's prompt ensembling)."""
        templates = list(self.cfg.templates)
        prompts = [t.format(c) for c in classnames for t in templates]
        feats = encode_texts(model, prompts, device, self.cfg.batch_size, self.cfg.amp)
        return F.normalize(feats.view(len(classnames), len(templates), -1).mean(1), dim=-1)


def build_evaluator(cfg: RetrievalEvalConfig | ClassificationEvalConfig):
    if isinstance(cfg, RetrievalEvalConfig):
        return RetrievalEvaluator(cfg)
    if isinstance(cfg, ClassificationEvalConfig):
        return ClassificationEvaluator(cfg)
    raise EvalConfigError(f"no evaluator for {type(cfg).__name__}")


def run_evals(model, configs: Sequence[RetrievalEvalConfig | ClassificationEvalConfig],
              device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """{config name: metrics} for each config, in order."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise EvalConfigError(f"evaluation names must be unique, got {names}")
    return {c.name: build_evaluator(c).run(model, device) for c in configs}


# ---------------------------------------------------------------- reporting

_RETRIEVAL_COLUMNS = [("i2t_R@1", "I2T R@1"), ("i2t_R@5", "R@5"), ("i2t_R@10", "R@10"),
                      ("t2i_R@1", "T2I R@1"), ("t2i_R@5", "R@5"), ("t2i_R@10", "R@10"), ("rsum", "RSUM")]
_CLASSIFICATION_COLUMNS = [("top1", "top-1"), ("top5", "top-5"), ("mean_per_class", "mean/class")]


def to_markdown(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A table shaped like ALIP's: one row per run (`{run: run_evals(...)}`), per retrieval set the
    columns I2T R@1/5/10, T2I R@1/5/10, RSUM, then classification columns; one decimal."""
    columns: list[tuple[str, str, str]] = []  # (eval name, metric, header)
    for evals in results.values():
        for name, metrics in evals.items():
            spec = _RETRIEVAL_COLUMNS if "rsum" in metrics else _CLASSIFICATION_COLUMNS
            for key, header in spec:
                if key in metrics and (name, key) not in [(n, k) for n, k, _ in columns]:
                    columns.append((name, key, f"{name} {header}"))
    lines = ["| run | " + " | ".join(h for _, _, h in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for run, evals in results.items():
        cells = [f"{evals[n][k]:.1f}" if k in evals.get(n, {}) else "–" for n, k, _ in columns]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(path: str, results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Write `{run: {eval: metrics}}` to `path` (JSON) and the Markdown table beside it (.md)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    md = os.path.splitext(path)[0] + ".md"
    with open(md, "w") as f:
        f.write(to_markdown(results))
    return md


# ---------------------------------------------------------------- CLI

def load_model(name: str, checkpoint: str, device: str | torch.device = "cpu", model_config: str | None = None):
    """An open_clip model `name` with the weights of `checkpoint`: an open_clip-layout state dict
    (what the trainer exports; loaded by `open_clip.load_checkpoint`, which also takes
    `{"state_dict": ...}`, `module.` prefixes and safetensors) or a trainer checkpoint whose
    "model" entry is the state dict. `model_config` registers a JSON config file first (its stem
    is the name); train/model_configs/ is registered when present."""
    import open_clip

    for path in (os.path.join(os.path.dirname(__file__), "model_configs"), model_config):
        if path and os.path.exists(path):
            open_clip.add_model_config(path)
    if model_config and not os.path.isfile(model_config):
        raise EvalConfigError(f"model config {model_config} does not exist")
    if name not in open_clip.list_models():
        raise EvalConfigError(f"unknown open_clip model {name!r}; pass --model-config FILE for your own")
    if not os.path.isfile(checkpoint):
        raise EvalConfigError(f"checkpoint {checkpoint} does not exist")
    model = open_clip.create_model(name, pretrained=None)
    try:
        state = None if checkpoint.endswith((".safetensors", ".npz")) else \
            torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            # torch.compile and DDP wrap parameter names; the bare model has neither prefix.
            sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state["model"].items()}
            model.load_state_dict(sd, strict=True)
        else:
            open_clip.load_checkpoint(model, checkpoint)
    except Exception as e:  # noqa: BLE001 - a checkpoint that does not fit is a config error
        raise EvalConfigError(f"checkpoint {checkpoint} does not load into {name}: "
                              f"{str(e).strip().splitlines()[0]}") from e
    return model.to(device).eval()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="open_clip-layout state dict or trainer checkpoint")
    p.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    p.add_argument("--model-config", help="a JSON model config to register (name = file stem)")
    p.add_argument("--retrieval-json", help="Karpathy-style test JSON")
    p.add_argument("--retrieval-shards", help="eval shard folder (one caption per image)")
    p.add_argument("--images-root", help="folder the JSON's image paths are relative to")
    p.add_argument("--retrieval-name", default="retrieval")
    p.add_argument("--caption-prefix", default="", help='e.g. "a photo of " as in ALIP')
    p.add_argument("--classification-folder", help="ImageFolder tree: one subfolder per class")
    p.add_argument("--classification-shards", help="shards labelled by meta label/class")
    p.add_argument("--classification-name", default="classification")
    p.add_argument("--classnames", help="text file, one class name per line, in label order")
    p.add_argument("--templates", help='text file, one prompt template with "{}" per line')
    p.add_argument("--format", default="wds", choices=("wds", "arrow", "rec"))
    p.add_argument("--backend", default="torch", choices=("torch", "dali"))
    p.add_argument("--image-size", type=int, help="default: the model's own")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--run-name", help="row name in the table; default: checkpoint file name")
    p.add_argument("--out", help="results JSON (a Markdown table is written beside it)")
    return p.parse_args(argv)


def _lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise EvalConfigError(f"{path} does not exist")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _configs(a: argparse.Namespace, image_size: int) -> list[RetrievalEvalConfig | ClassificationEvalConfig]:
    common = dict(format=a.format, backend=a.backend, image_size=image_size, batch_size=a.batch_size,
                  workers=a.workers, amp=a.amp)
    configs: list = []
    if a.retrieval_json or a.retrieval_shards:
        configs.append(RetrievalEvalConfig(a.retrieval_name, karpathy_json=a.retrieval_json,
                                           shards=a.retrieval_shards, images_root=a.images_root,
                                           caption_prefix=a.caption_prefix, **common))
    if a.classification_folder or a.classification_shards:
        configs.append(ClassificationEvalConfig(a.classification_name, folder=a.classification_folder,
                                                shards=a.classification_shards, classnames=_lines(a.classnames),
                                                templates=_lines(a.templates) or DEFAULT_TEMPLATES, **common))
    if not configs:
        raise EvalConfigError("nothing to evaluate: pass --retrieval-json/--retrieval-shards and/or "
                              "--classification-folder/--classification-shards")
    return configs


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        configs = _configs(a, a.image_size or 224)  # paths checked before the model is built
        model = load_model(a.model, a.checkpoint, a.device, a.model_config)
        if a.image_size is None:
            size = getattr(model.visual, "image_size", 224)
            size = size[0] if isinstance(size, (tuple, list)) else size
            configs = [dataclasses.replace(c, image_size=int(size)) for c in configs]
        results = {a.run_name or os.path.basename(a.checkpoint): run_evals(model, configs, a.device)}
    except (EvalConfigError, ShardError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(results), end="")
    if a.out:
        md = write_results(a.out, results)
        print(f"wrote {a.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
