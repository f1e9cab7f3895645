"""Copy a trained MemLab pipeline folder (``diffmem memlab train --out RUN`` -> RUN/model) into
the package as ``diffmem/memlab/model``, the model diffmem ships.

    python tools/install_memlab_model.py RUN/model

It rewrites the manifest with the current code (refusing if the rebuilt data set's fingerprint
differs from the one the model was trained on) and keeps the sampler's "leading" timestep
spacing, so the first sampling step has alpha_bar > 0 (see README, MemLab).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffmem.memlab import dataset as ds  # noqa: E402

DEST = ROOT / "src" / "diffmem" / "memlab" / "model"


def main(src: str) -> None:
    src_dir = Path(src)
    trained = json.loads((src_dir / "memlab_manifest.json").read_text())
    rebuilt = ds.build(ds.MemLabConfig(**trained["config"])).manifest
    if rebuilt["fingerprint"] != trained["fingerprint"]:
        raise SystemExit("the current MemLab code builds a different data set than this model was trained on")
    if DEST.exists():
        shutil.rmtree(DEST)
    shutil.copytree(src_dir, DEST, ignore=shutil.ignore_patterns("checkpoint*"))
    sched = DEST / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg["timestep_spacing"] = "leading"
    sched.write_text(json.dumps(cfg, indent=2))
    ds.save_manifest(rebuilt, DEST / "memlab_manifest.json")
    size = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file()) / 2**20
    print(f"installed {src_dir} -> {DEST} ({size:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1])
