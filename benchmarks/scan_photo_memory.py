"""Peak memory of a scan of full-size photos: the scan's first pass on a folder of large JPEGs.

A curator's own fine-tuning set is often camera photos of 12 to 24 megapixels, which the scan
decodes to float32 pixels (12 bytes a pixel: 144 MB for 4000 x 3000). It keeps only a 32 x 32
thumbnail, a perceptual hash and, with the memorization check, the model-size input of each;
this script measures how much of the full-size pixels it holds at once. It writes N synthetic
JPEGs of W x H pixels with captions (an imagefolder with metadata.jsonl), scans them in a fresh
process with one shard for all (the default shard size, 1024 rows, is larger than N) and prints
wall time and the growth of peak RSS over the process's RSS before the scan.

    python benchmarks/scan_photo_memory.py [--images 24] [--width 4000] [--height 3000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_folder(folder: Path, n: int, width: int, height: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        small = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
        small.resize((width, height), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
        rows.append(json.dumps({"file_name": f"{i:05d}.jpg", "text": f"a photograph number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def _peak_mb() -> float:
    from diffmem.bench.memory import peak_rss_mb

    return peak_rss_mb()  # the child's own: ru_maxrss would start at the peak of the parent that wrote the photos


def run_one(folder: Path, work: Path) -> dict:
    """In this process: the scan's first pass, then its features read back."""
    from diffmem.scan import DatasetScanner

    scanner = DatasetScanner(str(folder), work, checks=("image_duplicates", "caption_duplicates"), progress=False)
    before = _peak_mb()
    t0 = time.perf_counter()
    scanner.run_pass1()
    seconds = time.perf_counter() - t0
    features, _ = scanner.load_features()
    return {"seconds": seconds, "peak_growth_mb": _peak_mb() - before, "rows": len(features),
            "with_image": int(features["has_image"].sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="diffmem-photo-scan-") as tmp:
        folder = Path(tmp) / "photos"
        write_folder(folder, args.images, args.width, args.height)
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(Path(tmp) / "work")],
                             capture_output=True, text=True, check=True)
        figures = {"images": args.images, "width": args.width, "height": args.height,
                   "float32_pixels_mb": args.images * args.width * args.height * 12 / 2**20,
                   **json.loads(out.stdout.strip().splitlines()[-1])}
    print(f"{figures['images']} photos of {args.width} x {args.height} ({figures['float32_pixels_mb']:.0f} MB as float32 "
          f"pixels): first pass {figures['seconds']:.1f} s, peak RSS grew {figures['peak_growth_mb']:.0f} MB; "
          f"{figures['with_image']} of {figures['rows']} rows with an image")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
