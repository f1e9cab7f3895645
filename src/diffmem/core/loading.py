"""Loading a Stable Diffusion family pipeline: the one place diffmem loads weights.

``load_pipeline("memlab")`` gives the shipped MemLab model; any other string is a local
pipeline folder or a hub id. Weights load from safetensors only unless the caller passes
``allow_pickle=True``.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
from pathlib import Path
from typing import Sequence

import torch

from .errors import ModelLoadError, first_line

SUPPORTED_CLASSES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
# what other pipeline families would need, said plainly in the error
UNSUPPORTED = {
    "StableDiffusionXLPipeline": "SDXL has two text encoders (text_encoder and text_encoder_2) and extra "
    "time/size conditioning; diffmem's detectors handle one CLIP text encoder (SD 1.x / 2.x)",
    "StableDiffusion3Pipeline": "SD3 is an MMDiT transformer with three text encoders, not a UNet with cross-attention",
    "FluxPipeline": "Flux is a flow-matching transformer, not a UNet with cross-attention",
    "PixArtAlphaPipeline": "PixArt uses a T5 text encoder and a transformer, not a CLIP text encoder and a UNet",
}
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def memlab_path() -> Path:
    """The folder of the MemLab model shipped inside the package."""
    from importlib import resources

    return Path(str(resources.files("diffmem") / "memlab" / "model"))


def resolve_model(model: str | os.PathLike) -> str:
    if str(model).lower() == "memlab":
        return str(memlab_path())
    return str(model)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_path(s: str) -> bool:
    """Anything that is not shaped like a hub id (``owner/name``) is taken as a local path."""
    return not _HUB_ID.match(s)


def resolve_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {str(dev)!r} was asked for, but CUDA is not available here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {str(dev)!r} was asked for, but MPS is not available here")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from its name (float32 / fp32, float16 / fp16, bfloat16 / bf16) or itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None


def runs_on(pipe) -> dict:
    """Where a result was computed: its figures depend on the dtype (and, in the last digits, the device)."""
    return {"device": str(pipe.device), "dtype": str(pipe.dtype)}


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")  # weights that unpickle when loaded


WEIGHTED = ("unet", "vae", "text_encoder")


def weights_variants(folder: Path) -> dict[str, str]:
    """The weight variant to load for each component that has safetensors only of one
    (``diffusion_pytorch_model.fp16.safetensors``, as ``save_pretrained(variant="fp16")`` writes and a
    download of SD's fp16 files leaves): {"unet": "fp16", ...}. Components with plain safetensors are
    left out, and several variants with no plain file are an error, as nothing says which is meant."""
    variants = {}
    for name in WEIGHTED:
        sub = folder / name
        found = set()
        for file in (sub.iterdir() if sub.is_dir() else ()):
            if not file.name.endswith(".safetensors"):
                continue
            stem = re.sub(r"-\d{5}-of-\d{5}$", "", file.name.removesuffix(".safetensors"))  # shards
            if "." not in stem:
                break  # plain weights: loaded as they are
            found.add(stem.split(".", 1)[1])
        else:
            if len(found) > 1:
                raise ModelLoadError(f"component {name!r} at {sub} has no plain safetensors weights but several "
                                     f"variants ({', '.join(sorted(found))}), and nothing says which to load: "
                                     "keep one of them in the folder")
            if found:
                variants[name] = found.pop()
    if len(set(variants.values())) > 1:
        raise ModelLoadError(f"the components of {folder} hold weights of different variants ("
                             + ", ".join(f"{k}: {v}" for k, v in variants.items())
                             + "), which diffusers loads only one of: save them as one variant or as plain weights")
    return variants


def check_pipeline_folder(folder: Path, allow_pickle: bool = False, weights: bool = True) -> dict[str, str]:
    """Check a local folder before diffusers sees it, so errors say exactly what is wrong; returns
    the weight variants to load (``weights_variants``). ``weights=False`` checks only what a folder
    read for its configurations needs (``convert_checkpoint``'s ``config``)."""
    if not folder.exists():
        raise ModelLoadError(f"model folder not found: {folder}")
    if not folder.is_dir():
        if folder.suffix.lower() in SINGLE_FILE_SUFFIXES:
            # civitai-style checkpoints: diffusers can convert them, but offline only given a config folder
            raise ModelLoadError(
                f"{folder} is a single-file checkpoint; diffmem loads diffusers pipeline folders. Convert it once: "
                f"diffmem convert {folder} --config DIR, DIR a pipeline folder of the same architecture (its "
                "configurations are read, not its weights), then pass the folder it writes"
                + (f" (a {folder.suffix} file is a pickle, read with torch's weights-only unpickler: convert it only "
                   "if you trust its source)" if folder.suffix.lower() != ".safetensors" else ""))
        raise ModelLoadError(f"model path is a file, not a pipeline folder: {folder}")
    index_file = folder / "model_index.json"
    if not index_file.exists():
        hint = ""
        if (folder / "config.json").exists():
            hint = " (it holds a config.json: it looks like a single model component, not a whole pipeline)"
        raise ModelLoadError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json{hint}")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{index_file} is not valid JSON: {e}") from None
    cls = index.get("_class_name", "")
    if cls in UNSUPPORTED or "text_encoder_2" in index:
        why = UNSUPPORTED.get(cls, "it has a second text encoder (text_encoder_2)")
        raise ModelLoadError(f"unsupported pipeline {cls or 'with text_encoder_2'} at {folder}: {why}")
    if cls and cls not in SUPPORTED_CLASSES:
        raise ModelLoadError(
            f"unsupported pipeline class {cls!r} at {folder}; diffmem supports Stable Diffusion 1.x / 2.x "
            f"pipelines ({', '.join(sorted(SUPPORTED_CLASSES))})"
        )
    for name in REQUIRED:
        entry = index.get(name)
        if not entry or entry == [None, None]:
            raise ModelLoadError(f"pipeline at {folder} has no {name!r} component in model_index.json")
        sub = folder / name
        if not sub.is_dir():
            raise ModelLoadError(f"pipeline at {folder} is missing its {name!r} component: folder {sub} not found")
        if name in WEIGHTED and weights:
            safe, pickles = weight_files(sub)
            if not safe and not pickles:
                raise ModelLoadError(f"component {name!r} at {sub} has no weight file")
            if not safe and not allow_pickle:
                raise ModelLoadError(
                    f"component {name!r} at {sub} has only pickle weights ({', '.join(pickles)}); "
                    "diffmem loads safetensors only: unpickling can run arbitrary code. If you trust their source, convert "
                    f"the pipeline once: diffmem convert {folder} (a new folder, through torch's weights-only unpickler); "
                    "or load it with allow_pickle=True (diffmem train --allow-pickle)"
                )
    return weights_variants(folder) if weights else {}


def weight_files(component: Path) -> tuple[list[str], list[str]]:
    """The names of a component folder's safetensors files and of its pickle weight files."""
    files = [p.name for p in component.iterdir()]
    return [f for f in files if f.endswith(".safetensors")], [f for f in files if f.endswith(PICKLE_SUFFIXES)]


def hub_snapshot(repo_id: str) -> Path | None:
    """The folder of a hub id's cached snapshot (the revision its ``refs/main`` names), or None where
    the hub cache does not hold it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def load_pipeline(
    model: str | os.PathLike = "memlab",
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str = torch.float32,
    local_files_only: bool | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
    lora: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    lora_scale: float | Sequence[float] = 1.0,
    textual_inversion: Sequence[str | os.PathLike] = (),
):
    """Load an SD 1.x / 2.x pipeline from a local folder, a hub id, or ``"memlab"``.

    ``local_files_only`` defaults to True for folders and to the HF_HUB_OFFLINE setting for hub
    ids. The safety checker is not loaded: diffmem audits the denoiser, not its output filter.
    ``lora``: a LoRA (a .safetensors file, or the folder ``save_lora_weights`` wrote) fused into the
    UNet and text encoder at ``lora_scale`` (``fuse_lora``), as the pipeline runs it: a LoRA trained on
    a few hundred images is where fine-tuning memorizes most. Several LoRAs (a list) are fused one after
    the other, in the order given, each at its own scale (a list of one per LoRA) or all at one
    (see ``lora_entries``), as diffusers fuses several adapters. ``textual_inversion``: embeddings added to
    the tokenizer and text encoder (``load_textual_inversion``), each a .safetensors file or
    ``TOKEN=FILE`` (see ``textual_inversion_file``).
    """
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype)
    loras = [(lora_file(path, scale), scale) for path, scale in lora_entries(lora, lora_scale)]  # before the model: a bad file fails at once
    inversions = [textual_inversion_file(entry) for entry in _entries(textual_inversion)]
    name = resolve_model(model)
    path = Path(name).expanduser()
    is_local = path.exists() or looks_like_path(name)
    shown, snapshot = str(path), None
    if is_local:
        src, local = str(path), True
    else:
        src = name
        local = local_files_only if local_files_only is not None else os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        # offline, a cached hub id is a folder: checked as one, its weight variants found as in one
        if local and (snapshot := hub_snapshot(name)) is not None:
            path, src, is_local, shown = snapshot, str(snapshot), True, f"{name!r} (cached at {snapshot})"
    variants = check_pipeline_folder(path, allow_pickle) if is_local else {}
    if variant := next(iter(variants.values()), None):
        import warnings

        warnings.warn(f"{', '.join(variants)} of {shown} {'has' if len(variants) == 1 else 'have'} only "
                      f"{variant}-variant weights (*.{variant}.safetensors): loading those", stacklevel=2)
    from diffusers import StableDiffusionPipeline  # after the folder checks: a missing folder fails in no time

    try:
        parts = {}
        if allow_pickle and is_local:
            # diffusers switches every remaining component to pickle once one falls back to it,
            # and its component order varies: load each weighted component in its own format
            parts = _load_components_one_by_one(path, dtype, variants)
        with loading_bars(progress):
            pipe = StableDiffusionPipeline.from_pretrained(
                src,
                dtype=dtype,
                local_files_only=local,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **({} if allow_pickle else {"use_safetensors": True}),
                **({"variant": variant} if variant else {}),
                **parts,
            )
    except (OSError, ValueError, EnvironmentError) as e:
        if is_local:
            raise ModelLoadError(f"could not load the pipeline at {src}: {e}") from None
        raise ModelLoadError(
            f"could not load {src!r}: it is not a local folder, and as a hub id it could not be fetched "
            f"({'offline mode' if local else 'no network or no such repository'}): {first_line(e) or type(e).__name__}"
        ) from None
    if snapshot is not None:
        pipe.register_to_config(_name_or_path=name)  # identified by its hub id, as before, not by the snapshot's commit
    from .denoise import check_text_to_image

    check_text_to_image(pipe, ModelLoadError)
    for file, scale in loras:
        fuse_lora(pipe, file, scale)
    for file, token in inversions:
        add_textual_inversion(pipe, file, token)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(dev)


LORA_DOWN = re.compile(r"(lora_A|lora\.down|lora_down|lora_linear_layer\.down)\.")  # one per adapted layer, in
# diffusers', PEFT's and kohya's spellings


def _not_unpickled(file: Path, several: bool = False) -> str:
    """What a refusal of a pickled adapter says after naming it: why it is not loaded, and the command
    that converts ``file`` (one of ``several``) if the user trusts it."""
    return (f"which diffmem does not load: unpickling can run arbitrary code. If you trust {'their' if several else 'its'} "
            f"source, convert {'one' if several else 'it'}: diffmem convert {file}")


def _adapter_keys(file: Path, what: str) -> list[str]:
    """The tensor names of an adapter file (a LoRA or an embedding, described by ``what``), read from
    its safetensors header; a pickle is refused unread."""
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{what} {file} is a pickle ({file.suffix}), {_not_unpickled(file)} (torch's weights-only "
                             "unpickler, which refuses anything but tensors)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{what} {file} is not a readable safetensors file: {e}") from None


def lora_file(path: str | os.PathLike, scale: float = 1.0) -> Path:
    """The safetensors file of a LoRA given as a file or as the folder ``save_lora_weights`` writes
    (``pytorch_lora_weights.safetensors``), checked before any model loads: it exists, it is
    safetensors (a .bin / .pt LoRA is a pickle, never loaded) and it holds LoRA weights."""
    import math

    if not math.isfinite(scale):
        raise ModelLoadError(f"the LoRA scale must be a finite number, got {scale}")
    file = Path(path).expanduser()
    if not file.exists():
        raise ModelLoadError(f"LoRA not found: {file}")
    if file.is_dir():
        found = sorted(file.glob("*.safetensors"))
        if not found:
            pickles = sorted(p.name for p in file.iterdir() if p.suffix in PICKLE_SUFFIXES)
            raise ModelLoadError(f"LoRA folder {file} holds no .safetensors file"
                                 + (" (it holds a model_index.json: it is a pipeline folder, to pass as the model)"
                                    if (file / "model_index.json").exists() else "")
                                 + (f", only pickle weights ({', '.join(pickles)}), {_not_unpickled(file / pickles[0], several=True)}"
                                    if pickles else ""))
        default = file / "pytorch_lora_weights.safetensors"
        if len(found) > 1 and default not in found:
            raise ModelLoadError(f"LoRA folder {file} holds several .safetensors files ({', '.join(p.name for p in found)}) "
                                 "and none is pytorch_lora_weights.safetensors: pass the file meant")
        file = default if default in found else found[0]
    keys = _adapter_keys(file, "LoRA")
    if not any(LORA_DOWN.search(k) for k in keys):
        raise ModelLoadError(f"{file} holds no LoRA weights (no lora_A / lora.down / lora_down tensor among its "
                             f"{len(keys)}{', e.g. ' + keys[0] if keys else ''}): is it a whole model's weights?")
    return file


def check_adapters(lora: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                   lora_scale: float | Sequence[float] = 1.0, textual_inversion: Sequence[str | os.PathLike] = ()) -> None:
    """Check the LoRA and textual-inversion files that ``load_pipeline`` is to add, before any model loads."""
    for path, scale in lora_entries(lora, lora_scale):
        lora_file(path, scale)
    for entry in _entries(textual_inversion):
        textual_inversion_file(entry)


def lora_entries(lora, lora_scale=1.0) -> list[tuple[str | os.PathLike, float]]:
    """(path, scale) of each LoRA ``load_pipeline`` is given: ``lora`` one path or a list of them,
    ``lora_scale`` one scale for all or a list of one per LoRA. Files are not checked here."""
    if lora is None:
        return []
    paths = [lora] if isinstance(lora, (str, os.PathLike)) else list(lora)
    scales = [lora_scale] * len(paths) if isinstance(lora_scale, numbers.Real) else list(lora_scale)
    if len(scales) != len(paths):
        raise ModelLoadError(f"{len(scales)} LoRA scale{'s' if len(scales) != 1 else ''} for {len(paths)} LoRA"
                             f"{'s' if len(paths) != 1 else ''}: give one scale for them all, or one per LoRA")
    return [(path, float(scale)) for path, scale in zip(paths, scales)]


def lora_settings(lora, lora_scale=1.0) -> tuple:
    """``lora`` and ``lora_scale`` in the one form settings save them in: None and 1.0 without a LoRA;
    otherwise as ``saved_form`` gives the paths and the scales."""
    entries = lora_entries(lora, lora_scale)
    if not entries:
        return None, 1.0
    return saved_form([str(path) for path, _ in entries]), saved_form([scale for _, scale in entries])


def saved_form(per_lora: list):
    """What saved settings and keys hold for the LoRAs' ``per_lora`` values: the one value alone for
    one LoRA, the form they had before there could be several, so the keys of saved runs stay as
    they were; the list for several."""
    return per_lora[0] if len(per_lora) == 1 else per_lora


def _entries(textual_inversion) -> list:
    """One embedding given alone, or several: a list either way."""
    return [textual_inversion] if isinstance(textual_inversion, (str, os.PathLike)) else list(textual_inversion)


def textual_inversion_file(entry: str | os.PathLike) -> tuple[Path, str]:
    """The safetensors file and token of a textual-inversion embedding given as ``FILE`` or
    ``TOKEN=FILE``, checked before any model loads. The file holds one tensor, of one vector or several:
    diffusers' ``learned_embeds.safetensors`` names it by its token; A1111's safetensors name it
    ``emb_params`` and are called by their file name, which is then the token. A folder is taken for
    the ``learned_embeds.safetensors`` it holds; a .pt / .bin embedding is a pickle and refused."""
    text = str(entry)
    file, token = Path(text).expanduser(), None
    if not file.exists() and "=" in text:
        token, text = text.split("=", 1)
        file = Path(text).expanduser()
        if not token.strip():
            raise ModelLoadError(f"the token before '=' in {str(entry)!r} is empty: give TOKEN=FILE or FILE")
    if not file.exists():
        raise ModelLoadError(f"textual-inversion embedding not found: {file}")
    if file.is_dir():
        if not (file / "learned_embeds.safetensors").is_file():
            pickled = file / "learned_embeds.bin"  # what diffusers' training script saved before safetensors
            raise ModelLoadError(f"textual-inversion folder {file} holds no learned_embeds.safetensors"
                                 + (f", only learned_embeds.bin, a pickle, {_not_unpickled(pickled)}"
                                    if pickled.is_file() else ": pass the embedding's file"))
        file = file / "learned_embeds.safetensors"
    keys = _adapter_keys(file, "textual-inversion embedding")
    if len(keys) != 1:
        raise ModelLoadError(f"{file} holds {len(keys)} tensors, where a textual-inversion embedding holds one (its "
                             "vectors, named by its token or emb_params): is it another kind of weights?")
    return file, token or (file.stem if keys[0] == "emb_params" else keys[0])


def add_textual_inversion(pipe, file: Path, token: str) -> None:
    """Add the embedding in ``file`` (from ``textual_inversion_file``) as ``token``, as
    ``load_textual_inversion`` does; an embedding of another text encoder's width, or a token the
    tokenizer already has, is refused by name."""
    from safetensors.torch import load_file

    (vectors,) = load_file(str(file)).values()
    width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    if vectors.numel() == 0 or not torch.isfinite(vectors).all():
        raise ModelLoadError(f"the textual-inversion embedding {file} is broken: its vectors are "
                             + ("empty" if vectors.numel() == 0 else "not all finite (NaN or inf)"))
    if vectors.dim() not in (1, 2) or vectors.shape[-1] != width:
        raise ModelLoadError(f"the textual-inversion embedding {file} has vectors of shape {tuple(vectors.shape)}, where "
                             f"this model's text encoder takes vectors of width {width}: is it an embedding of another "
                             "model (SD 2.x's are 1024 wide, SD 1.x's 768)?")
    if token in pipe.tokenizer.get_vocab():
        raise ModelLoadError(f"the token {token!r} of the embedding {file} is already in the model's tokenizer: give it "
                             f"another with NEW_TOKEN={file}")
    pipe.load_textual_inversion(vectors.to(pipe.text_encoder.dtype), token=token)
    n = 1 if vectors.dim() == 1 else vectors.shape[0]
    pipe.diffmem_textual_inversion = [*getattr(pipe, "diffmem_textual_inversion", []),
                                      {"token": token, "path": str(file.resolve()), "vectors": n}]


def fuse_lora(pipe, file: Path, scale: float = 1.0) -> None:
    """Fuse the LoRA in ``file`` (from ``lora_file``) into the pipeline's UNet and text encoder, as
    ``load_lora_weights`` and ``fuse_lora`` do, then drop the adapters: every method then sees plain
    weights, and the model's fingerprint is the fused model's. Layers of the LoRA that name no module of
    this model (a LoRA of another architecture) are an error, where diffusers would skip them with a warning."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = sum(1 for k in _adapter_keys(file, "LoRA") if LORA_DOWN.search(k))
    name = "diffmem_lora"
    from diffusers.utils import logging as dlog

    was = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)  # its errors (every mismatched tensor) and warnings: said below, once
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name, use_safetensors=True)
    except (ValueError, RuntimeError, KeyError) as e:
        pipe.unload_lora_weights()
        lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
        mismatched = [line for line in lines if line.startswith("size mismatch")]
        detail = (f"{len(mismatched)} of its tensors have other shapes than this model's layers; the first: {mismatched[0].rstrip('.')}"
                  if mismatched else lines[0])
        raise ModelLoadError(f"the LoRA {file} does not fit this model ({detail}): is it a LoRA of another "
                             "architecture (SDXL, SD 2.x for SD 1.x)?") from None
    finally:
        dlog.set_verbosity(was)
    adapted = sum(1 for part in (pipe.unet, pipe.text_encoder) for m in part.modules()
                  if isinstance(m, BaseTunerLayer) and name in m.lora_A)
    if adapted < layers:
        pipe.unload_lora_weights()
        raise ModelLoadError(f"{layers - adapted} of the {layers} layers of the LoRA {file} name no module of this model: "
                             "is it a LoRA of another architecture (SDXL, SD 2.x for SD 1.x)?")
    try:  # safe fusing: a LoRA with NaN or inf weights is refused here, not found later as NaN scores
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[name], safe_fusing=True)
    except ValueError as e:
        pipe.unload_lora_weights()
        raise ModelLoadError(f"the LoRA {file} gives NaN weights when fused: its weights are broken ({e})") from None
    pipe.unload_lora_weights()
    pipe.diffmem_lora = [*getattr(pipe, "diffmem_lora", []), {"path": str(file.resolve()), "scale": float(scale)}]


@contextlib.contextmanager
def loading_bars(show: bool):
    """diffusers' "Loading pipeline components" bar, shown only with ``progress=True`` and put back as
    it was afterwards."""
    from diffusers.utils import logging as dlog

    was = dlog.is_progress_bar_enabled()
    (dlog.enable_progress_bar if show else dlog.disable_progress_bar)()
    try:
        yield
    finally:
        (dlog.enable_progress_bar if was else dlog.disable_progress_bar)()


def _load_components_one_by_one(folder: Path, dtype, variants: dict[str, str]) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    parts = {}
    for name, cls in classes.items():
        safe = bool(weight_files(folder / name)[0])
        parts[name] = cls.from_pretrained(folder / name, dtype=dtype, use_safetensors=safe, variant=variants.get(name))
    return parts


def check_model_folder(path: str | os.PathLike, what: str) -> Path:
    """A local transformers model folder (one that holds config.json), or a clear error before loading."""
    from .errors import InputError

    path = Path(path)
    if not (path / "config.json").exists():
        raise InputError(f"{what} folder not found or incomplete: {path}")
    return path


@contextlib.contextmanager
def model_folder_errors(path: str | os.PathLike, what: str):
    """transformers' errors loading a local folder (no model.safetensors: a .bin is never unpickled; no
    tokenizer or processor) as one line saying what the folder should have been."""
    from .errors import InputError

    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path} is not {what}: {first_line(e) or type(e).__name__}") from None


def weights_hash(module) -> str:
    """A quick fingerprint of a module's weights: the first 4 kB of its first 8 tensors by name. It
    misses changes past them (see ``weights_digest``); kept for the keys saved with it."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items())[:8]:
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def weights_digest(module, per_tensor: int = 64) -> str:
    """A fingerprint of all of a module's weights: every tensor's name, shape and ``per_tensor`` values
    spread evenly over it. ``weights_hash`` reads only the first tensors by name (the UNet's conv_in,
    conv_norm_out and conv_out), which a LoRA fused into the attention, an attention-only fine-tune or a
    new text-encoder leave as they were; a few values of every tensor take about 20 ms on SD's UNet."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        count = min(per_tensor, flat.numel())
        picks = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)  # whole numbers: float32 rounds past the end
        h.update(f"{name} {tuple(tensor.shape)}".encode())
        h.update(flat[picks.to(flat.device)].float().cpu().numpy().tobytes())
    # LoRA adapters loaded and not fused (pipe.load_lora_weights): their weights are tensors above, but
    # the scale set_adapters gives them, and whether they are on, are not; a model without adapters
    # keeps the fingerprint it always had
    for name, layer in sorted(module.named_modules()):
        if isinstance(getattr(layer, "scaling", None), dict) and hasattr(layer, "merged_adapters"):
            state = {"scaling": {k: float(v) for k, v in layer.scaling.items()}, "active": list(layer.active_adapters),
                     "disabled": bool(layer.disable_adapters), "merged": list(layer.merged_adapters)}
            h.update(f"{name} {json.dumps(state, sort_keys=True)}".encode())
    return h.hexdigest()[:16]


SCORED_PARTS = ("unet", "text_encoder")  # the components a score depends on


def weights_fingerprints(pipe) -> dict[str, str]:
    """``weights_digest`` of each component a score depends on: {"unet_weights": ..., "text_encoder_weights": ...}."""
    return {f"{part}_weights": weights_digest(getattr(pipe, part)) for part in SCORED_PARTS}


def model_identity(pipe) -> dict:
    """What identifies a model for calibration files: its path, a fingerprint of its UNet's and text
    encoder's weights (a new text encoder, or a textual-inversion token, changes the scores as much as
    the UNet does) and the sampler it runs with (its class and a digest of its configuration): past the
    first step, and at it for Euler-type samplers, scores and generations depend on the sampler, which a
    caller may swap on a loaded pipeline (``pipe.scheduler = DPMSolverMultistepScheduler.from_config(...)``).
    ``unet_hash``, the older fingerprint of the UNet's first tensors, is what calibrations saved before
    the others are checked by."""
    from .results import digest

    sampler_config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    # only when added: identities saved before stay equal
    loras, inversions = getattr(pipe, "diffmem_lora", None), getattr(pipe, "diffmem_textual_inversion", None)
    return {"name_or_path": str(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", "")),
            # in the order they were fused
            **({"lora": saved_form([dict(x) for x in loras])} if loras else {}),
            **({"textual_inversion": [dict(x) for x in inversions]} if inversions else {}),
            "unet_hash": weights_hash(pipe.unet),
            **weights_fingerprints(pipe),
            "prediction_type": pipe.scheduler.config.prediction_type,
            "sampler": type(pipe.scheduler).__name__, "sampler_config": digest(sampler_config)}


def model_name(identity: dict) -> str:
    """How messages name the model of a ``model_identity``: its path, the LoRA fused into it and the
    textual-inversion tokens added to it."""
    return repr(identity.get("name_or_path")) + adapters_named(identity)


def adapters_named(identity: dict) -> str:
    """" with the LoRA ... at scale ... and the textual-inversion token ...", as ``model_name`` ends, or
    "" for a model without adapters."""
    name = ""
    if lora := identity.get("lora"):
        loras = [lora] if isinstance(lora, dict) else lora
        name += f" with the LoRA{'s' if len(loras) > 1 else ''} " + \
            " and ".join(f"{Path(x['path']).name} at scale {x['scale']:g}" for x in loras)
    if inversions := identity.get("textual_inversion"):
        name += f"{' and' if lora else ' with'} the textual-inversion token{'s' if len(inversions) > 1 else ''} " + \
            ", ".join(x["token"] for x in inversions)
    return name


def weights_identity(pipe) -> dict:
    """``model_identity``, the VAE's weights, which decode every generation (a swapped VAE leaves the
    scores as they were, not the images), and the dtype the weights run in: what resumed work must
    match (scores in bfloat16 are close to float32 ones, not equal)."""
    return {**model_identity(pipe), "vae_weights": weights_digest(pipe.vae), "dtype": str(pipe.dtype)}


OFFICIAL_SAMPLER = {"num_inference_steps": 50, "guidance_scale": 7.5}  # Wen et al.'s SD v1.4 settings


def sampler_defaults(pipe) -> dict:
    """The model's own default sampler settings: MemLab records them; others get SD's official ones."""
    folder = Path(str(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", "") or ""))
    recipe = folder / "memlab_recipe.json"
    if recipe.is_file():
        try:
            return dict(json.loads(recipe.read_text())["recipe"]["sampler"])
        except (KeyError, json.JSONDecodeError):
            pass
    return dict(OFFICIAL_SAMPLER)
