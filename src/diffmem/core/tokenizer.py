"""CLIP's BPE tokenizer, built offline from the vocabulary shipped in the package.

The files under ``diffmem/assets/clip_tokenizer`` are derived from CLIP's merge list by
``tools/derive_clip_tokenizer.py``; they give the same ids as the hub's CLIP tokenizer.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer

SD_MAX_LENGTH = 77


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    root = resources.files("diffmem") / "assets" / "clip_tokenizer"
    vocab = json.loads((root / "vocab.json").read_text(encoding="utf-8"))
    lines = (root / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line]
    return vocab, merges


def clip_tokenizer(model_max_length: int = SD_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIPTokenizer (lower-casing, BOS/EOS, padding with EOS as SD does) with no network."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
