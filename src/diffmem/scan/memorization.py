"""Per-sample memorization score of training pairs: Wen et al.'s training-time statistic.

For an (image, caption) pair: encode the image, noise it to timestep t with seeded noise, and take
|| eps(x_t, caption) - eps(x_t, "") ||. These are the values the fine-tuning filter thresholds
(``diffmem.train``), so a scan shows in advance which rows it would drop. Rows without a readable
image or caption get NaN. Noise and random timesteps are seeded by the row number, so a resumed
scan gives the same values as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.denoise import conditional_noise_norm, encode_text


def sample_noise_norms(pipe, rows, timestep: int | None = None, seed: int = 0, batch_size: int = 32) -> np.ndarray:
    from PIL import Image

    out = np.full(len(rows), np.nan)
    ok = [k for k, r in enumerate(rows) if r.image is not None and r.caption and r.caption_issue is None]
    if not ok:
        return out
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    n_train = pipe.scheduler.config.num_train_timesteps
    uncond = encode_text(pipe, [""], warn=False)
    for lo in range(0, len(ok), batch_size):
        part = ok[lo:lo + batch_size]
        images = []
        for k in part:
            im = rows[k].image
            if im.shape[:2] != (size, size):
                im = np.asarray(Image.fromarray((im * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                                np.float32) / 255.0
            images.append(im)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(pipe.device, pipe.unet.dtype)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + rows[k].row) for k in part]
        with torch.inference_mode():
            latents = pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(latents)
            if timestep is None:
                t = torch.tensor([int(torch.randint(0, n_train, (1,), generator=g)) for g in gens])
            else:
                t = torch.full((len(part),), int(timestep))
            noisy = pipe.scheduler.add_noise(latents, noise, t)
            cond = encode_text(pipe, [rows[k].caption for k in part], warn=False)
            norms = conditional_noise_norm(pipe, noisy, t.to(latents.device), cond, uncond)
        out[part] = norms.float().cpu().numpy()
    return out
