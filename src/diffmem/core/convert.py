"""Convert pickled weights to safetensors: a LoRA or textual-inversion embedding (.bin / .pt), or a
pipeline folder whose components hold only pickles (diffusers saved .bin before safetensors).

diffmem never unpickles while loading a model: a pickle can run arbitrary code. Many LoRAs and most
of A1111's older embeddings are pickles, though, and a user who trusts one needs a way in. This is
that way, taken on purpose, one file at a time: the file is read with torch's weights-only unpickler
(``torch.load(weights_only=True)``), which rebuilds tensors and plain containers (dicts, lists,
strings, numbers) and refuses every other object, so a pickle that would run code is refused, not run.
The tensors are written to a safetensors file that ``--lora`` / ``--textual-inversion`` then take.
A pipeline folder is loaded by diffusers and transformers, whose loaders use the same weights-only
unpickler for .bin files, and saved again with safetensors.

A single-file checkpoint (the original Stable Diffusion layout of the first releases and of civitai,
.safetensors or a pickled .ckpt) becomes a pipeline folder the same way, by diffusers'
``from_single_file``, given a pipeline folder of the same architecture to take its configurations
from: offline, nothing else says how many blocks the UNet has or which tokenizer the model reads with.
"""
from __future__ import annotations

import pickle
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError, kind_and_first_line
from .loading import LORA_DOWN, PICKLE_SUFFIXES, WEIGHTED
from .results import atomic_path


LDM_UNET = "model.diffusion_model."  # the UNet's prefix in an original (LDM / CompVis) single-file checkpoint
WHOLE_MODEL = ("{source} is a whole model's single-file checkpoint, not a LoRA or an embedding: convert it to a pipeline "
               "folder with diffmem convert {source} --config DIR, DIR a pipeline folder of the same architecture")


@dataclass
class Conversion:
    """What ``convert_adapter`` or ``convert_pipeline`` wrote: the kind of weights it found, its
    tensors and, for an embedding, the token it is called by."""
    source: str
    out: str
    kind: str  # "lora", "textual_inversion", "pipeline" or "checkpoint" (a single file made a pipeline folder)
    tensors: int
    token: str | None = None
    vectors: int | None = None  # an embedding's vectors, and their width
    width: int | None = None
    left_out: list[str] = field(default_factory=list)  # entries of the pickle that are not tensors (A1111's step, name)
    from_pickles: list[str] = field(default_factory=list)  # a pipeline's components that held only pickles
    config: str | None = None  # a checkpoint's: the pipeline folder whose configurations it was read with
    ema: bool | None = None  # a checkpoint's UNet: its EMA weights (True), its trained ones beside them (False), or it held no EMA

    def describe(self) -> str:
        if self.kind == "checkpoint":
            which = {True: "; its UNet's EMA weights, which it held beside the trained ones (--no-ema takes those)",
                     False: "; its UNet's trained weights, not the EMA ones it held beside them", None: ""}[self.ema]
            return (f"converted the single-file checkpoint {self.source} ({self.tensors} tensors, configured as {self.config}, "
                    f"saved in float32{which}) -> {self.out}; use it with --model {self.out}")
        if self.kind == "pipeline":
            return (f"converted the pipeline {self.source} ({', '.join(self.from_pickles)} from pickles; {self.tensors} "
                    f"tensors, saved in float32) -> {self.out}; use it with --model {self.out}")
        if self.kind == "lora":
            return (f"converted the LoRA {self.source} ({self.tensors} tensors) -> {self.out}; "
                    f"use it with --lora {self.out}")
        return (f"converted the textual-inversion embedding {self.source} ({self.vectors} vector"
                f"{'s' if self.vectors != 1 else ''} of width {self.width}, token {self.token!r}) -> {self.out}; "
                f"use it with --textual-inversion {self.out}")


def convert_adapter(source: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Conversion:
    """Read the pickled LoRA or embedding ``source`` with torch's weights-only unpickler and write its
    tensors to ``out`` (default: beside it, with the suffix .safetensors), in one rename.

    - A LoRA: a flat state dict whose keys include LoRA down-projections (diffusers', PEFT's or
      kohya's names); written as it is.
    - An embedding: A1111's ``.pt`` (``string_to_param``), written as ``emb_params``, so that its
      token is the output's file name, as A1111 calls it; or diffusers' ``learned_embeds.bin``
      (one tensor named by its token), written under the same name.

    Anything else (a whole model's weights, a pickle holding other objects) is refused, and an
    existing ``out`` is not replaced unless ``overwrite``; nothing is written on any refusal."""
    source = Path(source).expanduser()
    if not source.is_file():
        raise ModelLoadError(f"{source} is {'a folder' if source.is_dir() else 'not found'}: give the pickle file to convert")
    if source.suffix.lower() not in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{source} is not a pickle ({', '.join(PICKLE_SUFFIXES)}): "
                             + ("it is safetensors already, to pass as it is" if source.suffix.lower() == ".safetensors"
                                else "diffmem converts pickled LoRAs and embeddings only"))
    out = Path(out).expanduser() if out is not None else source.with_suffix(".safetensors")
    if out.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"the output {out} must end in .safetensors")
    refusal = f"{out} exists; choose another output, or replace it with overwrite=True (--overwrite)"
    if out.exists() and not overwrite:
        raise ModelLoadError(refusal)
    tensors, token, left_out, kind = _adapter_tensors(source, _load_weights_only(source))
    try:
        # without overwrite, an output another conversion wrote meanwhile is not replaced either
        with atomic_path(out, replace=overwrite) as tmp:
            from safetensors.torch import save_file

            # safetensors refuses tensors that share storage (tied or sliced weights): each gets its own
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, tmp,
                      metadata={"converted_from": source.name})
    except FileExistsError:
        raise ModelLoadError(refusal) from None
    first = next(iter(tensors.values()))
    if kind == "textual_inversion":
        token = token or out.stem  # emb_params: called by its file name, as load_pipeline calls it
    return Conversion(str(source), str(out), kind, len(tensors), token=token,
                      vectors=(1 if first.dim() == 1 else first.shape[0]) if kind == "textual_inversion" else None,
                      width=first.shape[-1] if kind == "textual_inversion" else None, left_out=left_out)


def _load_weights_only(path: Path):
    """``torch.load`` of ``path`` through the weights-only unpickler, its refusals said plainly."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(f"{path} holds objects other than tensors and plain containers ({_refused_object(e)}), "
                             "which torch's weights-only unpickler refuses, as it refuses a pickle made to run code: "
                             "not converted") from None
    except Exception as e:  # a damaged or foreign file fails inside the unpickler in many ways (KeyError, EOFError, ...)
        raise ModelLoadError(f"{path} is not a readable torch pickle: {kind_and_first_line(e)}") from None


def _refused_object(error: Exception) -> str:
    """What the weights-only unpickler refused, from its message (which goes on to suggest loading
    the file without it, advice diffmem does not pass on)."""
    import re

    # "Unsupported global: GLOBAL x was not allowed", "unsupported GLOBAL x whose module is blocked"
    if found := re.search(r"\bGLOBAL (\S+)", str(error)):
        return f"it holds {found.group(1)}"
    return "torch did not say which"


def _adapter_tensors(source: Path, loaded) -> tuple[dict, str | None, list[str], str]:
    """(tensors to write, token, entries left out, kind) of an unpickled adapter."""
    import torch

    if not isinstance(loaded, dict):
        raise ModelLoadError(f"{source} holds a {type(loaded).__name__}, where a LoRA or an embedding is a dict of tensors")
    if "string_to_param" in loaded:  # A1111's embedding: its vectors under one placeholder, beside its name and step
        params = loaded["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1 or not torch.is_tensor(next(iter(params.values()))):
            raise ModelLoadError(f"{source} is an A1111 embedding whose string_to_param holds "
                                 f"{len(params) if isinstance(params, dict) else 'no'} tensors, where one is expected")
        (vectors,) = params.values()
        if vectors.dim() not in (1, 2):
            raise ModelLoadError(f"{source} is an A1111 embedding whose vectors have shape {tuple(vectors.shape)}, where an "
                                 "embedding is one vector or a matrix of them")
        return {"emb_params": vectors}, None, sorted(str(k) for k in loaded if k != "string_to_param"), "textual_inversion"
    if "state_dict" in loaded or any(str(k).startswith(LDM_UNET) for k in loaded):
        raise ModelLoadError(WHOLE_MODEL.format(source=source))
    tensors = {k: v for k, v in loaded.items() if torch.is_tensor(v)}
    left_out = sorted(str(k) for k in loaded if not torch.is_tensor(loaded[k]))
    if not tensors:
        raise ModelLoadError(f"{source} holds no tensors ({', '.join(left_out[:5])}): it is not a LoRA or an embedding")
    if not all(isinstance(k, str) for k in tensors):
        raise ModelLoadError(f"{source} names its tensors with other than strings: it is not a LoRA or an embedding")
    if any(LORA_DOWN.search(k) for k in tensors):
        return tensors, None, left_out, "lora"
    if len(tensors) == 1 and next(iter(tensors.values())).dim() in (1, 2):  # diffusers' learned_embeds.bin
        (name,) = tensors
        return tensors, (None if name == "emb_params" else name), left_out, "textual_inversion"
    raise ModelLoadError(f"{source} holds {len(tensors)} tensors (e.g. {next(iter(tensors))}) and none is a LoRA "
                         "down-projection (lora_A / lora.down / lora_down), nor is it one embedding tensor: is it a whole "
                         "model's weights? diffmem converts LoRAs and embeddings only")


def convert_pipeline(source: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Conversion:
    """Save the pipeline folder ``source``, some of whose components hold only pickle weights (.bin),
    as a new pipeline folder ``out`` (default: beside it, its name ending in ``-safetensors``) with
    safetensors weights, in float32 as diffmem loads models by default. The pickles are read by
    diffusers' and transformers' loaders, which use torch's weights-only unpickler. ``out`` is
    written whole or not at all; an existing one is replaced only with ``overwrite``."""
    from .loading import check_pipeline_folder, load_pipeline, weight_files

    source = Path(source).expanduser()
    check_pipeline_folder(source, allow_pickle=True)  # a folder that is no pipeline is said as the loader says it
    # the check leaves every weighted component some weights: those without safetensors hold pickles
    pickled = [name for name in WEIGHTED if not weight_files(source / name)[0]]
    if not pickled:
        raise ModelLoadError(f"every component of {source} has safetensors weights already: pass the folder as it is")
    out = Path(out).expanduser() if out is not None else source.resolve().with_name(source.resolve().name + "-safetensors")
    with _new_pipeline_folder(out, overwrite, not_in=(source, "the pipeline folder itself")):
        try:
            pipe = load_pipeline(source, allow_pickle=True)
        except ModelLoadError:
            # the libraries say only that a file could not be loaded: the pickle the unpickler refused is named
            for name in pickled:
                for file in sorted(weight_files(source / name)[1]):
                    _load_weights_only(source / name / file)
            raise
        tensors = _save_whole(pipe, out)
    return Conversion(str(source), str(out), "pipeline", tensors, from_pickles=pickled)


@contextmanager
def _new_pipeline_folder(out: Path, overwrite: bool, not_in: tuple[Path, str]):
    """Held while the pipeline folder ``out`` is made and written (a second conversion into it would clear
    this one's half-written OUT.tmp); refused, before any work, where it is the folder ``not_in`` names,
    a file, or a folder with something in it and no ``overwrite``."""
    from .results import folder_held

    if out.resolve() == Path(not_in[0]).resolve():
        raise ModelLoadError(f"the output {out} is {not_in[1]}: choose a new folder")
    if out.is_file():
        raise ModelLoadError(f"the output {out} is a file: choose a new folder")
    refusal = f"{out} exists; choose a new folder, or replace it with overwrite=True (--overwrite)"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelLoadError(refusal)
    with folder_held(out, instead="choose another output folder"):
        if any(out.iterdir()) and not overwrite:  # written by another conversion since the check above
            raise ModelLoadError(refusal)
        yield


def _save_whole(pipe, out: Path) -> int:
    """``pipe`` saved with safetensors weights, swapped in whole: a kill while saving leaves no half
    pipeline to load. Returns how many tensors its weighted components hold."""
    from .results import replace_folder

    replace_folder(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    return sum(len(getattr(pipe, name).state_dict()) for name in WEIGHTED)


def convert_checkpoint(source: str | Path, config: str | Path, out: str | Path | None = None,
                       overwrite: bool = False, ema: bool = True, progress: bool = False) -> Conversion:
    """Save the single-file Stable Diffusion 1.x / 2.x checkpoint ``source`` (the original LDM layout
    that the first releases and civitai ship: ``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.*``) as a pipeline folder ``out`` (default: beside it, named ``STEM-diffusers``)
    with safetensors weights in float32, by diffusers' ``from_single_file``, offline. ``config`` is a
    pipeline of the same architecture (a folder, ``memlab`` or a hub id in the hub cache): its UNet, VAE
    and text encoder configurations, tokenizer and sampler are taken, its weights are not read.

    A file that holds EMA copies of the UNet beside its trained weights (SD 1.x's ``v1-5-pruned.ckpt``)
    gives its EMA weights, which the releases generate with, unless ``ema=False`` (diffusers' own
    default is the trained ones). A pickled file (.ckpt) is read with torch's weights-only unpickler
    first, so that a refused object is named, and again by diffusers, which reads it the same way.
    What of the file does not fit ``config``'s architecture is named; ``out`` is written whole or not at all."""
    from .loading import SINGLE_FILE_SUFFIXES, check_pipeline_folder, hub_snapshot, looks_like_path, resolve_model

    source = Path(source).expanduser()
    if not source.is_file():
        raise ModelLoadError(f"{source} is {'a folder' if source.is_dir() else 'not found'}: give the single-file "
                             "checkpoint to convert (a pipeline folder of pickles converts without --config)")
    if source.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{source} is not a single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})")
    name = resolve_model(str(config))
    folder = Path(name).expanduser()
    if not folder.exists() and not looks_like_path(name):
        if (folder := hub_snapshot(name)) is None:
            raise ModelLoadError(f"the configuration {config!r} is a hub id the hub cache does not hold, and diffmem "
                                 "converts offline: give a local pipeline folder of the same architecture")
    check_pipeline_folder(folder, weights=False)  # said as the loader says it: no model_index.json, a missing component
    out = Path(out).expanduser() if out is not None else source.with_name(source.stem + "-diffusers")
    with _new_pipeline_folder(out, overwrite, not_in=(folder, "the configuration's folder")):
        keys = _checkpoint_keys(source)
        if not any(k.startswith((LDM_UNET, "model_ema.")) for k in keys):
            raise ModelLoadError(f"{source} holds no UNet of an original single-file checkpoint ({LDM_UNET}*; its first "
                                 f"tensor: {next(iter(keys), 'none')}): a LoRA or an embedding is passed as it is")
        held_ema = sum(k.startswith("model_ema.") for k in keys) > 100  # where diffusers takes a file to hold EMA weights
        pipe = _from_single_file(source, folder, extract_ema=ema and held_ema, progress=progress)
        tensors = _save_whole(pipe, out)
    return Conversion(str(source), str(out), "checkpoint", tensors, config=str(folder), ema=ema if held_ema else None)


def _checkpoint_keys(path: Path) -> list[str]:
    """A single-file checkpoint's tensor names: a safetensors file's from its header, a pickle's through
    the weights-only unpickler (its refusals said plainly), unnested from a training run's state_dict."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except Exception as e:  # a damaged or foreign file
            raise ModelLoadError(f"{path} is not a readable safetensors file: {kind_and_first_line(e)}") from None
    loaded = _unnested(_load_weights_only(path))
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"{path} holds a {type(loaded).__name__}, where a checkpoint is a dict of tensors")
    return [str(k) for k in loaded]


def _unnested(loaded):
    while isinstance(loaded, dict) and "state_dict" in loaded:  # as diffusers unnests a training run's file
        loaded = loaded["state_dict"]
    return loaded


def _from_single_file(source: Path, config: Path, extract_ema: bool, progress: bool):
    """The pipeline diffusers converts ``source`` to with ``config``'s configurations; its failures said
    with what of the file does not fit them."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_log

    from .loading import PICKLE_SUFFIXES, loading_bars

    was = diffusers_log.get_verbosity()
    # diffusers logs a cast's warning about "modules that should be kept in float32: []" for each model,
    # and its choice between EMA and trained weights, which the Conversion says
    diffusers_log.set_verbosity_error()
    try:
        with loading_bars(progress):
            pipe = StableDiffusionPipeline.from_single_file(
                str(source), config=str(config), local_files_only=True, torch_dtype=torch.float32,
                extract_ema=extract_ema, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except Exception as e:
        if source.suffix.lower() in PICKLE_SUFFIXES:
            checkpoint = _unnested(_load_weights_only(source))
        else:
            from safetensors.torch import load_file

            checkpoint = load_file(str(source))  # its header was read: a damaged file fails above, in diffusers
        raise ModelLoadError(f"could not convert {source} with the configurations of {config}: "
                             f"{_misfit(checkpoint, config, extract_ema) or kind_and_first_line(e)}") from None
    finally:
        diffusers_log.set_verbosity(was)
    empty = [f"{part}.{n}" for part in WEIGHTED
             for n, p in getattr(pipe, part).named_parameters() if p.is_meta]
    if empty:  # a tensor the file lacks, left without weights where diffusers did not fail on it
        raise ModelLoadError(f"could not convert {source} with the configurations of {config}: the file lacks "
                             f"{len(empty)} of their tensors, the first {empty[0]}")
    return pipe


def _misfit(checkpoint: dict, config: Path, extract_ema: bool = False) -> str | None:
    """What of ``checkpoint`` does not fit ``config``'s UNet, VAE and CLIP text encoder, by diffusers' own
    conversion of each component's names: a tensor it lacks, or one of another shape; None if each fits
    (the failure lies elsewhere)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextConfig, CLIPTextModel

    found = []
    for part, cls, convert in (("UNet", UNet2DConditionModel,
                                lambda c, cfg: sf.convert_ldm_unet_checkpoint(c, cfg, extract_ema=extract_ema)),
                               ("VAE", AutoencoderKL, sf.convert_ldm_vae_checkpoint)):
        cfg = cls.load_config(config / ("unet" if part == "UNet" else "vae"))
        with init_empty_weights():
            model = cls.from_config(cfg)
        found.append((part, model, convert(checkpoint, cfg)))
    if sf.is_clip_model(checkpoint):
        with init_empty_weights():
            model = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
        text = sf.convert_ldm_clip_checkpoint(checkpoint)
        if not hasattr(model, "text_model"):  # transformers 5.6 flattened CLIPTextModel; the files keep the prefix
            text = {k.removeprefix("text_model."): v for k, v in text.items()}
        found.append(("text encoder", model, text))
    for part, model, got in found:
        wanted = model.state_dict()
        lacking = [k for k in wanted if got.get(k) is None]
        if len(lacking) == len(wanted):
            return f"the file holds no {part} of this layout"
        if lacking:
            return f"the file's {part} lacks {len(lacking)} of the {len(wanted)} tensors of theirs, the first {lacking[0]}"
        for k, v in wanted.items():
            if tuple(got[k].shape) != tuple(v.shape):
                shape = "x".join(map(str, got[k].shape))
                return (f"the file's {part} tensor {k} is {shape}, theirs {'x'.join(map(str, v.shape))}: "
                        "is it a pipeline of the file's architecture?")
    return None


def convert(source: str | Path, out: str | Path | None = None, overwrite: bool = False,
            config: str | Path | None = None, ema: bool = True, progress: bool = False) -> Conversion:
    """``convert_checkpoint`` for a file given ``config``, else ``convert_pipeline`` for a folder and
    ``convert_adapter`` for a file (``diffmem convert``)."""
    source_path = Path(source).expanduser()
    if not ema and config is None:
        raise ModelLoadError("ema=False (--no-ema) chooses a single-file checkpoint's weights: give its --config too")
    if config is not None:
        if source_path.is_dir():
            raise ModelLoadError(f"{source} is a pipeline folder: --config is for a single-file checkpoint, and a folder "
                                 "of pickles converts without it")
        return convert_checkpoint(source, config, out, overwrite, ema=ema, progress=progress)
    if source_path.is_dir():
        return convert_pipeline(source, out, overwrite)
    if source_path.suffix.lower() == ".safetensors":  # a whole model's is named, read from its header alone
        try:
            keys = _checkpoint_keys(source_path)
        except ModelLoadError:  # not safetensors: convert_adapter says what it is
            keys = []
        if any(k.startswith(LDM_UNET) for k in keys):
            raise ModelLoadError(WHOLE_MODEL.format(source=source))
    return convert_adapter(source, out, overwrite)
