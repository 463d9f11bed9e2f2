"""Text cleaning and CLIP BPE tokenization, shared by the converter and the loaders."""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys

import ftfy
import numpy as np

from pipelines.plan.permutation import mix, mix_array
from pipelines.schema import CONTEXT_LENGTH

TOKENIZER_NAME = "openai-clip-bpe-49408"  # open_clip's SimpleTokenizer, vocabulary shipped in the wheel
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """ftfy-fixed (mojibake, HTML entities) and whitespace-normalized: how shards store text."""
    return _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip()


@functools.lru_cache(maxsize=1)
def _tokenizer():
    """open_clip's own SimpleTokenizer, loaded without `open_clip/__init__`: that imports every
    model (torchvision, dynamo; ~4 s per process) where the tokenizer needs only its module."""
    if "open_clip" in sys.modules:
        from open_clip.tokenizer import SimpleTokenizer
    else:
        spec = importlib.util.find_spec("open_clip")
        path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
        module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        SimpleTokenizer = module.SimpleTokenizer
    return SimpleTokenizer(context_length=CONTEXT_LENGTH)


def load_tokenizer() -> None:
    """Load the tokenizer now (e.g. before forking workers, so they share it)."""
    _tokenizer()


def tokenize(texts: list[str]) -> np.ndarray:
    """int32 [len(texts), 77] CLIP BPE ids, exactly as `open_clip.tokenize` produces them."""
    return _tokenizer()(list(texts)).numpy().astype(np.int32)


def choose_caption(n_syn: int, seed: int, epoch: int, gid: int) -> int:
    """Which synthetic caption sample `gid` uses this epoch: the same in every backend and worker."""
    return mix(seed, epoch, gid) % n_syn if n_syn > 1 else 0


def choose_captions(n_syn: np.ndarray, seed: int, epoch: int, gids: np.ndarray) -> np.ndarray:
    """`choose_caption` for a batch (int64 [B]), in one vectorised hash: equal element by element."""
    n_syn, gids = np.asarray(n_syn, np.int64), np.asarray(gids, np.int64)
    out = np.zeros(len(n_syn), np.int64)
    several = n_syn > 1
    if several.any():
        out[several] = (mix_array(seed, epoch, gids[several]) % n_syn[several].astype(np.uint64)).astype(np.int64)
    return out


def sample_tokens(samples, gids, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw int64 [B,77], syn int64 [B,77], has_syn bool [B]) for Samples, using their stored
    tokens where they cover the chosen caption and tokenizing the rest in one call."""
    n = len(samples)
    raw = np.zeros((n, CONTEXT_LENGTH), np.int64)
    syn = np.zeros((n, CONTEXT_LENGTH), np.int64)
    has_syn = np.zeros(n, bool)
    todo, slots = [], []
    for i, (s, gid) in enumerate(zip(samples, gids)):
        has_syn[i] = bool(s.syn)
        choice = choose_caption(len(s.syn), seed, epoch, int(gid))
        if s.tokens is not None:
            raw[i] = s.tokens[0]
        else:
            todo.append(s.txt)
            slots.append((raw, i))
        if s.tokens is not None and choice == 0:
            syn[i] = s.tokens[1] if s.syn else s.tokens[0]
        else:
            todo.append(s.syn[choice] if s.syn else s.txt)
            slots.append((syn, i))
    if todo:
        for (array, i), tok in zip(slots, tokenize(todo)):
            array[i] = tok
    return raw, syn, has_syn
