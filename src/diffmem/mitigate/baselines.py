"""The baselines of Somepalli et al. 2023 that Wen et al. compare with, under the interface of
``EmbeddingOptimization``: ``Method(pipe, ...).mitigate(prompts) -> MitigationResult``. They change
the prompt's text (RTA, RNA, word repetition) or its embedding (GNI) without looking at the loss.

As in both papers' code, each added word goes in at a random place among the prompt's words (one
draw per word, the earlier ones counted), not at its end: so a long prompt's additions still fall
mostly inside the 77 tokens CLIP reads. ``placement="end"`` appends them instead (RTA and RNA),
keeping the prompt's own words in order; ``EmbeddingOptimization``'s ``rewrite`` starts from that.
Where appended words would fall past CLIP's cut, where they would change nothing, they go in just
before it instead: after the prompt's longest start that leaves them inside, with the rest of the
prompt, which the model does not read, after them.
Deviations, on purpose: RTA draws whole ASCII words (``RandomTokenAddition``), where the papers
decode any token id, so some of their additions are word pieces or bytes of an emoji; GNI noises
the prompt's embedding after BOS, where Somepalli et al.'s code noised the whole encoded batch, the
unconditional embedding and BOS included, so that guidance itself was perturbed."""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np
import torch

from ..core import denoise
from ..core.errors import InputError
from .result import MitigationResult


PLACEMENTS = ("random", "end")  # where RTA and RNA put their words: among the prompt's (the papers'), or after it


def check_placement(placement: str | None, name: str = "placement") -> None:
    """Raise unless ``placement`` is one of PLACEMENTS (None: not given); ``name`` as the caller spells it."""
    if placement is not None and placement not in PLACEMENTS:
        raise InputError(f"{name} must be one of {', '.join(PLACEMENTS)}, got {placement!r}")


def insert_words(prompt: str, words, rng: np.random.Generator) -> str:
    """``prompt`` with ``words`` added, each at a random place among the words so far (0 = first,
    after the last = appended; Somepalli et al.'s ``insert_rand_word``)."""
    parts = prompt.split(" ")
    for w in words:
        parts.insert(int(rng.integers(len(parts) + 1)), w)
    return " ".join(parts)


class _PromptRewrite:
    """Baselines that change the prompt text (or its embedding) without looking at the loss."""

    method = "baseline"
    # bumped when a method gives other outputs for the same settings, and kept in its settings, so
    # that parts saved by an earlier diffmem are never joined to this one's (mitigate.parts)
    revision = 1

    def __init__(self, pipe, generations: int = 4, seed: int = 0, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, **params):
        if generations < 1:
            raise InputError(f"generations must be >= 1, got {generations}")
        denoise.check_seed(seed)
        check_placement(params.get("placement"))
        for name, value in params.items():  # counts of words / numbers / repeats, or GNI's sigma
            if name == "placement":
                continue
            if not (math.isfinite(value) and value >= 0) or (name != "sigma" and int(value) != value):
                raise InputError(f"{name} must be a {'non-negative number' if name == 'sigma' else 'whole number >= 0'}, "
                                 f"got {value}")
        self.pipe = pipe
        self.params = params
        self.settings = {"generations": generations, "seed": seed, "num_inference_steps": num_inference_steps,
                         "guidance_scale": guidance_scale, **params, "revision": self.revision}

    def seeds(self) -> list[int]:
        return [self.settings["seed"] + g for g in range(self.settings["generations"])]

    def rng_for(self, prompt: str) -> np.random.Generator:
        """The random draws for one prompt depend only on the seed and the prompt's text, so a prompt
        is mitigated the same way whatever else is in the list (and in resumed parts)."""
        return np.random.default_rng([self.settings["seed"], zlib.crc32(prompt.encode("utf-8"))])

    def rewrite(self, prompt: str, rng: np.random.Generator) -> str:
        return prompt

    def add(self, prompt: str, words, rng: np.random.Generator) -> str:
        """``prompt`` with ``words`` added where ``placement`` says; appended ones kept inside what
        the model reads (see the module's docstring)."""
        if self.params.get("placement", "random") != "end":
            return insert_words(prompt, words, rng)
        appended = " ".join([prompt, *words])
        if not denoise.truncated(self.pipe, [appended])[0]:
            return appended
        own = prompt.split(" ")
        lo, hi = 0, len(own)  # the longest start own[:k] that the words still fit after: k in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if denoise.truncated(self.pipe, [" ".join([*own[:mid], *words])])[0]:
                hi = mid - 1
            else:
                lo = mid
        return " ".join([*own[:lo], *words, *own[lo:]])

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
    """RTA: add ``n_tokens`` random vocabulary words, each at a random place (``placement="end"``:
    appended)."""

    method = "rta"
    revision = 3  # 3: appended words kept inside what the model reads; 2: words at random places; 1 appended them

    def __init__(self, pipe, n_tokens: int = 4, placement: str = "random", **kw):
        super().__init__(pipe, n_tokens=n_tokens, placement=placement, **kw)
        vocab = pipe.tokenizer.get_vocab()
        # whole-word tokens made of letters: what a person could type. ASCII only: CLIP's byte-level
        # vocabulary spells other text as bytes ("âĢĶ" is an em dash), which typed would be other tokens
        self._words = sorted(w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha()
                             and len(w) > 6)

    def rewrite(self, prompt, rng):
        return self.add(prompt, rng.choice(self._words, self.params["n_tokens"]), rng)


class RandomNumberAddition(_PromptRewrite):
    """RNA: add ``n_numbers`` random integers below 100,000, each at a random place
    (``placement="end"``: appended)."""

    method = "rna"
    # 3: appended numbers kept inside what the model reads; 2: at random places, below 100,000;
    # 1: appended, below 10,000
    revision = 3

    def __init__(self, pipe, n_numbers: int = 4, placement: str = "random", **kw):
        super().__init__(pipe, n_numbers=n_numbers, placement=placement, **kw)

    def rewrite(self, prompt, rng):
        return self.add(prompt, [str(int(x)) for x in rng.integers(0, 100_000, self.params["n_numbers"])], rng)


class WordRepetition(_PromptRewrite):
    """CWR: ``n_repeats`` words drawn from the prompt's own, each added again at a random place."""

    method = "word_repetition"
    revision = 2  # 2: each repeat at a random place; 1 put it next to its word

    def __init__(self, pipe, n_repeats: int = 2, **kw):
        super().__init__(pipe, n_repeats=n_repeats, **kw)

    def rewrite(self, prompt, rng):
        own = prompt.split()
        return insert_words(prompt, [own[int(rng.integers(len(own)))] for _ in range(self.params["n_repeats"])], rng)


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
