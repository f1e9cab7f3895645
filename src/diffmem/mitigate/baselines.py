"""The baselines of Somepalli et al. 2023 that Wen et al. compare with, under the interface of
``EmbeddingOptimization``: ``Method(pipe, ...).mitigate(prompts) -> MitigationResult``. They change
the prompt's text (RTA, RNA, word repetition) or its embedding (GNI) without looking at the loss."""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np
import torch

from ..core import denoise
from ..core.errors import InputError
from .result import MitigationResult


class _PromptRewrite:
    """Baselines that change the prompt text (or its embedding) without looking at the loss."""

    method = "baseline"

    def __init__(self, pipe, generations: int = 4, seed: int = 0, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, **params):
        if generations < 1:
            raise InputError(f"generations must be >= 1, got {generations}")
        denoise.check_seed(seed)
        for name, value in params.items():  # counts of words / numbers / repeats, or GNI's sigma
            if not (math.isfinite(value) and value >= 0) or (name != "sigma" and int(value) != value):
                raise InputError(f"{name} must be a {'non-negative number' if name == 'sigma' else 'whole number >= 0'}, "
                                 f"got {value}")
        self.pipe = pipe
        self.params = params
        self.settings = {"generations": generations, "seed": seed, "num_inference_steps": num_inference_steps,
                         "guidance_scale": guidance_scale, **params}

    def seeds(self) -> list[int]:
        return [self.settings["seed"] + g for g in range(self.settings["generations"])]

    def rng_for(self, prompt: str) -> np.random.Generator:
        """The random draws for one prompt depend only on the seed and the prompt's text, so a prompt
        is mitigated the same way whatever else is in the list (and in resumed parts)."""
        return np.random.default_rng([self.settings["seed"], zlib.crc32(prompt.encode("utf-8"))])

    def rewrite(self, prompt: str, rng: np.random.Generator) -> str:
        return prompt

    def embeddings(self, prompts: list[str]) -> torch.Tensor | None:
        return None

    def mitigate(self, prompts: Sequence[str], generate_images: bool = True, progress: bool = False,
                 batch_size: int = 64) -> MitigationResult:
        from ..core.generate import generate
        from ..detect.noise_norm import check_prompts

        prompts = check_prompts(prompts)
        new = [self.rewrite(p, self.rng_for(p)) for p in prompts]
        nan = np.full(len(prompts), np.nan)
        res = MitigationResult(self.method, prompts, dict(self.settings), self.seeds(), nan, nan.copy(),
                               [[] for _ in prompts], np.zeros(len(prompts), int), np.ones(len(prompts), bool), new,
                               truncated=denoise.truncated(self.pipe, prompts),
                               mitigated_truncated=denoise.truncated(self.pipe, new))
        if generate_images:
            kw = dict(num_inference_steps=self.settings["num_inference_steps"],
                      guidance_scale=self.settings["guidance_scale"], batch_size=batch_size, progress=progress)
            res.images_before = generate(self.pipe, prompts, self.seeds(), **kw)
            emb = self.embeddings(prompts)
            res.images_after = generate(self.pipe, new, self.seeds(), prompt_embeds=emb, **kw)
        return res


class RandomTokenAddition(_PromptRewrite):
    """RTA: append ``n_tokens`` random vocabulary words."""

    method = "rta"

    def __init__(self, pipe, n_tokens: int = 4, **kw):
        super().__init__(pipe, n_tokens=n_tokens, **kw)
        vocab = pipe.tokenizer.get_vocab()
        # whole-word tokens made of letters: what a person could type. ASCII only: CLIP's byte-level
        # vocabulary spells other text as bytes ("âĢĶ" is an em dash), which typed would be other tokens
        self._words = sorted(w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha()
                             and len(w) > 6)

    def rewrite(self, prompt, rng):
        return prompt + " " + " ".join(rng.choice(self._words, self.params["n_tokens"]))


class RandomNumberAddition(_PromptRewrite):
    """RNA: append ``n_numbers`` random integers."""

    method = "rna"

    def __init__(self, pipe, n_numbers: int = 4, **kw):
        super().__init__(pipe, n_numbers=n_numbers, **kw)

    def rewrite(self, prompt, rng):
        return prompt + " " + " ".join(str(int(x)) for x in rng.integers(0, 10_000, self.params["n_numbers"]))


class WordRepetition(_PromptRewrite):
    """Repeat ``n_repeats`` randomly chosen words of the prompt in place."""

    method = "word_repetition"

    def __init__(self, pipe, n_repeats: int = 2, **kw):
        super().__init__(pipe, n_repeats=n_repeats, **kw)

    def rewrite(self, prompt, rng):
        words = prompt.split()
        for _ in range(self.params["n_repeats"]):
            i = int(rng.integers(len(words)))
            words.insert(i, words[i])
        return " ".join(words)


class GaussianNoiseInjection(_PromptRewrite):
    """GNI: add N(0, sigma^2) noise to the text embedding (the BOS position untouched)."""

    method = "gni"

    def __init__(self, pipe, sigma: float = 0.1, **kw):
        super().__init__(pipe, sigma=sigma, **kw)

    def embeddings(self, prompts):
        with torch.no_grad():
            emb = denoise.encode_text(self.pipe, prompts)
        noise = torch.from_numpy(np.stack([self.rng_for(p).standard_normal(emb.shape[1:], dtype=np.float32)
                                           for p in prompts])) * self.params["sigma"]
        noise[:, 0] = 0
        return emb + noise.to(emb.dtype)


BASELINES = {"rta": RandomTokenAddition, "rna": RandomNumberAddition, "gni": GaussianNoiseInjection,
             "word_repetition": WordRepetition}
