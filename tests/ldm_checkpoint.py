"""A diffusers Stable Diffusion 1.x pipeline written as one original (LDM / CompVis) checkpoint
file, the layout civitai and the original SD releases ship (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``): the test input of ``diffmem convert``
for single files. The inverse of diffusers' ``convert_ldm_*_checkpoint``, for the blocks our small
pipelines use (no class or addition embedding, CLIP text encoder)."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_LAYERS = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_LAYERS = {"conv_norm_out": "norm_out"}
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _renamed(rest: str, pairs) -> str:
    for new, old in pairs:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    per = unet.config.layers_per_block + 1  # an LDM level holds its resnets and then its downsampler
    up_attention = {int(k.split(".")[1]) for k in unet.state_dict() if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if ".".join(parts[:2]) in UNET_LAYERS:
            new = f"{UNET_LAYERS['.'.join(parts[:2])]}.{'.'.join(parts[2:])}"
        elif parts[0] in UNET_LAYERS:
            new = f"{UNET_LAYERS[parts[0]]}.{'.'.join(parts[1:])}"
        elif parts[0] in ("down_blocks", "up_blocks"):
            b, kind, rest = int(parts[1]), parts[2], ".".join(parts[4:])
            ldm = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
            first = 1 if parts[0] == "down_blocks" else 0
            if kind == "resnets":
                new = f"{ldm}.{first + b * per + int(parts[3])}.0.{_renamed(rest, UNET_RESNET)}"
            elif kind == "attentions":
                new = f"{ldm}.{first + b * per + int(parts[3])}.1.{rest}"
            elif kind == "downsamplers":
                new = f"input_blocks.{1 + b * per + per - 1}.0.op.{'.'.join(parts[5:])}"
            else:  # upsamplers: after the level's last resnet, and its attention where it has one
                new = f"output_blocks.{b * per + per - 1}.{2 if b in up_attention else 1}.conv.{'.'.join(parts[5:])}"
        elif parts[0] == "mid_block":
            index = 2 * int(parts[2]) if parts[1] == "resnets" else 1
            rest = ".".join(parts[3:])
            new = f"middle_block.{index}.{_renamed(rest, UNET_RESNET) if parts[1] == 'resnets' else rest}"
        else:
            raise ValueError(f"no LDM name for the UNet's {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n_up = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        side, rest = parts[0], parts[1:]
        if side in ("quant_conv", "post_quant_conv"):
            new = key
        elif rest[0] in ("conv_in", "conv_out", "conv_norm_out"):
            new = f"{side}.{VAE_LAYERS.get(rest[0], rest[0])}.{'.'.join(rest[1:])}"
        elif rest[0] in ("down_blocks", "up_blocks"):
            b = int(rest[1]) if rest[0] == "down_blocks" else n_up - 1 - int(rest[1])
            level = "down" if rest[0] == "down_blocks" else "up"
            if rest[2] == "resnets":
                tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{level}.{b}.block.{rest[3]}.{tail}"
            else:
                new = f"{side}.{level}.{b}.{'downsample' if level == 'down' else 'upsample'}.conv.{'.'.join(rest[5:])}"
        elif rest[0] == "mid_block" and rest[1] == "resnets":
            new = f"{side}.mid.block_{int(rest[2]) + 1}.{'.'.join(rest[3:]).replace('conv_shortcut', 'nin_shortcut')}"
        elif rest[0] == "mid_block":
            new = f"{side}.mid.attn_1.{_renamed('.'.join(rest[3:]), VAE_ATTENTION)}"
            if value.ndim == 2:  # the original attention's projections are 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise ValueError(f"no LDM name for the VAE's {key}")
        out["first_stage_model." + new] = value
    return out


def write_ldm_checkpoint(pipe, path: str | Path) -> Path:
    """``pipe``'s UNet, VAE and CLIP text encoder in one safetensors file, by their original names."""
    from safetensors.torch import save_file

    # transformers 5.6 flattened CLIPTextModel (no text_model. prefix); the original files keep it
    clip = {f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
            for k, v in pipe.text_encoder.state_dict().items()}
    tensors = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **clip}
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)
