"""Image-duplicate clustering at scale: wall time and peak memory of the scan's global image pass.

The scan's per-row pass (reading images, thumbnails, hashes) is linear and checkpointed; the global
pass, ``image_clusters``, compares every thumbnail with its nearest neighbours. This times that pass
alone on N synthetic 32 x 32 thumbnails (smooth random images; one planted group of near copies,
each the first image with pixel noise of at most 3 levels, so that only the neighbour search can
link them) and prints wall time, peak memory (max RSS of this process) and whether the planted
group came back as one cluster.

``--index exact`` (sklearn, brute force) grows as N squared; ``--index approximate`` (faiss IVF on
128 principal components) about as N to the power 1.5. For the approximate index it also measures,
on ``--recall-queries`` rows, the share of their exact 10 nearest neighbours it returns. Random
images are its worst case (they have no structure for 128 components to keep); the recall on
MemLab's images, which have the structure of real pictures, comes from ``scan_memlab.py``.

``--whole-scan DIR`` measures the scan's whole second pass instead: the same images, written once as
32 x 32 PNGs to ``DIR/images.parquet`` with a caption each and scanned there for image duplicates
(pass 1, the per-row features, in ``DIR/work``, done once and kept), then scanned again in this
process, which resumes with every shard done: reading the features back, clustering and building
the result. Its peak memory is the pass's, the whole scan's at scale (pass 1 holds one shard at a time).

    python benchmarks/scan_image_scale.py [--rows 20000] [--index exact|approximate] [--whole-scan DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from diffmem.bench.memory import peak_rss_mb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--copies", type=int, default=100, help="size of the planted group of near copies")
    ap.add_argument("--index", choices=["exact", "approximate"], default="exact")
    ap.add_argument("--recall-queries", type=int, default=1000,
                    help="approximate index: rows whose exact neighbours are compared with its (0: skip)")
    ap.add_argument("--whole-scan", default=None, metavar="DIR",
                    help="time the scan's whole second pass on the images written as a table in DIR")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)  # whole_scan's child process
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if args.whole_scan:
        return prepare_whole_scan(args) if args.prepare_only else whole_scan(args)
    from diffmem.scan.image_duplicates import image_clusters, neighbour_recall

    thumbs, phash = planted_thumbnails(args.rows, args.copies)
    before = peak_rss_mb()
    t0 = time.perf_counter()
    res = image_clusters(phash, thumbs, np.ones(args.rows, bool), index=args.index)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    figures = {"rows": args.rows, "index": args.index, "seconds": seconds, "peak_rss_mb": peak,
               "rss_before_mb": before, "planted_group_found": planted_group_found(res.labels, args.copies),
               "clusters": len(res.sizes)}
    print(f"{args.rows} thumbnails, {args.index} index: {seconds:.1f} s, peak RSS {peak:.0f} MB (inputs made: "
          f"{before:.0f} MB); planted group found: {figures['planted_group_found']}; {figures['clusters']} clusters")
    if args.index == "approximate" and args.recall_queries:
        figures["recall_at_10"] = neighbour_recall(thumbs.reshape(args.rows, -1), 10, args.recall_queries)
        print(f"  approximate index: {figures['recall_at_10']:.3f} of the exact 10 nearest neighbours of "
              f"{min(args.recall_queries, args.rows)} rows returned")
    if args.json:
        from diffmem.core.results import dump_json

        dump_json(figures, args.json)


def planted_thumbnails(rows: int, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnails, hashes): ``rows`` smooth random 32 x 32 images, the first ``copies`` near copies of
    the first, and random perceptual hashes for them, no pair within the Hamming bound, so that every
    link comes from the neighbour search (drawn after the images, as the shipped figures were)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (rows, 8, 8, 3), dtype=np.uint8)
    thumbs = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)  # 32 x 32, smooth at 4-pixel blocks
    del small
    noise = rng.integers(-3, 4, (copies - 1, *thumbs.shape[1:]))
    thumbs[1:copies] = np.clip(thumbs[0].astype(np.int16) + noise, 0, 255)
    return thumbs, rng.integers(0, 2**62, rows).astype(np.int64)


def planted_group_found(labels: np.ndarray, copies: int) -> bool:
    """Whether the first ``copies`` rows, the planted near copies, came back as one cluster of their own."""
    planted = labels[:copies]
    return bool(planted[0] >= 0 and (planted == planted[0]).all() and (labels == planted[0]).sum() == copies)


def prepare_whole_scan(args) -> None:
    """The images as a table of PNGs and a caption each, and the scan's first pass over it, once."""
    import io
    from pathlib import Path

    import pandas as pd
    from PIL import Image

    from diffmem.scan.scanner import DatasetScanner

    folder = Path(args.whole_scan)
    table = folder / "images.parquet"
    if not table.exists():
        folder.mkdir(parents=True, exist_ok=True)

        def png(a):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            return buf.getvalue()

        thumbs, _ = planted_thumbnails(args.rows, args.copies)
        pd.DataFrame({"text": [f"picture number {i}" for i in range(len(thumbs))],
                      "image": [png(a) for a in thumbs]}).to_parquet(table)
    t0 = time.perf_counter()
    DatasetScanner(str(table), folder / "work", checks=("image_duplicates",), progress=False).run_pass1()
    print(f"pass 1 (per-row features, kept in {folder / 'work'}): {time.perf_counter() - t0:.0f} s")


def whole_scan(args) -> None:
    import subprocess
    import sys
    from pathlib import Path

    # the table and pass 1 in a process of their own, so that this one's peak is pass 2's alone
    # (once done, the child finds nothing to do)
    subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--copies", str(args.copies),
                    "--whole-scan", args.whole_scan, "--prepare-only"], check=True)
    from diffmem.scan.scanner import DatasetScanner

    folder = Path(args.whole_scan)
    before = peak_rss_mb()
    t0 = time.perf_counter()
    result = DatasetScanner(str(folder / "images.parquet"), folder / "work", checks=("image_duplicates",),
                            image_index=args.index, progress=False).scan()
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    found = planted_group_found(result.rows["image_cluster"].to_numpy(), args.copies)
    figures = {"rows": args.rows, "index": args.index, "whole_scan_pass2_seconds": seconds, "peak_rss_mb": peak,
               "rss_before_mb": before, "planted_group_found": found}
    print(f"{args.rows} images, the scan's second pass ({args.index} index): {seconds:.1f} s, peak RSS {peak:.0f} MB "
          f"(before it: {before:.0f} MB); planted group found: {found}")
    if args.json:
        from diffmem.core.results import dump_json

        dump_json(figures, args.json)


if __name__ == "__main__":
    main()
