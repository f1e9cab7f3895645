"""Write the MemLab training set as an ``imagefolder`` (PNG files + metadata.jsonl)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import InputError
from ..core.results import foreign_folder
from . import dataset as ds

MANIFEST = "memlab_manifest.json"


def export_imagefolder(out: str | Path, seed: int = 0, control: bool = False, limit: int | None = None) -> int:
    """One PNG per row (duplicates are separate files, as in a scraped data set).

    OUT must be new, empty or an earlier MemLab build: building into a user's own image folder would
    overwrite its metadata.jsonl and images/00000.png onwards."""
    out = Path(out)
    if foreign_folder(out, MANIFEST):
        raise InputError(f"{out} is not empty and holds no {MANIFEST}, so it is not an earlier MemLab build: "
                         "building there would overwrite its files; choose a new or empty folder")
    d = ds.build(ds.MemLabConfig(seed=seed, duplicate_planted=not control))
    (out / "images").mkdir(parents=True, exist_ok=True)
    # the manifest first marks the folder as MemLab's, so a killed build can be built again in place;
    # metadata.jsonl lands last and whole, so a killed build is never read as a smaller data set
    ds.save_manifest(d.manifest, out / MANIFEST)
    rows = d.rows[:limit]
    names = [f"images/{i:05d}.png" for i in range(len(rows))]
    partial = out / "metadata.jsonl.partial"
    with open(partial, "w", encoding="utf-8") as meta:
        for name, r in zip(names, rows):
            Image.fromarray((d.image(r.image_id) * 255).round().astype(np.uint8)).save(out / name)
            meta.write(json.dumps({"file_name": name, "text": r.caption, "group": r.group, "image_id": r.image_id}) + "\n")
    os.replace(partial, out / "metadata.jsonl")
    # a larger earlier build (the main set after the control set) leaves images no row names
    wanted = set(names)
    for stale in (out / "images").glob("[0-9][0-9][0-9][0-9][0-9].png"):
        if f"images/{stale.name}" not in wanted:
            stale.unlink()
    return len(rows)
