"""Write the MemLab training set as an ``imagefolder`` (PNG files + metadata.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from . import dataset as ds


def export_imagefolder(out: str | Path, seed: int = 0, control: bool = False, limit: int | None = None) -> int:
    """One PNG per row (duplicates are separate files, as in a scraped data set)."""
    d = ds.build(ds.MemLabConfig(seed=seed, duplicate_planted=not control))
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = d.rows[:limit]
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i, r in enumerate(rows):
            name = f"images/{i:05d}.png"
            Image.fromarray((d.image(r.image_id) * 255).round().astype(np.uint8)).save(out / name)
            meta.write(json.dumps({"file_name": name, "text": r.caption, "group": r.group, "image_id": r.image_id}) + "\n")
    ds.save_manifest(d.manifest, out / "memlab_manifest.json")
    return len(rows)
