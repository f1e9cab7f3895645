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

The second explainer, ``TokenAblation``, is in ``ablation.py``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..core import denoise
from ..core.errors import InputError
from .result import AttributionResult
from .tokens import check_prompt, encode_token_embeddings, prompt_tokens


class TokenAttribution:
    method = "token_attribution"
    # bumped when the method gives other word scores for the same settings: saved checkpoints of an earlier
    # diffmem's version are then refused or redone, never joined to this one's (core.results.revision_key)
    # 2: other samplers run as the pipeline runs them: ancestral / DDPM step noise from the seed, x_T scaled
    # by the sampler set for the run (Euler with "leading" spacing), exact at fractional timesteps;
    # at a guidance scale of 1 or less the trajectory follows the conditional prediction alone
    revision = 2

    def __init__(self, pipe, num_inference_steps: int = 50, guidance_scale: float = 7.5, steps: Sequence[int] = (0,),
                 generations: int = 1, seed: int = 0, wrt: str = "input"):
        steps = tuple(sorted({int(s) for s in steps}))
        if not steps or steps[0] < 0 or steps[-1] >= num_inference_steps:
            raise InputError(f"steps must lie in [0, {num_inference_steps - 1}], got {list(steps)}")
        if wrt not in ("input", "output"):
            raise InputError(f"wrt must be 'input' (token embeddings) or 'output' (text-encoder outputs), got {wrt!r}")
        denoise.check_inference_steps(pipe, num_inference_steps)
        denoise.check_scored_steps(pipe, num_inference_steps, steps)
        self.pipe = pipe
        self.settings = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                         "steps": list(steps), "generations": generations, "seed": seed, "wrt": wrt}

    def seeds(self) -> list[int]:
        return [self.settings["seed"] + g for g in range(self.settings["generations"])]

    def attribute(self, prompt: str) -> AttributionResult:
        prompt = check_prompt(prompt)
        pipe, s = self.pipe, self.settings
        tokens, word_of, words = prompt_tokens(pipe, prompt)  # warns if the prompt is truncated: the rest need not
        n = len(tokens)
        ids = denoise.tokenize(pipe, [prompt], warn=False).to(pipe.text_encoder.device)
        with torch.no_grad():
            emb0 = denoise.encode_text(pipe, [prompt], warn=False)
            uncond_emb = denoise.encode_text(pipe, [""], warn=False)
            tok0 = pipe.text_encoder.get_input_embeddings()(ids)
        grads, losses = [], []
        for seed in self.seeds():
            sched = denoise.fresh_scheduler(pipe, s["num_inference_steps"])
            x = denoise.initial_latents(pipe, sched, seed, 1)
            step_kwargs = denoise.step_kwargs(pipe, sched, [seed])
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
                    x = sched.step(denoise.guided(uncond, cond.detach(), s["guidance_scale"]), t, x, **step_kwargs).prev_sample
        sig = torch.stack(grads).mean(0).numpy()
        token_scores = sig[1 : 1 + n]
        word_scores = np.zeros(len(words))
        np.add.at(word_scores, word_of, token_scores)
        return AttributionResult(prompt, tokens, token_scores, words, word_scores, word_of, self.method, dict(s),
                                 self.seeds(), float(np.mean(losses)),
                                 {"eos_and_padding_share": float(sig[1 + n :].sum() / max(sig[1:].sum(), 1e-12))},
                                 bool(denoise.truncated(pipe, [prompt])[0]))
