"""Assemble Stable Diffusion pipelines from configs alone (no download), for MemLab and tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import clip_tokenizer


@dataclass
class PipelineSpec:
    """Sizes of a small SD-architecture pipeline. Defaults are MemLab's."""

    latent_size: int = 16
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    unet_norm_groups: int = 8
    vae_channels: tuple[int, ...] = (16, 32)
    vae_layers_per_block: int = 1
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 128
    max_length: int = 77
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    extra_scheduler: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["unet_channels"] = list(self.unet_channels)
        d["vae_channels"] = list(self.vae_channels)
        return d


def build_unet(spec: PipelineSpec) -> UNet2DConditionModel:
    n = len(spec.unet_channels)
    # attention only on the low-resolution blocks: at full resolution it costs half a step
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
    up = ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"]
    return UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(spec.unet_channels),
        layers_per_block=spec.unet_layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=spec.unet_attention_head_dim,
        norm_num_groups=spec.unet_norm_groups,
    )


def build_vae(spec: PipelineSpec) -> AutoencoderKL:
    n = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(spec.vae_channels),
        layers_per_block=spec.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=min(16, spec.vae_channels[0]),
        sample_size=spec.latent_size * 2 ** (n - 1),
        mid_block_add_attention=False,
    )


def build_text_encoder(spec: PipelineSpec) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_length,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=spec.text_hidden,
    )
    return CLIPTextModel(cfg)


def build_scheduler(spec: PipelineSpec) -> DDIMScheduler:
    kwargs = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=spec.prediction_type,
    )
    if spec.zero_terminal_snr:
        # with v-prediction, a zero-terminal-SNR schedule makes the model learn the whole image
        # at t = T, so generations follow the prompt rather than the seed. Sampling keeps SD 1.x's
        # "leading" spacing: its first step (t = 961 of 25 steps) has alpha_bar > 0, so the
        # epsilon-unit detection score is defined there (at t = 999 it would be identically 0).
        kwargs.update(rescale_betas_zero_snr=True, timestep_spacing="leading")
    kwargs.update(spec.extra_scheduler)
    return DDIMScheduler(**kwargs)


def build_pipeline(spec: PipelineSpec | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised pipeline of the given sizes, with the offline CLIP tokenizer."""
    spec = spec or PipelineSpec()
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=build_vae(spec),
        text_encoder=build_text_encoder(spec),
        tokenizer=clip_tokenizer(spec.max_length),
        unet=build_unet(spec),
        scheduler=build_scheduler(spec),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """A tiny random pipeline (well under a second to build) for fast tests."""
    spec = PipelineSpec(
        latent_size=8,
        unet_channels=(8, 16),
        unet_attention_head_dim=4,
        unet_norm_groups=4,
        vae_channels=(8, 16),
        text_hidden=16,
        text_layers=2,
        text_heads=2,
        text_intermediate=32,
        prediction_type=prediction_type,
        zero_terminal_snr=False,
    )
    return build_pipeline(spec, seed=seed)
