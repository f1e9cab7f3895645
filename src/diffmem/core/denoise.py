"""The pieces of a Stable Diffusion sampling loop that detection, explanation and mitigation
share. ``StableDiffusionPipeline.__call__`` never exposes the split conditional /
unconditional predictions, so diffmem runs its own short loop from the same parts:
``tokenizer`` + ``text_encoder`` (as ``encode_prompt`` does), ``prepare_latents``-equivalent
seeded noise, ``scheduler.set_timesteps/scale_model_input/step`` and ``unet``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .errors import InputError


class PromptTruncationWarning(UserWarning):
    pass


def added_tokens(pipe) -> set[str]:
    """Tokens added to the tokenizer's vocabulary, textual inversion's ("<my-style>", and "<my-style>_1"
    and on for the further vectors of a multi-vector embedding): each is a word of its own."""
    tok = pipe.tokenizer
    return set(tok.get_added_vocab()) - set(tok.all_special_tokens)


def as_the_pipeline_reads(pipe, prompts: list[str]) -> list[str]:
    """The prompts with each multi-vector textual-inversion token written out as its vectors' tokens
    ("<my-style>" as "<my-style> <my-style>_1 <my-style>_2"), as the pipeline's ``encode_prompt`` does
    before tokenizing; without it the model read the first vector alone."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(list(prompts), pipe.tokenizer) if convert is not None and added_tokens(pipe) else list(prompts)


def token_counts(pipe, prompts: list[str]) -> np.ndarray:
    """Per prompt, its length in tokens with BOS and EOS, before any truncation."""
    full = pipe.tokenizer(as_the_pipeline_reads(pipe, prompts), padding=False, truncation=False, verbose=False).input_ids
    return np.array([len(f) for f in full], int)


def truncated(pipe, prompts: list[str], counts: np.ndarray | None = None) -> np.ndarray:
    """Per prompt: is it longer than the model reads (CLIP: 77 tokens with BOS and EOS)?
    ``counts``: the prompts' ``token_counts`` when the caller has them already."""
    return (token_counts(pipe, prompts) if counts is None else np.asarray(counts)) > pipe.tokenizer.model_max_length


def text_length(pipe) -> int:
    """The tokens a prompt is padded and cut to (the tokenizer's ``model_max_length``), checked against
    the text encoder's positions: a tokenizer saved without it gets transformers' "no limit" (about
    1e30), and padding to that stopped with an OverflowError that named nothing."""
    n = pipe.tokenizer.model_max_length
    positions = getattr(getattr(pipe.text_encoder, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and n > positions:
        raise InputError(f"the tokenizer pads prompts to {n} tokens but the text encoder has {positions} positions: "
                         f"set \"model_max_length\": {positions} in the model's tokenizer/tokenizer_config.json")
    return n


def tokenize(pipe, prompts: list[str], warn: bool = True, counts: np.ndarray | None = None) -> torch.Tensor:
    """Token ids padded/truncated to the model's length; warns, naming each truncated prompt.
    ``counts``: the prompts' ``token_counts`` when the caller has them already."""
    tok = pipe.tokenizer
    n = text_length(pipe)
    for p in prompts:
        if not isinstance(p, str):
            raise InputError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
    ids = tok(as_the_pipeline_reads(pipe, prompts), padding="max_length", max_length=n, truncation=True,
              return_tensors="pt").input_ids
    if warn:
        for i, (p, count) in enumerate(zip(prompts, token_counts(pipe, prompts) if counts is None else counts)):
            if count > n:
                kept = tok.decode(ids[i][1:-1], skip_special_tokens=True)
                # where the cut falls, from a word's start: the end of what the model reads
                end = kept if len(kept) <= 60 else "..." + kept[-60:].split(" ", 1)[-1]
                warnings.warn(
                    f"prompt truncated to {n} tokens ({count} given): {p[:80]!r}{'...' if len(p) > 80 else ''}; "
                    f"the model reads it only up to {end!r}",
                    PromptTruncationWarning,
                    stacklevel=3,
                )
    return ids


def text_end(pipe, ids: list[int]) -> int:
    """The position after a tokenized prompt's last word (1 when it has none): where its EOS and padding
    start. Not the first EOS: padding repeats it, but one typed inside the prompt ("<|endoftext|>") is
    followed by words the text encoder reads too."""
    special = set(pipe.tokenizer.all_special_ids)
    return max((i for i, t in enumerate(ids) if t not in special), default=0) + 1


def encode_text(pipe, prompts: list[str], warn: bool = True, counts: np.ndarray | None = None) -> torch.Tensor:
    """Text-encoder output embeddings (B, L, D), as ``pipe.encode_prompt`` computes them for SD 1.x/2.x."""
    ids = tokenize(pipe, prompts, warn=warn, counts=counts).to(pipe.text_encoder.device)
    mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        mask = (ids != pipe.tokenizer.pad_token_id).long()
    emb = pipe.text_encoder(ids, attention_mask=mask)[0]
    return emb.to(dtype=pipe.unet.dtype)


def check_text_to_image(pipe, cls=InputError) -> None:
    """A ``cls`` error unless the UNet denoises the VAE's latents alone, under classifier-free guidance:
    an inpainting UNet takes 9 channels (the latents, a mask and the masked image's latents), scored from
    9 channels of noise without a word at the first step and stopped by a shape error in diffusers past
    it; a guidance-distilled one (LCM) is run by the pipeline with no unconditional pass at all."""
    wants, latents = pipe.unet.config.in_channels, pipe.vae.config.latent_channels
    if wants != latents or pipe.unet.config.out_channels != latents:
        kind = " (an inpainting model: the latents, a mask and the masked image)" if wants == 2 * latents + 1 else ""
        raise cls(f"the pipeline's UNet takes {wants} input channels where the VAE's latents have {latents}{kind}: it "
                  "is conditioned on more than the prompt, and diffmem audits text-to-image models, whose UNet "
                  "denoises the latents alone")
    if pipe.unet.config.get("time_cond_proj_dim") is not None:
        raise cls("the pipeline's UNet is guidance-distilled (time_cond_proj_dim: an LCM model, which takes the guidance "
                  "scale as an input): the pipeline runs it without classifier-free guidance, so there is no "
                  "unconditional prediction whose difference from the prompt's diffmem could measure")


def latent_shape(pipe, batch: int = 1) -> tuple[int, ...]:
    size = pipe.unet.config.sample_size
    return (batch, pipe.unet.config.in_channels, size, size)


def check_seed(seed) -> int:
    """A seed torch's generator and numpy's take alike: a whole number in [0, 2**64 - 1] (a negative
    one fails in numpy, a larger one in torch, each with its own traceback)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise InputError(f"a seed must be a whole number in [0, 2**64 - 1], got {seed!r}")
    return int(seed)


def _seeded_latent(pipe, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """One sample's unscaled x_T, and its generator in the state the pipeline's is left in after drawing it."""
    gen = torch.Generator(device="cpu").manual_seed(check_seed(seed))
    return randn_tensor(latent_shape(pipe, 1), generator=gen, device=pipe.unet.device, dtype=pipe.unet.dtype), gen


def initial_latents(pipe, sched, seed: int, batch: int = 1) -> torch.Tensor:
    """x_T exactly as the pipeline draws it for ``generator=torch.Generator().manual_seed(seed)``,
    scaled by ``sched``'s (``fresh_scheduler``'s) starting noise level as the pipeline scales it after
    setting its timesteps. The pipeline's own scheduler is not it: an Euler-type sampler with
    "leading" spacing (Stable Diffusion 1.x's, swapped in) starts below its top sigma, and its
    ``init_noise_sigma`` depends on whatever timesteps the last run set (scores were up to 66% off)."""
    return _seeded_latent(pipe, seed)[0].expand(batch, -1, -1, -1) * sched.init_noise_sigma


def step_kwargs(pipe, sched, seeds: Sequence[int]) -> dict:
    """What the pipeline passes to each ``sched.step`` besides the prediction (its
    ``prepare_extra_step_kwargs``), for a batch whose sample i was seeded with ``seeds[i]``.

    Samplers that draw fresh noise at every step (ancestral Euler, DDPM) take one generator per
    sample, each in the state the pipeline's is in after drawing that sample's x_T: without them the
    noise came from torch's global generator, so a trajectory past the first step was neither the
    pipeline's nor the same twice. Call it anew for each trajectory, since stepping advances them.
    Samplers with an ``eta`` get the pipeline's default, 0: TCD's own default is 0.3."""
    accepts = inspect.signature(sched.step).parameters
    kwargs = {"eta": 0.0} if "eta" in accepts else {}
    if "generator" in accepts:
        states = {seed: _seeded_latent(pipe, seed)[1].get_state() for seed in dict.fromkeys(seeds)}
        kwargs["generator"] = [torch.Generator(device="cpu").set_state(states[seed]) for seed in seeds]
    return kwargs


def fresh_scheduler(pipe, num_inference_steps: int):
    """A copy of the pipeline's scheduler with its timesteps set, so the pipeline's own is untouched."""
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(num_inference_steps, device=pipe.unet.device)
    return sched


def training_scheduler(pipe):
    """The forward (noising) process a Stable Diffusion model is trained with, taken as diffusers'
    training scripts take it: ``DDPMScheduler`` from the pipeline's scheduler config. The sampler's
    own ``add_noise`` is another process for most samplers a folder may hold: Euler-type ones noise
    on their sigma scale (x0 + sigma * noise, 42 times too loud at t = 999), multistep ones look up
    only their own inference timesteps, and PNDM has no ``get_velocity``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def alpha_bar(pipe, t, device=None) -> torch.Tensor:
    """alpha_bar at timestep ``t``. Euler-type samplers space their timesteps in fractions
    (999, 749.25, ...) and set sigma there by linear interpolation in t: between integer timesteps it
    comes from that sigma, as the sampler's own scaling of the model input does (the integer part
    alone was a fraction of a percent off)."""
    table = pipe.scheduler.alphas_cumprod.to(device)
    below = int(math.floor(float(t)))
    frac = float(t) - below
    if frac == 0.0:
        return table[below]
    sigmas = ((1 - table[below : below + 2]) / table[below : below + 2]) ** 0.5
    sigma = sigmas[0] + frac * (sigmas[1] - sigmas[0])
    return 1 / (1 + sigma**2)


def check_inference_steps(pipe, num_inference_steps: int) -> int:
    """``num_inference_steps`` if the pipeline's sampler can run that many, else an ``InputError``
    before any work: PNDM, Stable Diffusion 1.x's sampler, needs at least 4 and fails inside
    diffusers with a message about array shapes."""
    check_text_to_image(pipe)  # every method asks this first, so pipelines built in Python are checked too
    name = type(pipe.scheduler).__name__
    lacks = [a for a in ("alphas_cumprod", "init_noise_sigma", "scale_model_input", "step") if not hasattr(pipe.scheduler, a)]
    if lacks:
        raise InputError(f"the pipeline's sampler {name} is not one diffmem can run: it has no {', '.join(lacks)}. "
                         "diffmem measures on the DDPM noise schedule that Stable Diffusion's samplers carry; "
                         "choose one of them, e.g. pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
    if (why := _sampler_refuses(pipe, num_inference_steps)) is None:
        return num_inference_steps
    fewest = next((n for n in range(num_inference_steps + 1, 65) if _sampler_refuses(pipe, n) is None), None)
    needs = f"; it needs at least {fewest}" if fewest else ""
    raise InputError(f"the pipeline's sampler ({name}) cannot sample in {num_inference_steps} inference steps"
                     f"{needs} (diffusers: {why})") from why


def _sampler_refuses(pipe, num_inference_steps: int) -> Exception | None:
    """Why the pipeline's sampler cannot set that many timesteps, or None when it can."""
    try:
        fresh_scheduler(pipe, num_inference_steps)
        return None
    except Exception as e:
        return e


# alpha_bar at the terminal timestep of a zero-terminal-SNR schedule: 0 (DDIM) or 2**-24 (Euler's
# stand-in for 0); an ordinary Stable Diffusion schedule ends near 0.0047
_NO_SIGNAL = 1e-6


def scores_nothing_at(pipe, t) -> bool:
    """Is the conditional-minus-unconditional difference identically 0 in epsilon units at timestep
    ``t``? So for a v- or x0-prediction model where the schedule has no signal left (alpha_bar 0)."""
    return pipe.scheduler.config.prediction_type != "epsilon" and float(alpha_bar(pipe, t)) <= _NO_SIGNAL


def check_scored_steps(pipe, num_inference_steps: int, steps) -> None:
    """An ``InputError`` when every scored sampling step is at a timestep whose alpha_bar is 0 (a
    zero-terminal-SNR schedule with "trailing" spacing starts at t = 999): for a v- or x0-prediction
    model the two predictions' difference is 0 there in epsilon units, so every prompt would score 0
    (or nearly, as Euler keeps alpha_bar at 2**-24) and every word would carry nothing."""
    timesteps = fresh_scheduler(pipe, num_inference_steps).timesteps
    if all(scores_nothing_at(pipe, timesteps[i]) for i in steps):
        at = ", ".join(f"{float(timesteps[i]):g}" for i in steps)
        first = ",".join(str(i) for i in range(min(5, num_inference_steps)))
        raise InputError(
            f"every scored step ({', '.join(map(str, steps))}) is at a timestep ({at}) where this model's schedule "
            f"has no signal left (alpha_bar 0: zero terminal SNR with {pipe.scheduler.config.get('timestep_spacing', '?')!r} "
            "spacing): the text-conditional and unconditional predictions agree there in epsilon units, so every "
            f"prompt would score 0. Score later steps as well (steps {first}), or sample with 'leading' spacing "
            "as MemLab does")


def to_epsilon(pipe, model_output_diff: torch.Tensor, t) -> torch.Tensor:
    """Convert a difference of two model outputs at the same x_t into epsilon units.

    epsilon = sqrt(alpha_bar) * v + sqrt(1 - alpha_bar) * x_t, so a difference of v-predictions
    at the same x_t is a difference of epsilon-predictions divided by sqrt(alpha_bar_t).
    """
    kind = pipe.scheduler.config.prediction_type
    if kind == "epsilon":
        return model_output_diff
    if kind == "v_prediction":
        ab = alpha_bar(pipe, t, model_output_diff.device)
        return model_output_diff * ab.sqrt().to(model_output_diff.dtype)
    if kind == "sample":
        ab = alpha_bar(pipe, t, model_output_diff.device)
        # eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab): the x_t part cancels in a difference
        return -model_output_diff * (ab.sqrt() / (1 - ab).sqrt()).to(model_output_diff.dtype)
    raise InputError(f"unsupported prediction_type {kind!r}")


def predicted_x0(pipe, model_input: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
    """The clean latent a prediction at timestep ``t`` implies, from the sampler's scaled model input.

    DDIM's ``pred_original_sample``, term for term, without its clipping (off in Stable Diffusion's
    configurations). Computed here rather than taken from ``scheduler.step``, whose output lacks it
    for multistep samplers (PNDM, SD 1.x's default; DPM-Solver++; UniPC; DEIS). For samplers that
    scale their input (Euler and its kin) the scaled input is the DDPM latent at ``t``, so this is
    their ``pred_original_sample`` too."""
    alpha_prod_t = alpha_bar(pipe, t, model_output.device)
    beta_prod_t = 1 - alpha_prod_t
    kind = pipe.scheduler.config.prediction_type
    if kind == "epsilon":
        return (model_input - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    if kind == "v_prediction":
        return (alpha_prod_t**0.5) * model_input - (beta_prod_t**0.5) * model_output
    if kind == "sample":
        return model_output
    raise InputError(f"unsupported prediction_type {kind!r}")


def check_guidance_scale(guidance_scale: float) -> float:
    """A NaN or infinite scale would turn every later latent into NaN: images of noise, scores of nan."""
    if not math.isfinite(guidance_scale):
        raise InputError(f"the guidance scale must be a finite number, got {guidance_scale}")
    return guidance_scale


def guided(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance exactly as StableDiffusionPipeline combines the two halves. At a scale
    of 1 or less the pipeline does no guidance and follows the conditional prediction alone (at 0 it
    does not follow the unconditional one), so the trajectory here does the same."""
    if check_guidance_scale(guidance_scale) <= 1:
        return cond
    return uncond + guidance_scale * (cond - uncond)


def conditional_noise_norm(pipe, noisy: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor,
                           uncond_emb: torch.Tensor, cond_pred: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample || eps(x_t, c) - eps(x_t, empty) || in epsilon units, for per-sample timesteps
    ``t`` (B,): the training-time statistic of Wen et al. that the fine-tuning filter thresholds
    and the dataset scan reports. ``cond_pred`` reuses a conditional prediction already made."""
    unet = pipe.unet
    if cond_pred is None:
        cond_pred = unet(noisy, t, cond_emb).sample
    uncond = unet(noisy, t, uncond_emb.expand(len(noisy), -1, -1)).sample
    diff = cond_pred.detach() - uncond
    kind = pipe.scheduler.config.prediction_type
    ab = pipe.scheduler.alphas_cumprod.to(diff.device)[t.long()].view(-1, 1, 1, 1).to(diff.dtype)
    if kind == "v_prediction":
        diff = diff * ab.sqrt()
    elif kind == "sample":
        diff = -diff * ab.sqrt() / (1 - ab).sqrt()
    elif kind != "epsilon":
        raise InputError(f"unsupported prediction_type {kind!r}")
    return diff.flatten(1).norm(dim=1)
