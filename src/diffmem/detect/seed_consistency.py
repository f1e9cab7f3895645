"""A black-box detector: memorized prompts give nearly the same image whatever the seed.

Score = mean pairwise agreement across ``generations`` seeds, where agreement is the Pearson
correlation of two outputs (each flattened and centred on its own mean; 1 = identical up to
brightness and contrast). Two modes:

- ``"images"``: full generations through the pipeline's own ``__call__``: truly black box, it
  needs nothing but images;
- ``"x0"``: the predicted clean latent after the first guided step (Webster 2023's one-step
  view): far cheaper, and needs only the denoiser's output at one step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core import denoise
from ..core.errors import InputError
from .noise_norm import DetectionResult, check_prompts


def pairwise_agreement(x: torch.Tensor) -> torch.Tensor:
    """x (G, D) -> (G,) mean Pearson correlation of each row with the other rows."""
    x = x.float().flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = x @ x.T
    g = len(x)
    return (sim.sum(dim=1) - 1) / (g - 1)


class SeedConsistencyDetector:
    method = "seed_consistency"
    # bumped when the method gives other scores for the same settings: saved chunks of an earlier
    # diffmem's version are then refused or redone, never joined to this one's (core.results.revision_key)
    # 2: x0 computed from the prediction (multistep samplers had none), x_T scaled by the sampler set
    # for the run, exact at fractional timesteps
    revision = 2

    def __init__(self, pipe, mode: str = "x0", generations: int = 4, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 32):
        if mode not in ("x0", "images"):
            raise InputError(f"mode must be 'x0' or 'images', got {mode!r}")
        if generations < 2:
            raise InputError("seed consistency needs at least 2 generations")
        denoise.check_inference_steps(pipe, num_inference_steps)
        self.pipe = pipe
        self.settings = {"mode": mode, "generations": generations, "num_inference_steps": num_inference_steps,
                         "guidance_scale": guidance_scale, "seed": seed, "batch_size": batch_size, "steps": [0]}

    def seeds(self) -> list[int]:
        return [self.settings["seed"] + g for g in range(self.settings["generations"])]

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], progress: bool = False, on_progress=None) -> DetectionResult:
        """``on_progress(done, total)``, in prompt-generations, as they are made (as NoiseNormDetector.score)."""
        prompts = check_prompts(prompts)
        s = self.settings
        seeds = self.seeds()
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if on_progress is not None:
                on_progress(done, len(prompts) * len(seeds))

        if s["mode"] == "images":
            from ..core.generate import generate

            out = generate(self.pipe, prompts, seeds, s["num_inference_steps"], s["guidance_scale"], s["batch_size"], progress,
                           on_batch=advance)
            outputs = torch.from_numpy(out).flatten(2)  # (P, G, D)
        else:
            outputs = self._first_step_x0(prompts, seeds, advance)
        values = torch.stack([pairwise_agreement(o) for o in outputs]).numpy()[..., None]
        from ..core.loading import model_identity

        return DetectionResult(prompts, values.mean(axis=(1, 2)), values, dict(s), seeds, self.method, model_identity(self.pipe),
                               truncated=denoise.truncated(self.pipe, prompts))

    def _first_step_x0(self, prompts, seeds, advance) -> torch.Tensor:
        pipe, s = self.pipe, self.settings
        uncond_emb = denoise.encode_text(pipe, [""], warn=False)
        res = []
        for b0 in range(0, len(prompts), s["batch_size"]):
            chunk = prompts[b0 : b0 + s["batch_size"]]
            emb = denoise.encode_text(pipe, chunk)
            per_seed = []
            for seed in seeds:
                sched = denoise.fresh_scheduler(pipe, s["num_inference_steps"])
                t = sched.timesteps[0]
                x = denoise.initial_latents(pipe, sched, seed, len(chunk))
                xin = sched.scale_model_input(x, t)
                cond = pipe.unet(xin, t, encoder_hidden_states=emb).sample
                uncond = pipe.unet(xin[:1], t, encoder_hidden_states=uncond_emb).sample.expand_as(cond)
                x0 = denoise.predicted_x0(pipe, xin, denoise.guided(uncond, cond, s["guidance_scale"]), t)
                per_seed.append(x0.flatten(1))
                advance(len(chunk))
            res.append(torch.stack(per_seed, dim=1))  # (B, G, D)
        return torch.cat(res)
