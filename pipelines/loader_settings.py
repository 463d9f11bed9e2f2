"""The loader's settings, each defined once (`LoaderSettings`: name, default, description), and the
one resolution of `auto` for the backend and the device that every tool uses: lip-train (its
`data.*` keys are these settings), lip-eval, caption-shards, bench-loader.

No torch at import: reading lip-train's config imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.formats.base import DEFAULT_OPEN_SHARDS
from pipelines.formats.registry import FORMATS
from pipelines.plan.epoch_plan import DEFAULT_BLOCK_SHARDS
from pipelines.storage.remote import DEFAULT_CACHE_DIR, DEFAULT_CACHE_LIMIT

BACKENDS = ("dali", "torch")
DEVICES = ("gpu", "cpu")
# What a setting may be. `auto` (backend, device) is resolved by `resolve_backend` / `resolve_device`
# below: the one rule every tool uses (lip-train, lip-eval, caption-shards, bench-loader).
CHOICES = {"format": tuple(FORMATS), "backend": ("auto", *BACKENDS), "device": ("auto", *DEVICES)}


@dataclass
class LoaderSettings:
    """The loader's settings a caller chooses for its data: each defined here once, with its default
    and description. lip-train's `data.*` keys are these (train/config.py `DataConfig` inherits them;
    `--print-config` reads the comments below)."""
    format: str = "wds"  # a single folder's format: wds | arrow | rec (a listed source's: what its folder says)
    # a resume onto changed sources (added, removed, re-weighted, re-converted) starts the next epoch with them;
    # without it such a resume is an error naming the change
    remix_at_epoch: bool = False
    backend: str = "dali"  # dali | torch | auto (resolve_backend: DALI when it imports, else torch)
    device: str = "cpu"  # gpu | cpu | auto (gpu when CUDA is present)
    batch_size: int = 256  # per rank
    image_size: int = 224  # pixels, square: the images' side (train: the random crop's)
    workers: int = 2  # loader worker processes per rank
    # how far below the iterating (training) thread the decoders run, as Unix nice 0..19; default: 10 on
    # a CPU, 0 on the GPU (pipelines/priority.py)
    decode_nice: int | None = None
    flip: bool = True  # random horizontal flips (off when captions say left/right)
    hw_decoder_load: float = 0.65  # DALI on GPU: share of JPEGs sent to the hardware decoder
    shuffle: bool | str | None = None  # global (True) | block | none (False); default: global for train, none for eval
    shuffle_block_shards: int = DEFAULT_BLOCK_SHARDS  # shuffle=block: shards whose samples are mixed together
    cache_dir: str = DEFAULT_CACHE_DIR  # the node's cache: s3:// shards (a folder per url), built indexes
    cache_limit: int | str = DEFAULT_CACHE_LIMIT  # s3:// shards: what the node's cache may hold (bytes, or with a unit)
    max_open_shards: int = DEFAULT_OPEN_SHARDS  # shard files each loader process keeps mapped (least recently used closed)


def dali_unavailable() -> str | None:
    """Why nvidia.dali cannot be used here, or None when it imports."""
    try:
        import nvidia.dali  # noqa: F401  (a broken install fails with more than ImportError)
    except Exception as e:
        return f"nvidia.dali not importable: {' '.join(str(e).split()) or type(e).__name__}"
    return None


def resolve_device(device: str = "auto") -> str:
    """`device` → gpu | cpu; `auto`: gpu when CUDA is available."""
    return ("gpu" if _cuda() else "cpu") if device == "auto" else device


def resolve_backend(backend: str = "auto", device: str = "auto", *, on_cpu: str = "dali",
                    key: str = "") -> tuple[str, str]:
    """(the backend a loader uses, why). `auto`: torch when nvidia.dali does not import; else DALI
    on the GPU (`device` gpu, or auto with CUDA available), and `on_cpu` on a CPU: DALI's CPU graph
    by default (lip-train), torch for a tool that prefers it there (caption-shards, whose resumable
    runs record the backend). `torch` / `dali` are kept as set. `key` prefixes the setting's name
    in the reason (lip-train: "data." → "data.device=cpu")."""
    if backend != "auto":
        return backend, "set explicitly"
    if why := dali_unavailable():
        return "torch", why
    if device == "cpu":
        cpu = f"{key}device=cpu"
    elif device == "gpu" or _cuda():
        return "dali", "gpu graph: CUDA device available"
    else:
        cpu = "no CUDA device"
    return on_cpu, f"cpu graph: {cpu}" if on_cpu == "dali" else f"on a CPU: {cpu}"


def backend_line(backend: str = "auto", device: str = "auto", *, on_cpu: str = "dali",
                 key: str = "") -> tuple[str, str]:
    """(resolved backend, the line a run logs), e.g. `data.backend=auto -> dali (cpu graph: no CUDA device)`."""
    chosen, why = resolve_backend(backend, device, on_cpu=on_cpu, key=key)
    return chosen, f"{key}backend={backend} -> {chosen} ({why})"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
