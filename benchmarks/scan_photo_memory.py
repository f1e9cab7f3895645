"""Peak memory of a scan of full-size photos: the scan's first pass on large JPEGs.

A curator's own fine-tuning set is often camera photos of 12 to 24 megapixels, which the scan
decodes to float32 pixels (12 bytes a pixel: 144 MB for 4000 x 3000). It keeps only a 32 x 32
thumbnail, a perceptual hash and, with the memorization check, the model-size input of each;
this script measures how much of the full-size pixels it holds at once. It writes N synthetic
JPEGs of W x H pixels with captions, scans them in a fresh process with one shard for all (the
default shard size, 1024 rows, is larger than N) and prints the wall time of opening the data and
the first pass, and how far peak RSS grew over the process's peak before it opened the data.

``--layout folder`` writes an imagefolder with metadata.jsonl; ``--layout parquet`` one Parquet
file of the encoded images (``datasets``' Image column) in row groups of ``--row-group`` rows, as
``datasets`` writes image datasets (100); ``--layout webdataset`` WebDataset .tar shards of
``--row-group`` samples each (key.jpg + key.txt), as img2dataset writes them. ``--grain S`` adds noise of standard deviation S (of 255)
so that the files are as large as a camera's: about 3 MB at 12 megapixels with 8; without it a
synthetic 12-megapixel JPEG is 0.6 MB.

    python benchmarks/scan_photo_memory.py [--images 24] [--width 4000] [--height 3000]
        [--layout folder|parquet|webdataset] [--row-group 100] [--grain 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffmem.bench.memory import peak_rss_mb


def _photos(n: int, width: int, height: int, grain: float, seed: int = 0):
    """(file name, JPEG bytes, caption) of each synthetic photo, one at a time."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
        photo = small.resize((width, height), Image.BILINEAR)
        if grain:
            noisy = np.asarray(photo, dtype=np.float32) + rng.normal(0, grain, (height, width, 3)).astype(np.float32)
            photo = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        encoded = io.BytesIO()
        photo.save(encoded, "JPEG", quality=90)
        yield f"{i:05d}.jpg", encoded.getvalue(), f"a photograph number {i}"


def write_folder(folder: Path, n: int, width: int, height: int, grain: float = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, data, caption in _photos(n, width, height, grain):
        (folder / name).write_bytes(data)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def write_parquet(path: Path, n: int, width: int, height: int, grain: float = 0, row_group: int = 100) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string())])
    photos = _photos(n, width, height, grain)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, row_group):  # one write a group, as datasets' writer does
            group = [next(photos) for _ in range(min(row_group, n - start))]
            writer.write_table(pa.table({"image": [{"bytes": data, "path": name} for name, data, _ in group],
                                         "text": [caption for _, _, caption in group]}, schema=schema))
    return path


def write_shards(folder: Path, n: int, width: int, height: int, grain: float = 0, per_shard: int = 100) -> Path:
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    photos = _photos(n, width, height, grain)
    for k, start in enumerate(range(0, n, per_shard)):
        with tarfile.open(folder / f"{k:05d}.tar", "w") as tar:
            for _ in range(min(per_shard, n - start)):
                name, data, caption = next(photos)
                for member, content in ((name, data), (name.replace(".jpg", ".txt"), caption.encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
    return folder


def run_one(data: Path, work: Path) -> dict:
    """In this process: the data opened and the scan's first pass, then its features read back."""
    from diffmem.scan import DatasetScanner

    for module in ("torch", "pandas", "pyarrow.parquet"):  # what opening the data imports, before the baseline
        importlib.import_module(module)

    # before the data is opened (a table was read whole there); the child's own peak: ru_maxrss would
    # start at the peak of the parent that wrote the photos
    before = peak_rss_mb()
    t0 = time.perf_counter()
    scanner = DatasetScanner(str(data), work, checks=("image_duplicates", "caption_duplicates"), progress=False)
    scanner.run_pass1()
    seconds = time.perf_counter() - t0
    features, _ = scanner.load_features()
    return {"seconds": seconds, "peak_growth_mb": peak_rss_mb() - before, "rows": len(features),
            "with_image": int(features["has_image"].sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--layout", choices=("folder", "parquet", "webdataset"), default="folder")
    ap.add_argument("--row-group", type=int, default=100,
                    help="rows to a Parquet row group (--layout parquet), samples to a shard (--layout webdataset)")
    ap.add_argument("--grain", type=float, default=0.0, help="noise (of 255) that makes the JPEGs as large as a camera's")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="diffmem-photo-scan-") as tmp:
        if args.layout == "folder":
            data = write_folder(Path(tmp) / "photos", args.images, args.width, args.height, args.grain)
            size = sum(p.stat().st_size for p in data.iterdir())
        elif args.layout == "webdataset":
            data = write_shards(Path(tmp) / "shards", args.images, args.width, args.height, args.grain, args.row_group)
            size = sum(p.stat().st_size for p in data.iterdir())
        else:
            data = write_parquet(Path(tmp) / "photos.parquet", args.images, args.width, args.height, args.grain,
                                 args.row_group)
            size = data.stat().st_size
        out = subprocess.run([sys.executable, __file__, "--child", str(data), str(Path(tmp) / "work")],
                             capture_output=True, text=True, check=True)
        figures = {"images": args.images, "width": args.width, "height": args.height, "layout": args.layout,
                   "row_group": args.row_group if args.layout != "folder" else None, "grain": args.grain,
                   "encoded_mb": size / 2**20, "float32_pixels_mb": args.images * args.width * args.height * 12 / 2**20,
                   **json.loads(out.stdout.strip().splitlines()[-1])}
    where = {"folder": "a folder", "parquet": f"a Parquet file in row groups of {args.row_group}",
             "webdataset": f"WebDataset shards of {args.row_group}"}[args.layout]
    print(f"{figures['images']} photos of {args.width} x {args.height} in {where} ({figures['encoded_mb']:.0f} MB encoded, "
          f"{figures['float32_pixels_mb']:.0f} MB as float32 pixels): first pass {figures['seconds']:.1f} s, peak RSS grew "
          f"{figures['peak_growth_mb']:.0f} MB; {figures['with_image']} of {figures['rows']} rows with an image")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
