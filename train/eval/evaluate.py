"""Zero-shot evaluation (docs/design.md §8): image-text retrieval and classification.

big_vision's protocol: one evaluator per task, built from a small config; `run(model, device)` returns
`{metric: value}`; metrics are pure functions of a similarity matrix. Models are open_clip's (`encode_image`,
`encode_text`); features are L2-normalized here and `logit_scale`, which changes no ranking, is unused.
Retrieval reads a Karpathy-style test JSON, or eval shards with each sample's raw text as its one caption;
classification an ImageFolder tree, or shards labelled by `meta["label"]` / `meta["class"]`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.errors import ShardError
from pipelines.augment.images import decode_rgb
from pipelines.loader import LoaderConfig, build_loader
from pipelines.text import tokenize
from pipelines.backends.torch_loader import torchvision_transform
from pipelines.augment.transforms import AugmentSpec

KS = (1, 5, 10)
RETRIEVAL_KEYS = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in KS] + ["rsum"]
# open_clip's SIMPLE_IMAGENET_TEMPLATES (CLIP's 7-prompt ensemble) as JSON-friendly format strings.
DEFAULT_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                     "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
_CHUNK = 1024  # similarity rows compared at once: bounds memory at COCO-5k x 25k scale


class EvalConfigError(ValueError):
    """A bad evaluation setting or input; the CLI prints it as one line."""


# What lip-eval and lip-train report as one line and exit 2: the user's input, not a bug.
INPUT_ERRORS = (EvalConfigError, ShardError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                PermissionError)


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
    return torch.cat(out)


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
    out = {f"{name}_R@{k}": 100.0 * (rank < k).float().mean().item()
           for name, rank in (("i2t", _ranks(sim, first_best)), ("t2i", _ranks(sim.T, t2i))) for k in KS}
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
    if labels.shape != (n,) or n == 0 or labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"need one label in [0, {classes}) per logits row, got {tuple(labels.shape)} for {n} rows")
    rank = _ranks(logits, labels)
    out = {"top1": 100.0 * (rank < 1).float().mean().item()}
    if classes >= 5:
        out["top5"] = 100.0 * (rank < 5).float().mean().item()
    hits = torch.zeros(classes, device=logits.device).index_add_(0, labels, (rank < 1).float())
    counts = torch.bincount(labels, minlength=classes)
    out["mean_per_class"] = 100.0 * (hits[counts > 0] / counts[counts > 0]).mean().item()
    return out


@dataclass
class _EvalData:  # what both tasks share: a name, where images come from, how they are encoded
    name: str  # the column group in the results table: "flickr", "coco", ...
    _: KW_ONLY
    shards: str | None = None  # a make-shards format folder, read with split="eval"
    format: str = "wds"  # wds | arrow | rec
    backend: str = "torch"  # torch | dali | auto (shards only; the loader resolves auto)
    image_size: int = 224
    batch_size: int = 64
    workers: int = min(4, os.cpu_count() or 1)
    amp: bool = False  # bf16 autocast around the encoders

    def _check(self, **sources: str | None) -> None:
        given = [k for k, v in sources.items() if v]
        if len(given) != 1:
            raise EvalConfigError(f"{self.name}: give exactly one of {' or '.join(sources)} (got {given or 'none'})")
        key, path = given[0], sources[given[0]]
        if not os.path.exists(path):
            raise EvalConfigError(f"{self.name}: {key} {path} does not exist")
        if key == "karpathy_json" and not os.path.isfile(path):
            raise EvalConfigError(f"{self.name}: {key} {path} is not a file")
        if key != "karpathy_json" and not os.path.isdir(path):  # shards, folder
            raise EvalConfigError(f"{self.name}: {key} {path} is not a folder")


@dataclass
class RetrievalEvalConfig(_EvalData):
    karpathy_json: str | None = None
    images_root: str | None = None  # the JSON's image paths are relative to it; default: the JSON's folder
    caption_prefix: str = ""  # ALIP prepends "a photo of "

    def __post_init__(self) -> None:
        self._check(karpathy_json=self.karpathy_json, shards=self.shards)
        if self.karpathy_json and self.images_root is None:
            self.images_root = os.path.dirname(os.path.abspath(self.karpathy_json))
        if self.karpathy_json and not os.path.isdir(self.images_root):
            raise EvalConfigError(f"{self.name}: images_root {self.images_root} is not a folder")

    def karpathy_images(self) -> tuple[list[str], list[list[str]]]:
        """(image file paths, captions per image) of `karpathy_json`, every file checked to exist,
        so a wrong images root is one clear error before any model or training runs."""
        paths, captions = load_karpathy(self.karpathy_json)
        paths = [os.path.join(self.images_root, p) for p in paths]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise EvalConfigError(f"{self.name}: {len(missing)} of {len(paths)} images missing, e.g. {missing[0]} "
                                  f"(is the images root {self.images_root} right?)")
        return paths, captions


@dataclass
class ClassificationEvalConfig(_EvalData):
    folder: str | None = None  # ImageFolder layout: one subfolder per class
    classnames: Sequence[str] | None = None  # default: subfolder names ("_" -> " ") or sorted shard labels
    templates: Sequence[str] = DEFAULT_TEMPLATES  # "{}" stands for the class name

    def __post_init__(self) -> None:
        self._check(folder=self.folder, shards=self.shards)
        if not self.templates or any("{}" not in t for t in self.templates):
            raise EvalConfigError(f"{self.name}: every prompt template needs a '{{}}' for the class name")


def load_karpathy(path: str) -> tuple[list[str], list[list[str]]]:
    """(image paths relative to the images root, captions per image) of the test split."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalConfigError(f"{path}: not a readable JSON file ({e})") from e
    if isinstance(data, dict) and "images" in data:  # Karpathy's dataset_coco.json / dataset_flickr30k.json
        try:
            rows = [(os.path.join(im.get("filepath", ""), im["filename"]), [s["raw"] for s in im["sentences"]])
                    for im in data["images"] if im.get("split") == "test"]
        except (AttributeError, KeyError, TypeError) as e:
            raise EvalConfigError(f"{path}: an images[] entry lacks filename or sentences[].raw ({e!r})") from e
    elif isinstance(data, list) and all(isinstance(r, dict) and "image" in r and "caption" in r for r in data):
        rows = [(r["image"], [r["caption"]] if isinstance(r["caption"], str) else list(r["caption"])) for r in data]
    else:
        raise EvalConfigError(f"{path}: expected a list of {{image, caption}} rows or Karpathy's images[].sentences")
    empty = [p for p, caps in rows if not caps]
    if not rows or empty:
        raise EvalConfigError(f"{path}: no test images" if not rows else
                              f"{path}: {len(empty)} images have no caption, e.g. {empty[0]}")
    return [p for p, _ in rows], [caps for _, caps in rows]


@dataclass
class ImageFiles(torch.utils.data.Dataset):
    """Images read from paths through a transform (a module-level class: it pickles to workers)."""

    paths: Sequence[str]
    transform: Callable[[Image.Image], torch.Tensor]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:  # upright and 8-bit as DALI decodes it, so files and shards give the model the same pixels
            image = decode_rgb(self.paths[i])
        except Exception as e:  # noqa: BLE001 - PIL raises several kinds; name the file
            raise EvalConfigError(f"{self.paths[i]}: image does not decode ({e})") from e
        return self.transform(image)


@torch.no_grad()
def _encode(encode, batches: Iterable[torch.Tensor], device: torch.device, amp: bool) -> torch.Tensor:
    feats = []
    for x in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            f = encode(x.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=-1))  # float32 whatever autocast computed in
    return torch.cat(feats)


def encode_images(model, batches: Iterable[torch.Tensor], device: torch.device, amp: bool = False) -> torch.Tensor:
    """float32 [N, D] unit-norm features of image batches (float [B, 3, H, W] each)."""
    return _encode(model.encode_image, batches, device, amp)


def encode_texts(model, texts: Sequence[str], device: torch.device, batch_size: int = 256,
                 amp: bool = False) -> torch.Tensor:
    """float32 [len(texts), D] unit-norm features; texts are CLIP-BPE tokenized to int64 [B, 77],
    cropped (ending in EOT) when the model's context is shorter, as in our CPU configs."""
    from train.model import EOT_TOKEN, fit_context  # not at the top: it imports open_clip (seconds)
    n = getattr(model, "context_length", 77)
    tokens = (fit_context(torch.from_numpy(tokenize(texts[s:s + batch_size])).long(), n, EOT_TOKEN)
              for s in range(0, len(texts), batch_size))
    return _encode(model.encode_text, tokens, device, amp)


@dataclass
class Evaluator:
    """One task: built from its config, `run(model, device)` returns `{metric: value}`."""

    cfg: RetrievalEvalConfig | ClassificationEvalConfig

    def run(self, model, device: str | torch.device = "cpu") -> dict[str, float]:
        was_training = model.training  # the trainer evaluates mid-run: give its mode back
        try:
            return self._run(model.eval(), torch.device(device))
        finally:
            model.train(was_training)

    def _run(self, model, device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    def _encode_files(self, model, paths: Sequence[str], device: torch.device) -> torch.Tensor:
        c, transform = self.cfg, torchvision_transform(AugmentSpec(self.cfg.image_size, train=False))
        batches = torch.utils.data.DataLoader(ImageFiles(paths, transform), c.batch_size, num_workers=c.workers)
        return encode_images(model, batches, device, c.amp)

    def _encode_shards(self, model, device: torch.device) -> tuple[torch.Tensor, list[tuple[str, dict]]]:
        """Image features [N, D] of every eval-shard sample and its (txt, meta), in the same order:
        the loader does the images; text and meta are read from its ShardSet by key."""
        c = self.cfg
        loader = build_loader(LoaderConfig(shards=c.shards, format=c.format, backend=c.backend, split="eval",
                                           device="gpu" if device.type == "cuda" else "cpu",
                                           batch_size=c.batch_size, image_size=c.image_size, workers=c.workers))
        feats, keys = [], []
        for batch in loader:
            keys.extend(batch.keys)
            feats.append(encode_images(model, [batch.images], device, c.amp))
        records = {s.key: (s.txt, s.meta) for s in map(loader.shardset.get, range(len(loader.shardset)))}
        if sorted(keys) != sorted(records):  # one rank, no padding: each sample once, every row real
            raise RuntimeError(f"{c.shards}: loader yielded {len(keys)} samples, shard set holds {len(records)}")
        return torch.cat(feats), [records[k] for k in keys]


class RetrievalEvaluator(Evaluator):
    """Image<->text Recall@{1,5,10} and rsum (see `retrieval_metrics`)."""

    def _run(self, model, device: torch.device) -> dict[str, float]:
        c = self.cfg
        if c.karpathy_json:
            paths, captions = c.karpathy_images()
            img = self._encode_files(model, paths, device)
        else:
            img, records = self._encode_shards(model, device)
            captions = [[txt] for txt, _ in records]
        texts = [c.caption_prefix + t for caps in captions for t in caps]
        txt = encode_texts(model, texts, device, c.batch_size, c.amp)
        return retrieval_metrics(img @ txt.T, [i for i, caps in enumerate(captions) for _ in caps])


class ClassificationEvaluator(Evaluator):
    """top1 / top5 / mean_per_class of zero-shot logits `100 * img @ classifier.T`."""

    def _run(self, model, device: torch.device) -> dict[str, float]:
        c = self.cfg
        if c.folder:
            from torchvision.datasets import ImageFolder  # its class discovery and file filter
            folder = ImageFolder(c.folder)
            names = [n.replace("_", " ") for n in folder.classes]
            if c.classnames is not None and len(c.classnames) != len(names):
                raise EvalConfigError(f"{c.name}: {len(c.classnames)} class names for {len(names)} class folders")
            img = self._encode_files(model, [p for p, _ in folder.samples], device)
            labels = torch.tensor(folder.targets)
        else:
            img, records = self._encode_shards(model, device)
            names, labels = self._shard_labels([meta for _, meta in records])
        classifier = self.classifier(model, c.classnames or names, device)
        return classification_metrics(100.0 * img @ classifier.T, labels.to(img.device))

    def _shard_labels(self, metas: list[dict]) -> tuple[list[str], torch.Tensor]:
        """(class names, int64 [N]) from meta label/class: indices into `classnames`, or names."""
        c, raw = self.cfg, [m.get("label", m.get("class")) for m in metas]
        if all(isinstance(r, int) for r in raw):
            if c.classnames is None or max(raw) >= len(c.classnames):
                raise EvalConfigError(f"{c.name}: shard labels are indices up to {max(raw)}; pass all class names")
            return list(c.classnames), torch.tensor(raw)
        names = list(c.classnames) if c.classnames is not None else sorted({str(r) for r in raw if r is not None})
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(r) for r in raw if str(r) not in index})
        if unknown:
            raise EvalConfigError(f"{c.name}: shard labels not among the class names (None: no label): {unknown[:5]}")
        return names, torch.tensor([index[str(r)] for r in raw])

    def classifier(self, model, classnames: Sequence[str], device: torch.device) -> torch.Tensor:
        """float32 [classes, D]: per class the mean of its normalized prompt embeddings,
        re-normalized (CLIP's prompt ensembling)."""
        c = self.cfg
        prompts = [t.format(n) for n in classnames for t in c.templates]
        feats = encode_texts(model, prompts, device, c.batch_size, c.amp)
        return F.normalize(feats.view(len(classnames), len(c.templates), -1).mean(1), dim=-1)


def run_evals(model, configs: Sequence[RetrievalEvalConfig | ClassificationEvalConfig],
              device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """{config name: metrics} for each config, in order. `model`: an open_clip model (the trainer's
    DualPathCLIP has no encode_image: pass its `.clip`, unwrapped from DDP)."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise EvalConfigError(f"evaluation names must be unique, got {names}")
    evaluator = {RetrievalEvalConfig: RetrievalEvaluator, ClassificationEvalConfig: ClassificationEvaluator}
    return {c.name: evaluator[type(c)](c).run(model, device) for c in configs}


_RETRIEVAL_COLUMNS = [("i2t_R@1", "I2T R@1"), ("i2t_R@5", "R@5"), ("i2t_R@10", "R@10"),
                      ("t2i_R@1", "T2I R@1"), ("t2i_R@5", "R@5"), ("t2i_R@10", "R@10"), ("rsum", "RSUM")]
_CLASSIFICATION_COLUMNS = [("top1", "top-1"), ("top5", "top-5"), ("mean_per_class", "mean/class")]


def to_markdown(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A table shaped like ALIP's: one row per run (`{run: run_evals(...)}`), per retrieval set the
    columns I2T R@1/5/10, T2I R@1/5/10, RSUM, then classification columns; one decimal."""
    columns: dict[tuple[str, str], str] = {}  # (eval name, metric) -> header, in first-seen order
    for evals in results.values():
        for name, metrics in evals.items():
            for key, header in _RETRIEVAL_COLUMNS if "rsum" in metrics else _CLASSIFICATION_COLUMNS:
                if key in metrics:
                    columns.setdefault((name, key), f"{name} {header}")
    lines = ["| run | " + " | ".join(columns.values()) + " |", "|---|" + "---:|" * len(columns)]
    for run, evals in results.items():
        cells = [f"{evals[n][k]:.1f}" if k in evals.get(n, {}) else "–" for n, k in columns]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(path: str, results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Write `{run: {eval: metrics}}` to `path` (JSON) and the Markdown table beside it (.md)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    md = os.path.splitext(path)[0] + ".md"
    Path(path).write_text(json.dumps(results, indent=2))
    Path(md).write_text(to_markdown(results))
    return md


def load_model(name: str, checkpoint: str, device: str | torch.device = "cpu", model_config: str | None = None):
    """Open_clip model `name` with the weights of `checkpoint`: an open_clip-layout state dict (the
    trainer's export) or a trainer checkpoint. `model_config`: a JSON config to register first (name =
    its stem); train/model_configs/ is registered too."""
    import open_clip  # here, not at the top: it costs seconds and only the CLI needs it

    from train.model import MODEL_CONFIGS
    if model_config and not os.path.isfile(model_config):
        raise EvalConfigError(f"model config {model_config} does not exist")
    for path in (MODEL_CONFIGS, model_config):
        if path and os.path.exists(path):
            open_clip.add_model_config(path)
    if name not in open_clip.list_models():
        raise EvalConfigError(f"unknown open_clip model {name!r}; pass --model-config FILE for your own")
    if not os.path.isfile(checkpoint):
        raise EvalConfigError(f"checkpoint {checkpoint} does not exist")
    try:  # weights-only unpickling, allowing the numpy types of a trainer checkpoint's RNG state
        with torch.serialization.safe_globals([np.ndarray, np.dtype, np.zeros(1).__reduce__()[0],
                                               type(np.dtype(np.uint32))]):
            state = None if checkpoint.endswith(".safetensors") else torch.load(checkpoint, "cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a trainer checkpoint
            model = open_clip.create_model(name)  # (it logs "initialized randomly": the weights come next)
            # DDP, torch.compile and DualPathCLIP prefix the names of the bare open_clip model's weights.
            weights = {re.sub(r"^(module\.|_orig_mod\.|clip\.)+", "", k): v for k, v in state["model"].items()}
            adapters = {k.split(".", 1)[1]: weights.pop(k) for k in list(weights) if k.startswith("adapters.")}
            model.load_state_dict(weights, strict=True)
            if adapters:  # a LilT or ELIP run (train/variants/tuning.py): its adapters, hooked in as load_adapted does
                from train.variants.tuning import adapters_for
                tuning = (state.get("config") or {}).get("model", {}).get("tuning", "lilt")
                model.lilt_adapters = adapters_for(model, tuning)
                model.lilt_adapters.load_state_dict(adapters)
        else:  # open_clip's own load_checkpoint: {"state_dict": ...}, "module." prefixes, safetensors
            model = open_clip.create_model(name, pretrained=checkpoint)
    except Exception as e:  # noqa: BLE001 - a checkpoint that does not fit is a config error
        why = " ".join(str(e).split())[:300]  # one line, however long the state-dict report
        raise EvalConfigError(f"checkpoint {checkpoint} does not load into {name}: {why}") from e
    return model.to(device).eval()


def one_line(e: BaseException) -> str:
    """An input error's message as one line. A DataLoader worker's error comes back re-raised with
    the worker's traceback in its message; its last line is the original `module.Class: message`."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())
