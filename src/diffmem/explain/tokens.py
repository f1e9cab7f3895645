"""The prompt's words as the model sees them, shared by both explainers."""

from __future__ import annotations

import torch
from tokenizers import decoders

from ..core import denoise
from ..core.errors import InputError
from ..core.prompts import lone_surrogate

END_OF_WORD = "</w>"
_BYTE_LEVEL = decoders.ByteLevel()


def readable(pieces: list[str]) -> str:
    """The text of byte-level BPE pieces, end-of-word marks dropped: CLIP's vocabulary writes "é" as
    "Ã©" and an emoji as "ðŁĲ±". A piece holding only part of a character reads as U+FFFD."""
    return _BYTE_LEVEL.decode([p.replace(END_OF_WORD, "") for p in pieces])


def prompt_tokens(pipe, prompt: str) -> tuple[list[str], list[int], list[str]]:
    """BPE tokens of the prompt as the model sees them (truncated), the word each belongs to, the words
    (as text: decoded from the byte-level pieces, so that "café" is not shown, or re-tokenized, as "cafÃ©")."""
    ids = denoise.tokenize(pipe, [prompt])[0].tolist()
    end = denoise.text_end(pipe, ids)  # the last word, not the first EOS: one may be typed inside the prompt
    if end == 1:
        raise InputError(_no_words(prompt))
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids[1:end])
    special = set(pipe.tokenizer.all_special_tokens)
    # "<|startoftext|>" and textual inversion's tokens have no end-of-word mark, yet are words of their own
    whole = special | denoise.added_tokens(pipe)
    words, word_of, pieces = [], [], []
    inverted = None  # the textual-inversion token just read, whose further vectors' tokens may follow
    for tok in tokens:
        if inverted is not None and tok in whole and tok.startswith(inverted + "_"):
            word_of.append(len(words) - 1)  # "<my-style>_1": the same word as written, "<my-style>"
            continue
        inverted = None
        if tok in whole and pieces:
            words.append(readable(pieces))
            pieces = []
        word_of.append(len(words))
        pieces.append(tok)
        if tok.endswith(END_OF_WORD) or tok in whole:
            words.append(readable(pieces))
            pieces = []
            inverted = tok if tok in whole and tok not in special else None
    if pieces:
        words.append(readable(pieces))
    return tokens, word_of, words


def encode_token_embeddings(pipe, ids: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
    """The text encoder's output for ``ids`` with its input token embeddings replaced by
    ``token_embeddings`` (positional embeddings still added), as ``denoise.encode_text`` computes it."""
    layer = pipe.text_encoder.get_input_embeddings()
    hook = layer.register_forward_hook(lambda module, inputs, output: token_embeddings)
    try:
        mask = None
        if getattr(pipe.text_encoder.config, "use_attention_mask", False):
            mask = (ids != pipe.tokenizer.pad_token_id).long()
        return pipe.text_encoder(ids, attention_mask=mask)[0].to(dtype=pipe.unet.dtype)
    finally:
        hook.remove()


def check_prompt(prompt: str) -> str:
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"attribute() explains one prompt, a string; got {type(prompt).__name__} "
                         "(explain_prompts explains many)")
    if prompt is None or not prompt.strip():
        raise InputError("the prompt to explain is empty")
    if problem := lone_surrogate(prompt):
        raise InputError(f"the prompt to explain {problem}")
    return prompt


def _no_words(prompt: str) -> str:
    return f"the prompt {prompt!r} has no words to rank: the tokenizer reads all of it as special tokens"


def check_words(pipe, prompt: str) -> str:
    """A prompt the tokenizer reads as special tokens only (``<|endoftext|>``) has no word to rank:
    refused here, before a batch starts, rather than when its turn comes."""
    if denoise.text_end(pipe, denoise.tokenize(pipe, [prompt], warn=False)[0].tolist()) == 1:
        raise InputError(_no_words(prompt))
    return prompt
