"""``TokenAblation``: the drop in the detection score when each word is masked or removed. A
model-agnostic cross-check of the gradient attribution (``attribution.py``) that needs no gradients.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from ..core import denoise
from ..core.errors import InputError
from .result import AttributionResult
from .tokens import check_prompt, encode_token_embeddings, prompt_tokens


class TokenAblation:
    """Drop in the noise-norm score when each word is masked (default) or removed.

    ``mode="mask"`` sets the word's input token embeddings to zero and keeps every position, so the
    prompt keeps its length and word order and only that word's content is gone: the perturbation
    whose first-order effect the gradient attribution measures. ``mode="remove"`` leaves the word
    out of the text; on MemLab that mostly measures how unusual the shortened caption is (leaving
    out "a" or the colour word drops the score most, whatever carries the memorization).
    """

    method = "token_ablation"
    # bumped when the method gives other word scores for the same settings: saved checkpoints of an earlier
    # diffmem's version are then refused or redone, never joined to this one's (core.results.revision_key)
    revision = 2  # 2: its detector's (NoiseNormDetector's revision 2)

    def __init__(self, pipe, num_inference_steps: int = 50, guidance_scale: float = 7.5, steps: Sequence[int] = (0,),
                 generations: int = 1, seed: int = 0, batch_size: int = 32, mode: str = "mask"):
        from ..detect.noise_norm import NoiseNormDetector

        if mode not in ("mask", "remove"):
            raise InputError(f"mode must be 'mask' (zero the word's token embeddings) or 'remove' (leave it out), got {mode!r}")
        self.detector = NoiseNormDetector(pipe, num_inference_steps, guidance_scale, steps, generations, seed, batch_size)
        self.pipe, self.mode = pipe, mode

    @property
    def settings(self) -> dict:
        return {**self.detector.settings.to_dict(), "mode": self.mode}

    def seeds(self) -> list[int]:
        return self.detector.settings.seeds()

    def attribute(self, prompt: str) -> AttributionResult:
        prompt = check_prompt(prompt)
        tokens, word_of, words = prompt_tokens(self.pipe, prompt)
        base, without = self._masked(prompt, word_of, len(words)) if self.mode == "mask" else self._removed(words, prompt)
        word_scores = base - without
        counts = np.bincount(word_of, minlength=len(words))
        token_scores = np.array([word_scores[w] / counts[w] for w in word_of])
        return AttributionResult(prompt, tokens, token_scores, words, word_scores, word_of, self.method,
                                 self.settings, self.seeds(), base,
                                 truncated=bool(denoise.truncated(self.pipe, [prompt])[0]))

    def masked_embeddings(self, prompt: str) -> torch.Tensor:
        """Text-encoder outputs (1 + words, L, D): the prompt's own, then one per word with that word's
        input token embeddings set to zero, as ``mode="mask"`` scores them (generate from these to see
        what masking a word does to the image)."""
        _, word_of, words = prompt_tokens(self.pipe, check_prompt(prompt))
        return self._masked_variants(prompt, word_of, len(words))

    def _masked_variants(self, prompt: str, word_of: list[int], n_words: int) -> torch.Tensor:
        pipe = self.pipe
        ids = denoise.tokenize(pipe, [prompt], warn=False).to(pipe.text_encoder.device)
        word_of_arr = np.asarray(word_of)
        with torch.inference_mode():
            tok0 = pipe.text_encoder.get_input_embeddings()(ids)
            variants = [tok0]
            for w in range(n_words):
                masked = tok0.clone()
                masked[0, 1 + np.flatnonzero(word_of_arr == w)] = 0  # +1: after BOS
                variants.append(masked)
            return torch.cat([encode_token_embeddings(pipe, ids, v) for v in variants])

    def _masked(self, prompt: str, word_of: list[int], n_words: int) -> tuple[float, np.ndarray]:
        emb = self._masked_variants(prompt, word_of, n_words)
        bs = self.detector.settings.batch_size
        with torch.inference_mode():
            values = np.concatenate([self.detector.score_embeddings(emb[b0 : b0 + bs]).mean(axis=(1, 2))
                                     for b0 in range(0, len(emb), bs)])
        return float(values[0]), values[1:]

    def _removed(self, words: list[str], prompt: str) -> tuple[float, np.ndarray]:
        # a one-word prompt ablates to the empty prompt, whose score is 0 by definition
        variants = [" ".join(w for j, w in enumerate(words) if j != i) for i in range(len(words))]
        kept = [v for v in variants if v.strip()]
        with warnings.catch_warnings():  # prompt_tokens warned of a truncated prompt once; its variants would again
            warnings.simplefilter("ignore", denoise.PromptTruncationWarning)
            scored = iter(self.detector.score([prompt, *kept]).scores)
        base = float(next(scored))
        return base, np.array([float(next(scored)) if v.strip() else 0.0 for v in variants])

