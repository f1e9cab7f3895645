"""Wen et al. (ICLR 2024): the text-conditional noise-prediction magnitude.

score(p) = mean over generations and chosen steps of || eps(x_t, c_p) - eps(x_t, c_empty) ||_2,
the L2 norm over the whole latent, with x_t advanced by classifier-free guidance exactly as the
pipeline advances it. It costs only what it needs: no step past the last scored one, no VAE
decode, prompts batched, and at the first step the unconditional prediction of a seed is computed
once and shared by every prompt.
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
from ..core.prompts import lone_surrogate, prompt_list
from ..core.results import dump_json, read_parquet, reading_saved, write_parquet


@dataclass
class NoiseNormSettings:
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    steps: tuple[int, ...] = (0,)  # indices into the sampler's timesteps; 0 = the first step
    generations: int = 1
    seed: int = 0  # generation g uses seed + g, the same x_T for every prompt
    batch_size: int = 32

    def seeds(self) -> list[int]:
        return [self.seed + g for g in range(self.generations)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d


@dataclass
class DetectionResult:
    prompts: list[str]
    scores: np.ndarray  # (P,)
    values: np.ndarray  # (P, generations, steps): the norm per generation and scored step
    settings: dict
    seeds: list[int]
    method: str = "noise_norm"
    model: dict = field(default_factory=dict)
    threshold: float | None = None  # set by a Calibration; verdict = score > threshold
    calibration: dict = field(default_factory=dict)
    truncated: np.ndarray | None = None  # (P,) bool: longer than the model reads, so scored on its first tokens

    @property
    def verdicts(self) -> np.ndarray | None:
        return None if self.threshold is None else np.asarray(self.scores) > self.threshold

    def to_frame(self):
        import pandas as pd

        df = pd.DataFrame({"prompt": self.prompts, "score": self.scores})
        if self.threshold is not None:
            df["verdict"] = np.where(self.verdicts, "memorized", "not memorized")
        if self.truncated is not None:
            df["truncated"] = np.asarray(self.truncated, bool)
        g, s = self.values.shape[1:]
        for gi in range(g):
            for si in range(s):
                df[f"gen{gi}_step{self.settings['steps'][si]}"] = self.values[:, gi, si]
        return df

    def _meta(self) -> dict:
        return {"method": self.method, "settings": self.settings, "seeds": self.seeds, "model": self.model,
                "values_shape": list(self.values.shape), "threshold": self.threshold, "calibration": self.calibration}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix == ".parquet":
            write_parquet(self.to_frame(), path, self._meta())
        elif path.suffix == ".json":
            extra = {} if self.truncated is None else {"truncated": np.asarray(self.truncated, bool).tolist()}
            dump_json({**self._meta(), "prompts": self.prompts, "scores": self.scores, "values": self.values, **extra}, path)
        else:
            raise InputError(f"results file must end in .json or .parquet, got {path.name}")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DetectionResult":
        path = Path(path)
        with reading_saved(path, "detection result (.parquet or .json)"):
            if path.suffix == ".parquet":
                df, meta = read_parquet(path)
                cols = [c for c in df.columns if c.startswith("gen")]
                values = df[cols].to_numpy(dtype=np.float64).reshape(meta["values_shape"])
                truncated = df["truncated"].to_numpy(bool) if "truncated" in df.columns else None  # files before the column
                return cls(df["prompt"].tolist(), df["score"].to_numpy(), values, meta["settings"], meta["seeds"],
                           meta["method"], meta.get("model", {}), meta.get("threshold"), meta.get("calibration", {}), truncated)
            d = json.loads(path.read_text())
            truncated = np.asarray(d["truncated"], bool) if "truncated" in d else None
            return cls(d["prompts"], np.asarray(d["scores"], float), np.asarray(d["values"], float).reshape(d["values_shape"]),
                       d["settings"], d["seeds"], d["method"], d.get("model", {}), d.get("threshold"), d.get("calibration", {}),
                       truncated)


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = prompt_list(prompts)
    if not prompts:
        raise InputError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"prompt {i} is not a string: {p!r}")
        if not p.strip():
            raise InputError(f"prompt {i} is empty")
        if problem := lone_surrogate(p):
            raise InputError(f"prompt {i} {problem}")
    return prompts


class NoiseNormDetector:
    """``NoiseNormDetector(pipe, ...).score(prompts) -> DetectionResult``."""

    method = "noise_norm"
    # bumped when the method gives other scores for the same settings: saved chunks of an earlier
    # diffmem's version are then refused or redone, never joined to this one's (core.results.revision_key)
    # 2: other samplers run as the pipeline runs them: ancestral / DDPM step noise from the seed, x_T scaled
    # by the sampler set for the run (Euler with "leading" spacing), exact at fractional timesteps;
    # at a guidance scale of 1 or less the trajectory follows the conditional prediction alone
    revision = 2

    def __init__(self, pipe, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 steps: Sequence[int] = (0,), generations: int = 1, seed: int = 0, batch_size: int = 32):
        if generations < 1:
            raise InputError("generations must be at least 1")
        steps = tuple(sorted({int(s) for s in steps}))
        if not steps or steps[0] < 0 or steps[-1] >= num_inference_steps:
            raise InputError(f"steps must lie in [0, {num_inference_steps - 1}], got {list(steps)}")
        denoise.check_inference_steps(pipe, num_inference_steps)
        denoise.check_scored_steps(pipe, num_inference_steps, steps)
        self.pipe = pipe
        self.settings = NoiseNormSettings(num_inference_steps, guidance_scale, steps, generations, seed, batch_size)

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], progress: bool = False, on_progress=None) -> DetectionResult:
        """``on_progress(done, total)``, in prompt-generations, after each batch's generation; it may
        raise to stop (the app's cancel button)."""
        prompts = check_prompts(prompts)
        s, pipe = self.settings, self.pipe
        values = np.zeros((len(prompts), s.generations, len(s.steps)))
        uncond_emb = denoise.encode_text(pipe, [""], warn=False)
        from tqdm.auto import tqdm

        batches = range(0, len(prompts), s.batch_size)
        bar = tqdm(total=len(prompts) * s.generations, desc="scoring", unit="prompt", disable=not progress)
        first_uncond: dict[int, torch.Tensor] = {}
        done = 0

        def advance(n: int) -> None:
            nonlocal done  # not bar.n: a disabled tqdm does not count
            done += n
            bar.update(n)
            if on_progress is not None:
                on_progress(done, len(prompts) * s.generations)

        counts = denoise.token_counts(pipe, prompts)  # once: for the truncation warnings and the truncated column
        for b0 in batches:
            chunk = prompts[b0 : b0 + s.batch_size]
            emb = denoise.encode_text(pipe, chunk, counts=counts[b0 : b0 + s.batch_size])
            values[b0 : b0 + len(chunk)] = self.score_embeddings(emb, uncond_emb, first_uncond, on_generation=advance)
        bar.close()
        from ..core.loading import model_identity

        return DetectionResult(prompts, values.mean(axis=(1, 2)), values, s.to_dict(), s.seeds(), self.method,
                               model_identity(pipe), truncated=denoise.truncated(pipe, prompts, counts))

    @torch.inference_mode()
    def score_embeddings(self, cond_emb: torch.Tensor, uncond_emb: torch.Tensor | None = None,
                         first_uncond: dict | None = None, on_generation=None) -> np.ndarray:
        """Per-step norms, (n, generations, steps), for text-encoder outputs given directly (one
        batch): what ``score`` computes after encoding, for callers that edit the embeddings."""
        if uncond_emb is None:
            uncond_emb = denoise.encode_text(self.pipe, [""], warn=False)
        first_uncond = {} if first_uncond is None else first_uncond
        out = np.zeros((len(cond_emb), self.settings.generations, len(self.settings.steps)))
        for gi, seed in enumerate(self.settings.seeds()):
            out[:, gi] = self._trajectory(cond_emb, uncond_emb, seed, first_uncond)
            if on_generation:
                on_generation(len(cond_emb))
        return out

    def _trajectory(self, cond_emb, uncond_emb, seed, first_uncond) -> np.ndarray:
        s, pipe = self.settings, self.pipe
        sched = denoise.fresh_scheduler(pipe, s.num_inference_steps)
        n = len(cond_emb)
        x = denoise.initial_latents(pipe, sched, seed, n)
        step_kwargs = denoise.step_kwargs(pipe, sched, [seed] * n)
        out = np.zeros((n, len(s.steps)))
        for i, t in enumerate(sched.timesteps[: s.steps[-1] + 1]):
            xin = sched.scale_model_input(x, t)
            cond = pipe.unet(xin, t, encoder_hidden_states=cond_emb).sample
            if i == 0:
                # at the first step x_T is the same for every prompt: one unconditional pass per seed
                if seed not in first_uncond:
                    first_uncond[seed] = pipe.unet(xin[:1], t, encoder_hidden_states=uncond_emb).sample
                uncond = first_uncond[seed].expand_as(cond)
            else:
                uncond = pipe.unet(xin, t, encoder_hidden_states=uncond_emb.expand(n, -1, -1)).sample
            if i in s.steps:
                diff = denoise.to_epsilon(pipe, (cond - uncond).float(), t)
                out[:, s.steps.index(i)] = diff.flatten(1).norm(dim=1).cpu().numpy()
            if i < s.steps[-1]:
                x = sched.step(denoise.guided(uncond, cond, s.guidance_scale), t, x, **step_kwargs).prev_sample
        return out
