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
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError, kind_and_first_line
from .loading import LORA_DOWN, PICKLE_SUFFIXES
from .results import atomic_path


@dataclass
class Conversion:
    """What ``convert_adapter`` or ``convert_pipeline`` wrote: the kind of weights it found, its
    tensors and, for an embedding, the token it is called by."""
    source: str
    out: str
    kind: str  # "lora", "textual_inversion" or "pipeline"
    tensors: int
    token: str | None = None
    vectors: int | None = None  # an embedding's vectors, and their width
    width: int | None = None
    left_out: list[str] = field(default_factory=list)  # entries of the pickle that are not tensors (A1111's step, name)
    from_pickles: list[str] = field(default_factory=list)  # a pipeline's components that held only pickles

    def describe(self) -> str:
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
    if "state_dict" in loaded or any(str(k).startswith("model.diffusion_model.") for k in loaded):
        raise ModelLoadError(f"{source} is a whole model's single-file checkpoint, not a LoRA or an embedding: convert it to a "
                             "pipeline folder with diffusers: StableDiffusionPipeline.from_single_file(FILE, config="
                             "DIR_OF_THE_SAME_ARCHITECTURE, local_files_only=True).save_pretrained(OUT)")
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
    from .loading import WEIGHTED, check_pipeline_folder, load_pipeline, weight_files
    from .results import folder_held, replace_folder

    source = Path(source).expanduser()
    check_pipeline_folder(source, allow_pickle=True)  # a folder that is no pipeline is said as the loader says it
    # the check leaves every weighted component some weights: those without safetensors hold pickles
    pickled = [name for name in WEIGHTED if not weight_files(source / name)[0]]
    if not pickled:
        raise ModelLoadError(f"every component of {source} has safetensors weights already: pass the folder as it is")
    out = Path(out).expanduser() if out is not None else source.resolve().with_name(source.resolve().name + "-safetensors")
    if out.resolve() == source.resolve():
        raise ModelLoadError(f"the output {out} is the pipeline folder itself: choose a new folder")
    if out.is_file():
        raise ModelLoadError(f"the output {out} is a file: choose a new folder")
    refusal = f"{out} exists; choose a new folder, or replace it with overwrite=True (--overwrite)"
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelLoadError(refusal)
    # held while it is written: a second conversion into OUT would clear this one's half-written OUT.tmp
    with folder_held(out, instead="choose another output folder"):
        if any(out.iterdir()) and not overwrite:  # written by another conversion since the check above
            raise ModelLoadError(refusal)
        try:
            pipe = load_pipeline(source, allow_pickle=True)
        except ModelLoadError:
            # the libraries say only that a file could not be loaded: the pickle the unpickler refused is named
            for name in pickled:
                for file in sorted(weight_files(source / name)[1]):
                    _load_weights_only(source / name / file)
            raise
        # the folder is swapped in whole: a kill while saving leaves no half pipeline to load
        replace_folder(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    tensors = sum(len(getattr(pipe, name).state_dict()) for name in WEIGHTED)
    return Conversion(str(source), str(out), "pipeline", tensors, from_pickles=pickled)


def convert(source: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Conversion:
    """``convert_pipeline`` for a folder, ``convert_adapter`` for a file (``diffmem convert``)."""
    if Path(source).expanduser().is_dir():
        return convert_pipeline(source, out, overwrite)
    return convert_adapter(source, out, overwrite)
