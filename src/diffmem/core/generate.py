"""Seeded image generation through the pipeline's own ``__call__``, batched across prompts and seeds."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int = 50,
             guidance_scale: float = 7.5, batch_size: int = 64, progress: bool = False,
             prompt_embeds: torch.Tensor | None = None, on_batch=None) -> np.ndarray:
    """Images (P, S, H, W, 3) float32 in [0, 1]: prompt p with seed s uses
    ``torch.Generator().manual_seed(s)``, so any image can be regenerated alone.

    ``prompt_embeds`` (P, L, D), when given, replace the prompts' text embeddings (mitigation).
    ``on_batch(n)``, when given, is called with the number of images each batch made.
    """
    from tqdm.auto import tqdm

    from .denoise import check_guidance_scale, check_inference_steps, check_seed

    check_guidance_scale(guidance_scale)
    check_inference_steps(pipe, num_inference_steps)
    seeds = [check_seed(s) for s in seeds]  # before any image is made
    jobs = [(pi, si) for pi in range(len(prompts)) for si in range(len(seeds))]
    out = None
    uncond = None
    if prompt_embeds is not None:
        from .denoise import encode_text

        with torch.inference_mode():
            uncond = encode_text(pipe, [""], warn=False)
    bar = tqdm(total=len(jobs), desc="generating", unit="img", disable=not progress)
    for b0 in range(0, len(jobs), batch_size):
        chunk = jobs[b0 : b0 + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(seeds[si]) for _, si in chunk]
        kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=gens, output_type="np")
        if prompt_embeds is not None:
            emb = prompt_embeds[[pi for pi, _ in chunk]]
            neg = uncond.expand(len(chunk), -1, -1)
            images = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, **kwargs).images
        else:
            images = pipe(prompt=[prompts[pi] for pi, _ in chunk], **kwargs).images
        if out is None:
            out = np.zeros((len(prompts), len(seeds), *images.shape[1:]), dtype=np.float32)
        for (pi, si), im in zip(chunk, images):
            out[pi, si] = im
        bar.update(len(chunk))
        if on_batch is not None:
            on_batch(len(chunk))
    bar.close()
    return out
