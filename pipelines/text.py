"""Text cleaning and CLIP BPE tokenization, shared by the converter and the loaders."""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys

import ftfy
import numpy as np

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
