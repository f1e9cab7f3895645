"""Peak memory of ``diffmem train``'s data preparation: reading an image folder and encoding it to latents.

``diffmem train`` reads its images a chunk at a time, encodes each chunk with the VAE as it comes
and saves its latents (``encode_source``), so the data set is held as latents only. Before, it
decoded every image to float32 pixels first (``load_pairs``) and then encoded the whole array. This
script writes a folder of N synthetic PNGs at S x S pixels and runs each way in a fresh process,
printing wall time and the growth of peak RSS over the process's RSS once the model is loaded;
then the chunked way once more, as a resumed run does, from the parts it saved.

The VAE is MemLab's (fully convolutional, so it encodes any size); a real SD VAE is slower but
holds the same latents per image (4 x S/8 x S/8 floats, against 3 x S x S for the pixels).

    python benchmarks/train_data_memory.py [--images 2000] [--size 256] [--json out.json]
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

from diffmem.bench.memory import peak_rss_mb


MODES = ("all-at-once", "chunked", "resumed")


def write_folder(folder: Path, n: int, size: int, seed: int = 0) -> None:
    from PIL import Image
    from scipy.ndimage import zoom

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        img = np.clip(zoom(rng.random((8, 8, 3)), (size / 8, size / 8, 1), order=1), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i:06d}.png")
        rows.append(json.dumps({"file_name": f"{i:06d}.png", "text": f"synthetic picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def run_one(folder: Path, size: int, mode: str, parts: Path) -> dict:
    """In this process: load the MemLab VAE, then prepare the data ``mode``'s way."""
    import torch

    from diffmem.core.loading import load_pipeline
    from diffmem.train.data import load_pairs
    from diffmem.train.latents import encode_source
    from diffmem.train.trainer import encode_images

    torch.set_num_threads(2)
    pipe = load_pipeline("memlab")
    encode_images(pipe, np.zeros((1, size, size, 3), np.float32))  # warm the VAE's buffers before the baseline
    base = peak_rss_mb()  # the child's own: ru_maxrss would start at the peak of the parent that wrote the images
    start = time.perf_counter()
    if mode == "all-at-once":
        images, captions, _ = load_pairs(str(folder), size)
        latents = encode_images(pipe, images)
        del images
    else:  # "chunked" encodes and saves the parts; "resumed" finds them saved
        latents, captions, _ = encode_source(pipe, str(folder), size, folder=parts)
    return {"mode": mode, "seconds": round(time.perf_counter() - start, 1), "peak_growth_mb": round(peak_rss_mb() - base, 1),
            "rows": len(captions), "latents_mb": round(latents.numel() * 4 / 2**20, 1),
            "pixels_mb": round(len(captions) * size * size * 3 * 4 / 2**20, 1),
            "latents_sha": __import__("hashlib").sha256(latents.numpy().tobytes()).hexdigest()[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--folder", type=Path, help="keep the synthetic folder here (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one child run
    ap.add_argument("--parts", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_one(args.folder, args.size, args.mode, args.parts)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "images"
        if not (folder / "metadata.jsonl").exists():
            print(f"writing {args.images} PNGs of {args.size}x{args.size} to {folder} ...", flush=True)
            write_folder(folder, args.images, args.size)
        results = []
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--folder", str(folder), "--size", str(args.size),
                                  "--parts", str(Path(tmp) / "latents")], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{mode:>12}: {r['rows']} images in {r['seconds']} s, peak RSS +{r['peak_growth_mb']} MB "
                  f"(pixels {r['pixels_mb']} MB, latents {r['latents_mb']} MB)", flush=True)
        print("same latents every way:", len({r["latents_sha"] for r in results}) == 1)
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "size": args.size, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
