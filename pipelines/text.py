"""Text cleaning and CLIP BPE tokenization, shared by the converter and the loaders."""
from __future__ import annotations

import functools
import re

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
    # Imported lazily: open_clip pulls in torch, which conversion without tokens never needs.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=CONTEXT_LENGTH)


def tokenize(texts: list[str]) -> np.ndarray:
    """int32 [len(texts), 77] CLIP BPE ids, exactly as `open_clip.tokenize` produces them."""
    return _tokenizer()(list(texts)).numpy().astype(np.int32)
