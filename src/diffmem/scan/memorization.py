"""Per-sample memorization score of training pairs: Wen et al.'s training-time statistic.

For an (image, caption) pair: encode the image (cropped to its centre square at the model's size, as
training shows it), noise it to timestep t with seeded noise, and take
|| eps(x_t, caption) - eps(x_t, "") ||, the statistic the fine-tuning filter thresholds
(``diffmem.train``). Rows without a readable image or caption get NaN. Noise is seeded by the row
number, so a resumed scan gives the same values as an uninterrupted one.

The scan uses one fixed timestep for every row (by default half the training schedule): the norm
grows with the noise level, so random timesteps, as in training, bury the difference between
rows. On MemLab, verbatim rows against the rest: AUC 0.82 with random timesteps, 0.99-1.0 with
any fixed one from 100 to 800 (``benchmarks/scan_memlab.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.denoise import conditional_noise_norm, encode_text, scores_nothing_at, training_scheduler
from ..core.errors import InputError


def scan_timestep(pipe, timestep: int | None) -> int:
    """The timestep every row is noised to (default: half the training schedule), checked against the
    model's schedule before any row is scored: past its end it stopped with an IndexError, and where
    a zero-terminal-SNR schedule has no signal left a v-prediction model scores every row 0."""
    n_train = pipe.scheduler.config.num_train_timesteps
    t = n_train // 2 if timestep is None else int(timestep)
    if not 0 <= t < n_train:
        raise InputError(f"the memorization check's timestep must lie in [0, {n_train - 1}] for this model's "
                         f"schedule, got {t}")
    if scores_nothing_at(pipe, t):
        raise InputError(f"at timestep {t} this model's schedule has no signal left (alpha_bar 0, zero terminal SNR): "
                         "a v-prediction model's two predictions agree there, so every row would score 0; "
                         "choose an earlier --timestep")
    return t


def model_pixels(pipe) -> int:
    """The side, in pixels, of the square images the model is trained on."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def model_sized(image: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, 3) image, float in [0, 1] or uint8, as the check encodes it: float, ``size`` x ``size``,
    cropped to its centre square and resized bicubic as ``diffmem train`` and diffusers' training
    scripts show it to the model (the same pixels as train's for a decoded file), unless it has that
    size already. It had been stretched to the square, a shape the model never trained on."""
    from PIL import Image

    from ..core.images import centre_square, to_uint8

    if image.dtype == np.uint8:  # as the scan keeps a decoded file's pixels (compact_pixels)
        image = image.astype(np.float32) / 255.0
    if image.shape[:2] == (size, size):
        return image
    pixels = to_uint8(image)  # a decoded file's own bytes again
    return np.asarray(centre_square(Image.fromarray(pixels), size), np.float32) / 255.0


def compact_pixels(image: np.ndarray) -> np.ndarray:
    """The float image as uint8 where that loses nothing, as for pixels decoded from a file (k / 255),
    a quarter of their memory (a shard of 1,024 rows at 512 x 512: 0.8 GB, not 3.2); else unchanged."""
    from ..core.images import to_uint8

    quantized = to_uint8(image)
    return quantized if np.array_equal(quantized.astype(np.float32) / 255.0, image) else image


def sample_noise_norms(pipe, rows, timestep: int | None = None, seed: int = 0, batch_size: int = 32) -> np.ndarray:
    out = np.full(len(rows), np.nan)
    ok = [k for k, r in enumerate(rows) if r.image is not None and r.caption and r.caption_issue is None]
    if not ok:
        return out
    size = model_pixels(pipe)
    timestep = scan_timestep(pipe, timestep)
    uncond = encode_text(pipe, [""], warn=False)
    noising = training_scheduler(pipe)  # the training noise, whatever sampler the folder holds
    for lo in range(0, len(ok), batch_size):
        part = ok[lo:lo + batch_size]
        images = [model_sized(rows[k].image, size) for k in part]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(pipe.device, pipe.unet.dtype)
        gens = [torch.Generator().manual_seed(int(seed) * 1_000_003 + int(rows[k].row)) for k in part]
        with torch.inference_mode():
            latents = pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(latents)
            t = torch.full((len(part),), timestep)
            noisy = noising.add_noise(latents, noise, t)
            cond = encode_text(pipe, [rows[k].caption for k in part], warn=False)
            norms = conditional_noise_norm(pipe, noisy, t.to(latents.device), cond, uncond)
        out[part] = norms.float().cpu().numpy()
    return out
