"""Which prompt tokens carry the memorization (Wen et al., ICLR 2024, section 4).

``TokenAttribution``: for each token, the L2 norm (over the hidden dimension) of the gradient
of the detection loss || eps(x_t, c) - eps(x_t, c_empty) || with respect to that token's
embedding, averaged over the chosen steps and seeded generations. By default (``wrt="input"``)
the embedding is the text encoder's *input* token embedding, so the gradient flows through the
encoder: CLIP's text encoder is causal, and what a phrase contributes to the UNet's condition
sits largely in the positions after it (the EOS and padding outputs), which a gradient on the
output embeddings credits to no word. On MemLab's 40 trigger test prompts the trigger phrase
holds the top word for 39 with input gradients and 1 with output gradients. ``wrt="output"``
keeps the gradient on the text-encoder outputs.
Classifier-free guidance advances x_t in the pipeline's order (unconditional + g * (conditional -
unconditional)); the official code swaps the two halves here, which reverses guidance along the
trajectory. Each step's gradient is taken at that step's x_t, held fixed (x_t is detached
between steps, as a step of the sampler sees it).

``TokenAblation``: the drop in the detection score when each word is removed from the prompt.
A model-agnostic cross-check that needs no gradients.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core import denoise
from ..core.errors import InputError
from ..core.results import dump_json

END_OF_WORD = "</w>"


@dataclass
class AttributionResult:
    prompt: str
    tokens: list[str]  # the prompt's BPE tokens, BOS / EOS / padding left out
    token_scores: np.ndarray
    words: list[str]
    word_scores: np.ndarray
    word_of_token: list[int]
    method: str
    settings: dict
    seeds: list[int]
    detection_score: float | None = None
    extra: dict = field(default_factory=dict)  # e.g. the EOS / padding positions' share

    @property
    def top_word(self) -> str:
        return self.words[int(np.argmax(self.word_scores))]

    def ranking(self) -> list[tuple[str, float]]:
        order = np.argsort(-self.word_scores, kind="stable")
        return [(self.words[i], float(self.word_scores[i])) for i in order]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"token": self.tokens, "score": self.token_scores,
                             "word": [self.words[w] for w in self.word_of_token]})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_scores"] = self.token_scores.tolist()
        d["word_scores"] = self.word_scores.tolist()
        return d

    def save(self, path: str | Path) -> Path:
        dump_json(self.to_dict(), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "AttributionResult":
        d = json.loads(Path(path).read_text())
        d["token_scores"] = np.asarray(d["token_scores"], float)
        d["word_scores"] = np.asarray(d["word_scores"], float)
        return cls(**d)

    # -- showing itself -----------------------------------------------------------------------
    def segments(self) -> list[tuple[str, str]]:
        """(text before the word, the word as written in the prompt) for each word, so displays show
        the user's own spelling; CLIP lower-cases and splits punctuation off."""
        low = self.prompt.lower()
        out, cursor = [], 0
        for w in self.words:
            at = low.find(w, cursor)
            if at < 0:  # text the tokenizer normalised (unicode, html entities): fall back to spaces
                return [("" if i == 0 else " ", w) for i, w in enumerate(self.words)]
            out.append((self.prompt[cursor:at], self.prompt[at : at + len(w)]))
            cursor = at + len(w)
        return out

    def _shares(self) -> np.ndarray:
        s = np.clip(self.word_scores, 0, None)
        return s / s.max() if s.max() > 0 else s

    def to_rich(self):
        """The prompt as rich Text, each word on a background as strong as its score."""
        from rich.text import Text

        t = Text()
        for (before, w), a in zip(self.segments(), self._shares()):
            level = int(255 - 200 * a)
            t.append(before)
            t.append(w, style=f"black on rgb(255,{level},{level})")
        return t

    def to_html(self) -> str:
        """An HTML fragment (escaped): words shaded by score, the score in a tooltip."""
        from jinja2 import Environment

        env = Environment(autoescape=True)
        tmpl = env.from_string(
            '<span class="diffmem-attribution" data-method="{{ method }}">'
            "{% for before, w, a, s in items %}{{ before }}"
            '<span class="tok" data-word-index="{{ loop.index0 }}" title="{{ \'%.4g\'|format(s) }}"'
            ' style="background: rgba(220, 40, 40, {{ \'%.3f\'|format(a) }}); border-radius: 3px">{{ w }}</span>'
            "{% endfor %}</span>"
        )
        items = [(b, w, a, sc) for (b, w), a, sc in zip(self.segments(), self._shares() * 0.85, self.word_scores)]
        return tmpl.render(method=self.method, items=items)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(3.0, 0.55 * len(self.tokens) + 1), 2.6))
        x = np.arange(len(self.tokens))
        ax.bar(x, self.token_scores, color="#c33")
        ax.set_xticks(x, [t.replace(END_OF_WORD, "") for t in self.tokens], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("gradient norm" if self.method == "token_attribution" else "score drop")
        s = self.settings
        ax.set_title(title or f"{self.prompt}\n{self.method}, steps {s.get('steps')}, seeds {self.seeds}", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def prompt_tokens(pipe, prompt: str) -> tuple[list[str], list[int], list[str]]:
    """BPE tokens of the prompt as the model sees them (truncated), the word each belongs to, the words."""
    ids = denoise.tokenize(pipe, [prompt])[0].tolist()
    eos = pipe.tokenizer.eos_token_id
    body = ids[1 : ids.index(eos)] if eos in ids[1:] else ids[1:]
    tokens = pipe.tokenizer.convert_ids_to_tokens(body)
    words, word_of, cur = [], [], ""
    for tok in tokens:
        word_of.append(len(words))
        cur += tok.replace(END_OF_WORD, "")
        if tok.endswith(END_OF_WORD):
            words.append(cur)
            cur = ""
    if cur:
        words.append(cur)
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


def _check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt to explain is empty")
    return prompt


class TokenAttribution:
    method = "token_attribution"

    def __init__(self, pipe, num_inference_steps: int = 50, guidance_scale: float = 7.5, steps: Sequence[int] = (0,),
                 generations: int = 1, seed: int = 0, wrt: str = "input"):
        steps = tuple(sorted({int(s) for s in steps}))
        if not steps or steps[0] < 0 or steps[-1] >= num_inference_steps:
            raise InputError(f"steps must lie in [0, {num_inference_steps - 1}], got {list(steps)}")
        if wrt not in ("input", "output"):
            raise InputError(f"wrt must be 'input' (token embeddings) or 'output' (text-encoder outputs), got {wrt!r}")
        self.pipe = pipe
        self.settings = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                         "steps": list(steps), "generations": generations, "seed": seed, "wrt": wrt}

    def seeds(self) -> list[int]:
        return [self.settings["seed"] + g for g in range(self.settings["generations"])]

    def attribute(self, prompt: str) -> AttributionResult:
        prompt = _check_prompt(prompt)
        pipe, s = self.pipe, self.settings
        tokens, word_of, words = prompt_tokens(pipe, prompt)
        n = len(tokens)
        ids = denoise.tokenize(pipe, [prompt]).to(pipe.text_encoder.device)
        with torch.no_grad():
            emb0 = denoise.encode_text(pipe, [prompt])
            uncond_emb = denoise.encode_text(pipe, [""], warn=False)
            tok0 = pipe.text_encoder.get_input_embeddings()(ids)
        grads, losses = [], []
        for seed in self.seeds():
            sched = denoise.fresh_scheduler(pipe, s["num_inference_steps"])
            x = denoise.initial_latents(pipe, seed, 1)
            for i, t in enumerate(sched.timesteps[: s["steps"][-1] + 1]):
                xin = sched.scale_model_input(x, t)
                scored = i in s["steps"]
                with torch.set_grad_enabled(scored):
                    if scored and s["wrt"] == "input":
                        leaf = tok0.clone().requires_grad_(True)
                        emb = encode_token_embeddings(pipe, ids, leaf)
                    else:
                        leaf = emb = emb0.clone().requires_grad_(scored)
                    cond = pipe.unet(xin, t, encoder_hidden_states=emb).sample
                with torch.no_grad():
                    uncond = pipe.unet(xin, t, encoder_hidden_states=uncond_emb).sample
                if scored:
                    loss = denoise.to_epsilon(pipe, cond.float() - uncond.float(), t).flatten(1).norm(dim=1).sum()
                    (g,) = torch.autograd.grad(loss, leaf)
                    grads.append(g[0].float().norm(dim=-1))  # (L,)
                    losses.append(float(loss.detach()))
                with torch.no_grad():
                    x = sched.step(denoise.guided(uncond, cond.detach(), s["guidance_scale"]), t, x).prev_sample
        sig = torch.stack(grads).mean(0).numpy()
        token_scores = sig[1 : 1 + n]
        word_scores = np.zeros(len(words))
        np.add.at(word_scores, word_of, token_scores)
        return AttributionResult(prompt, tokens, token_scores, words, word_scores, word_of, self.method, dict(s),
                                 self.seeds(), float(np.mean(losses)),
                                 {"eos_and_padding_share": float(sig[1 + n :].sum() / max(sig[1:].sum(), 1e-12))})


class TokenAblation:
    """Drop in the noise-norm score when each word is masked (default) or removed.

    ``mode="mask"`` sets the word's input token embeddings to zero and keeps every position, so the
    prompt keeps its length and word order and only that word's content is gone: the perturbation
    whose first-order effect the gradient attribution measures. ``mode="remove"`` leaves the word
    out of the text; on MemLab that mostly measures how unusual the shortened caption is (leaving
    out "a" or the colour word drops the score most, whatever carries the memorization).
    """

    method = "token_ablation"

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
        prompt = _check_prompt(prompt)
        tokens, word_of, words = prompt_tokens(self.pipe, prompt)
        base, without = self._masked(prompt, word_of, len(words)) if self.mode == "mask" else self._removed(words, prompt)
        word_scores = base - without
        counts = np.bincount(word_of, minlength=len(words))
        token_scores = np.array([word_scores[w] / counts[w] for w in word_of])
        return AttributionResult(prompt, tokens, token_scores, words, word_scores, word_of, self.method,
                                 self.settings, self.seeds(), base)

    def masked_embeddings(self, prompt: str) -> torch.Tensor:
        """Text-encoder outputs (1 + words, L, D): the prompt's own, then one per word with that word's
        input token embeddings set to zero, as ``mode="mask"`` scores them (generate from these to see
        what masking a word does to the image)."""
        _, word_of, words = prompt_tokens(self.pipe, _check_prompt(prompt))
        return self._masked_variants(prompt, word_of, len(words))

    def _masked_variants(self, prompt: str, word_of: list[int], n_words: int) -> torch.Tensor:
        pipe = self.pipe
        ids = denoise.tokenize(pipe, [prompt]).to(pipe.text_encoder.device)
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
        scored = iter(self.detector.score([prompt, *kept]).scores)
        base = float(next(scored))
        return base, np.array([float(next(scored)) if v.strip() else 0.0 for v in variants])


EXPLAINERS = {"attribution": TokenAttribution, "ablation": TokenAblation}  # by the name the CLI and audit take
