"""Image-duplicate clustering at scale: wall time and peak memory of the scan's global image pass.

The scan's per-row pass (reading images, thumbnails, hashes) is linear and checkpointed; the global
pass, ``image_clusters``, compares every thumbnail with its nearest neighbours. This times that pass
alone on N synthetic 32 x 32 thumbnails (smooth random images, one planted group of 100 exact
copies) and prints wall time, peak memory (max RSS of this process) and whether the planted group
came back as one cluster. The neighbour search is exact (brute force), so time grows as N squared.

    python benchmarks/scan_image_scale.py [--rows 20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--copies", type=int, default=100, help="size of the planted group of exact copies")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from diffmem.scan.image_duplicates import image_clusters

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (args.rows, 8, 8, 3), dtype=np.uint8)
    thumbs = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)  # 32 x 32, smooth at 4-pixel blocks
    thumbs[1 : args.copies] = thumbs[0]
    # random hashes: no pair within the Hamming bound, so every link comes from the neighbour search
    phash = rng.integers(0, 2**62, args.rows).astype(np.int64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = image_clusters(phash, thumbs, np.ones(args.rows, bool))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    planted = res.labels[: args.copies]
    figures = {"rows": args.rows, "seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before,
               "planted_group_found": bool(planted[0] >= 0 and (planted == planted[0]).all()
                                           and (res.labels == planted[0]).sum() == args.copies),
               "clusters": len(res.sizes)}
    print(f"{args.rows} thumbnails: {seconds:.1f} s, peak RSS {peak:.0f} MB (inputs made: {before:.0f} MB); "
          f"planted group found: {figures['planted_group_found']}; {figures['clusters']} clusters")
    if args.json:
        from diffmem.core.results import dump_json

        dump_json(figures, args.json)


if __name__ == "__main__":
    main()
