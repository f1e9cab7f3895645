"""Training data encoded to latents once, in saved parts, for ``diffmem train``.

Encoding is slow on a CPU (an SD-sized VAE took 14 s per 512 x 512 image on 2 cores here: 10,000
images take a day and a half), so each chunk's latents are saved in ``DIR/latents`` as they are
made. A killed run picks up after the last saved part, and resuming a training run encodes
nothing again.

The saved parts are reused only for the same source, read the same way (resolution, columns named), by
the same VAE weights (a fingerprint of every tensor; keys saved before it held only decoder tensors
and are taken as they are, then keyed anew). A local source is identified by the names, sizes and
modification times of its files (for a ``.parquet`` / ``.jsonl`` / ``.csv`` table, of the table
itself: images it names by path elsewhere are not looked at); a hub dataset and MemLab are always
encoded afresh (MemLab takes seconds).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.cache import files_fingerprint
from ..core.errors import InputError
from ..core.loading import weights_digest, weights_hash
from ..core.results import SWAP_SUFFIXES, atomic_path, dump_json, foreign_folder
from .data import iter_pairs
from .trainer import CHECKPOINT_DIR, encode_images

FORMAT = 1


# what a training run writes in its output folder (train.api, trainer): left out of the data's
# fingerprint should that folder lie inside the data
RUN_OUTPUTS = ("latents", "data_problems.json") + tuple(
    name + suffix for name in (CHECKPOINT_DIR, "model") for suffix in ("",) + SWAP_SUFFIXES)


def source_fingerprint(source: str, run_dir: str | Path | None = None) -> str | None:
    """A hash of a local source's file names, sizes and modification times; None for others.
    ``run_dir``'s own outputs (``RUN_OUTPUTS``) are left out."""
    return files_fingerprint(source, skip=[Path(run_dir) / name for name in RUN_OUTPUTS] if run_dir is not None else ())


def encode_source(pipe, source: str, size: int, caption_column: str | None = None, folder: str | Path | None = None,
                  chunk: int = 64, progress: bool = False, replace: bool = True,
                  image_column: str | None = None) -> tuple[torch.Tensor, list[str], list[dict]]:
    """(latents, captions, problems) of ``source``; with ``folder``, encoded parts are saved there
    and reused (see the module's note). Saved parts of another source or VAE are replaced, or with
    ``replace=False`` (a training checkpoint depends on them) refused."""
    fingerprint = source_fingerprint(source, run_dir=Path(folder).parent if folder is not None else None)
    folder = Path(folder) if folder is not None and fingerprint is not None else None
    key = {"format": FORMAT, "source": str(source), "files": fingerprint, "size": size, "caption_column": caption_column,
           "image_column": image_column, "chunk": chunk, "vae": weights_hash(pipe.vae), "vae_weights": weights_digest(pipe.vae)}
    parts, captions, problems, start = [], [], [], 0
    if folder is not None:
        saved = _read_key(folder)
        if saved is not None and "image_column" not in saved:
            # keyed before an image column could be named: read by the default, the same as naming none
            saved = {**saved, "image_column": None}
            if saved == key:
                dump_json(key, folder / "key.json")
        if saved is not None and "vae_weights" not in saved and saved == {k: v for k, v in key.items() if k != "vae_weights"}:
            # keyed before the whole VAE was (``vae`` reads only decoder tensors): a run in progress depends on
            # these latents, so they are taken as the same VAE's, and keyed anew from here on
            dump_json(key, folder / "key.json")
            saved = key
        if saved == key:
            for path in sorted(folder.glob("part-*.safetensors")):
                try:
                    tensors, meta = _read_part(path)
                except Exception:  # damaged outside diffmem (parts are written atomically): encode again from here
                    for later in sorted(folder.glob("part-*.safetensors")):
                        if later.name >= path.name:
                            later.unlink()
                    break
                parts.append(tensors["latents"])
                captions += meta["captions"]
                problems += meta["problems"]
                start = meta["next_row"]
        else:
            if saved is not None and not replace:
                what = [k for k in ("source", "files", "size", "caption_column", "image_column", "chunk", "vae", "format")
                        if saved.get(k) != key[k]
                        # an older key has no whole-VAE fingerprint: its VAE is judged by ``vae`` alone
                        or (k == "vae" and saved.get("vae_weights", key["vae_weights"]) != key["vae_weights"])]
                raise InputError(f"{folder} holds the latents of a training run on other data (differs in: "
                                 f"{', '.join(what)}), and its checkpoint depends on them; use another output folder, "
                                 "or delete it to start over")
            check_latents_folder(folder)
            if folder.exists():
                shutil.rmtree(folder)  # diffmem's own cache of other data: the source itself is untouched
    for images, chunk_captions, next_row in iter_pairs(source, size, caption_column, image_column, chunk=chunk,
                                                       problems=problems, progress=progress, start=start):
        latents = encode_images(pipe, images)
        new_problems = [p for p in problems if p["row"] >= start]
        if folder is not None:
            if not (folder / "key.json").exists():  # with the first part: a source refused at once leaves nothing
                folder.mkdir(parents=True, exist_ok=True)
                dump_json(key, folder / "key.json")
            meta = {"captions": chunk_captions, "problems": new_problems, "next_row": next_row}
            with atomic_path(folder / f"part-{len(parts):06d}.safetensors") as tmp:
                save_file({"latents": latents.contiguous()}, tmp, metadata={"diffmem": json.dumps(meta)})
        parts.append(latents)
        captions += chunk_captions
        start = next_row
    return torch.cat(parts), captions, problems  # iter_pairs has refused a source with no usable row


def check_latents_folder(folder: Path) -> None:
    """The latents folder is diffmem's cache, replaced when the data changes: refuse one that holds
    files but no key.json, which diffmem did not write."""
    if folder.is_file() or foreign_folder(folder, "key.json"):
        raise InputError(f"{folder} holds files diffmem train did not write, and it keeps its encoded latents "
                         "there; choose another --out")


def _read_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "key.json").read_text())
    except (OSError, ValueError):
        return None


def _read_part(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["diffmem"])
    return load_file(path), meta
