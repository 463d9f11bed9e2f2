"""Typed run configuration: dataclasses filled from YAML (stating only what differs from the
defaults), then dotted `key=value` overrides. Unknown keys are errors naming the key."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field

import yaml

from pipelines.loader_settings import CHOICES, LoaderSettings
from pipelines.priority import resolve_nice
from pipelines.sources import parse_sources
from pipelines.storage.remote import parse_size
from train import objectives


class ConfigError(ValueError):
    pass


# loss.evidential_clamp's upper end: with |cos| ≤ 1 a clamp at the scale (ELIP's 100) clamps
# nothing, and the loss is tested against 100-digit arithmetic up to it
MAX_EVIDENTIAL_CLAMP = 100.0
# run.keep_best's choices: lip-eval's retrieval keys and train/validation.py's two derived ones
KEEP_BEST_METRICS = ("mean_r1", "r_mean", "rsum", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5",
                     "t2i_R@10")


@dataclass
class DataConfig(LoaderSettings):
    """`data.*`: the loader's settings, inherited (pipelines/loader_settings.py holds each one's default
    and description), and the run's own data. Redeclared below: what lip-train defaults to otherwise
    than the loader (backend and device auto, batch size 64 where the loader has dali, cpu, 256) and
    its narrower shuffle (a training run always shuffles: global or block, never by split)."""
    # a make-shards format folder (shards/demo/train/wds) or s3://bucket/prefix; or a list of sources to mix,
    # each a folder/url or {shards, weight (repeat factor, default 1), format, name} (docs/loading.md, Mixing datasets)
    train_shards: str | list = ""
    # auto | torch | dali. auto: DALI when nvidia.dali imports (its GPU graph with CUDA, else its CPU
    # graph), else torch; the run logs the choice and its config.yaml records it
    backend: str = "auto"
    device: str = "auto"  # auto (gpu when CUDA is present) | gpu | cpu
    batch_size: int = 64  # per rank
    shuffle: str = "global"  # global (all samples) | block (shards, then samples within blocks: network storage)


@dataclass
class TokenPruningConfig:  # ELIP's vision-token pruning (train/variants/pruning.py), training forward only
    enabled: bool = False  # prune vision tokens while training
    layers: list[int] = field(default_factory=lambda: [2, 4, 10])  # prune before these ViT blocks
    keep: list[float] = field(default_factory=lambda: [0.9, 0.65, 0.4])  # int((patches + 1) × r) stay
    # Look-ahead per layer: blocks i … i+L−1 run on a copy and block i+L−1's CLS attention scores.
    # None: to the block before the next pruning layer, the last to the tower's end ([2, 6, 2] for
    # [2, 4, 10] in 12 blocks, ELIP's); [1, 1, 1] scores with the pruning block's own attention.
    act_layers: list[int] | None = None
    text_rescale: bool = False  # scale the guiding text to the CLS norm (ELIP: no)


@dataclass
class ModelConfig:
    name: str = "ViT-B-32"  # any open_clip config name, or ours in train/model_configs/
    pretrained: str | None = None  # an open_clip checkpoint file; None = random init
    grad_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower
    compile: bool = False  # torch.compile the model
    # run the text tower up to each batch's longest text, not the whole context (the same features
    # to float rounding; open_clip CLIP models with a causal mask, others run as they are)
    trim_text: bool = True
    # none (all trains) | lit (image tower locked but its projection) | lilt (norms, projections, adapters)
    # | elip (ELIP: every loaded weight frozen, adapters on each block's attention and MLP outputs)
    tuning: str = "none"
    # lilt: reference (both adapter layers N(0, 0.02), biases 0: codezakh/LilT) | zero (W_up = 0: frozen model at start)
    adapter_init: str = "reference"
    token_pruning: TokenPruningConfig = field(default_factory=TokenPruningConfig)


@dataclass
class LossConfig:
    mode: str = "alip"  # clip-raw | clip-both | alip | evidential (ELIP, train/variants/evidential.py)
    local_loss: bool = False  # open_clip's local loss: each rank scores its own rows against the global batch
    gather_with_grad: bool = False  # gather other ranks' features with their gradients
    momentum: float = 0.99  # alip: the gates' running means H (momentum of their moving average)
    gamma_sample: float = 2.0  # alip: γ_s of the language gate's sample weight min(1, exp(γ_s·(S − H)))
    gamma_pair: float = 2.0  # alip: γ_p of the description gate's pair weights exp(γ_p·(S − H))
    normalize: str = "mean"  # mean (ALIP) | weight_sum
    h_init: str = "one"  # one (ALIP: gate means start at 1.0) | first_batch (the first batch's means)
    text: str = "raw"  # evidential only: the text it pairs with images: raw | syn | both (two terms)
    # ELIP's ±10 saturates cosines above 0.1 at logit scale 100; any value in (0, 100] (the loss is
    # computed in log space and float64: within 1e-12 there, train/variants/evidential.py)
    evidential_clamp: float = 10.0
    evidential_scale: float | str = 100.0  # evidential logits' scale: ELIP's constant 100 | learned (exp(logit_scale))
    kl_anneal_epochs: float = 20.0  # KL weight min(1, (epoch + 1) / this), epoch 0-based (ELIP: 20); 0 = full


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.2  # AdamW's; not on biases, norms, embeddings, logit_scale unless decay_all
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW's
    eps: float = 1e-6  # AdamW's
    decay_all: bool = False  # True reproduces ALIP: decay on every parameter
    schedule: str = "cosine"  # cosine (linear warm-up) | onecycle (ALIP, 10 % warm-up)
    warmup_steps: int = 100  # linear warm-up steps (cosine schedule)
    epochs: int = 1  # passes over the shards
    max_steps: int | None = None  # stop early (demo, benchmarks)
    accum_steps: int = 1  # micro-batches of data.batch_size per optimizer step
    clip_grad: float | None = 1.0  # gradient norm clip; None: no clipping
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    fused: bool | None = None  # AdamW's fused kernel; None: on for CPU and CUDA (20-25 % of a small CPU step)


@dataclass
class EvalConfig:
    retrieval_json: str | None = None  # Karpathy-style test list
    images_root: str | None = None  # retrieval_json's image paths are relative to it; default: the JSON's folder
    caption_prefix: str = ""  # put before every caption (ALIP: "a photo of ")
    batch_size: int = 64  # the evaluation's batch size (rank 0 evaluates, at the end and when every_* says)
    # evaluate retrieval_json at the end of every this many epochs during training (metrics.jsonl's
    # eval/<metric> rows, TensorBoard, plots/eval_*.png); 0: only at the end of the run
    every_epochs: int = 0
    every_steps: int = 0  # also every this many steps; 0: off


@dataclass
class RunConfig:
    name: str = "run"  # the run's folder under out_dir
    out_dir: str = "runs"  # where run folders go
    seed: int = 0  # model init, data order and augmentation
    log_every: int = 10  # steps between metrics lines
    ckpt_every: int = 200  # steps; also at every epoch end and at the end
    keep_checkpoints: int = 2  # checkpoints kept; older ones are deleted
    resume: str | None = None  # latest | a checkpoint path
    plots: bool = True  # plots/*.png at the end of the run
    # torch's CPU (intra-op) threads; 0: lip-train picks (train/cpu_threads.py): on a CPU the cores the
    # loader's decoding leaves (at least half of them), on a GPU torch's default; OMP_NUM_THREADS wins when set
    threads: int = 0
    # alip: the gates' per-sample record holds every sample up to this many, else this many fixed
    # ids (train/sample_weights.py): 20-28 B each per rank and per checkpoint
    sample_record_max: int = 1_000_000
    # "" (off) | a validation metric (mean_r1, r_mean = rsum/6 as ELIP selects, rsum, i2t_R@1, ...):
    # the weights of the best evaluation so far go to <run>/best/ (checkpoint.pt, open_clip_model.pt)
    # beside the last; needs eval.every_epochs or eval.every_steps; a resumed run keeps the best so far
    keep_best: str = ""


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "TrainConfig":
        checks = [("loss.mode", self.loss.mode, objectives.names()),
                  ("loss.text", self.loss.text, ("raw", "syn", "both")),
                  ("model.tuning", self.model.tuning, ("none", "lit", "lilt", "elip")),
                  ("model.adapter_init", self.model.adapter_init, ("reference", "zero")),
                  ("optim.schedule", self.optim.schedule, ("cosine", "onecycle")),
                  ("optim.precision", self.optim.precision, ("auto", "fp32", "bf16", "fp16")),
                  *((f"data.{name}", getattr(self.data, name), allowed) for name, allowed in CHOICES.items()),
                  ("data.shuffle", self.data.shuffle, ("global", "block")),
                  ("loss.normalize", self.loss.normalize, ("mean", "weight_sum")),
                  ("loss.h_init", self.loss.h_init, ("one", "first_batch"))]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        if not self.data.train_shards:
            raise ConfigError("data.train_shards: required (a make-shards format folder or s3://bucket/prefix)")
        try:
            parse_sources(self.data.train_shards, self.data.format)
        except ValueError as e:
            raise ConfigError(f"data.train_shards: {e}") from None
        try:
            parse_size(self.data.cache_limit)
        except ValueError as e:
            raise ConfigError(f"data.cache_limit: {e}") from None
        try:
            resolve_nice(self.data.decode_nice, "cpu")
        except ValueError as e:
            raise ConfigError(f"data.decode_nice: {e}") from None
        try:
            evidential_scale(self.loss.evidential_scale)
        except ValueError as e:
            raise ConfigError(f"loss.evidential_scale: {e}") from None
        if not 0 < self.loss.evidential_clamp <= MAX_EVIDENTIAL_CLAMP:  # NaN fails too
            raise ConfigError(f"loss.evidential_clamp: {self.loss.evidential_clamp!r} is not in (0, "
                              f"{MAX_EVIDENTIAL_CLAMP:g}] (100: no clamp at scale 100; tested up to there)")
        for key, value in (("eval.every_epochs", self.eval.every_epochs), ("eval.every_steps", self.eval.every_steps)):
            if value < 0:
                raise ConfigError(f"{key}: must be ≥ 0 (0: off)")
            if value and not self.eval.retrieval_json:
                raise ConfigError(f"{key}: validating needs eval.retrieval_json (the test set to evaluate)")
        if self.run.keep_best:
            if self.run.keep_best not in KEEP_BEST_METRICS:
                raise ConfigError(f"run.keep_best: {self.run.keep_best!r} is not one of {', '.join(KEEP_BEST_METRICS)} "
                                  "(or \"\" for off)")
            if not (self.eval.every_epochs or self.eval.every_steps):
                raise ConfigError("run.keep_best: needs eval.every_epochs or eval.every_steps (with neither, the "
                                  "only evaluation is the last)")
        if self.data.shuffle_block_shards < 1:
            raise ConfigError("data.shuffle_block_shards: must be ≥ 1")
        if self.optim.accum_steps < 1:
            raise ConfigError("optim.accum_steps: must be ≥ 1")
        if self.run.sample_record_max < 1:
            raise ConfigError("run.sample_record_max: must be ≥ 1")
        if self.run.threads < 0:
            raise ConfigError("run.threads: must be ≥ 0 (0: lip-train picks)")
        return self


def evidential_scale(value) -> float | None:
    """`loss.evidential_scale` → the constant scale, or None for `learned` (the model's
    exp(logit_scale)); ValueError for anything else. (Here, not in train/variants/evidential.py: reading a
    config needs no torch.)"""
    if value == "learned":
        return None
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is neither a number nor 'learned'") from None
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{value!r} must be a positive number (ELIP: 100) or 'learned'")
    return scale


def _coerce(value, tp, key: str):
    """YAML value → the field's declared type, or a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _merge(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping")
            _merge(current, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:  # its message spans lines: keep the error to one
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None


def load_config(path: str | None = None, overrides: list[str] | None = None,
                validate: bool = True) -> TrainConfig:
    cfg = TrainConfig()
    if path:
        with open(path) as f:
            values = _yaml(f.read(), path) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, loss:, ...)")
        _merge(cfg, values)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-3")
        key, raw = item.split("=", 1)
        nested: dict = {}
        cursor = nested
        *parents, leaf = key.strip().split(".")
        target = cfg
        for p in parents:
            cursor = cursor.setdefault(p, {})
            target = getattr(target, p, None)
        value = _yaml(raw, key.strip())
        hint = typing.get_type_hints(type(target)).get(leaf) if dataclasses.is_dataclass(target) else None
        listed = isinstance(value, list) and any(a is list or typing.get_origin(a) is list for a in typing.get_args(hint))
        if (hint is str or str in typing.get_args(hint)) and not isinstance(value, str) and not listed \
                and not (value is None and hint is not str):
            value = raw  # a string field keeps the text YAML would type: run.name=001 is "001", not 1
        cursor[leaf] = value
        _merge(cfg, nested)
    return cfg.validate() if validate else cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """A config dataclass's fields → their descriptions: the `# comment` lines right above the
    field and the one trailing it, read from the source of the class that declares it (the
    definitions are the docs). An inherited field (data.*: pipelines/loader_settings.py) has its
    base's description unless the subclass redeclares it with its own."""
    out = {}
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            out = field_comments(base) | out
    return out | {k: v for k, v in _own_comments(cls).items() if v}


def _own_comments(cls: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen, zipped): no descriptions
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    lines = src.splitlines()
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, ln = [], node.lineno - 1
        while ln in comments and lines[ln - 1].lstrip().startswith("#"):
            above.insert(0, comments[ln])
            ln -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        out[node.target.id] = " ".join(above + trailing)
    return out


def config_keys(obj=None, prefix: str = "") -> list[tuple[str, object, str]]:
    """Every leaf key of a TrainConfig, dotted: (key, value, description), in declaration order."""
    obj = TrainConfig() if obj is None else obj
    notes = field_comments(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += config_keys(value, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, value, notes.get(f.name, "")))
    return out


def format_value(value) -> str:
    """A value as it would be written in a key=value override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def describe_config(cfg: TrainConfig | None = None) -> str:
    """`lip-train --print-config`: one line per key, `key = value  # description`; when `cfg` is
    given, a value that differs from the default also shows the default."""
    defaults = {k: v for k, v, _ in config_keys()}
    rows = []
    for key, value, note in config_keys(cfg):
        shown = format_value(value)
        if cfg is not None and value != defaults[key]:
            shown += f"  (default: {format_value(defaults[key])})"
        rows.append((f"{key} = {shown}", note))
    width = min(max(len(r) for r, _ in rows), 60)
    return "\n".join(f"{r:<{width}}  # {note}" for r, note in rows)
