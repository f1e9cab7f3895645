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

    python benchmarks/scan_image_scale.py [--rows 20000] [--index exact|approximate] [--json FILE]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--copies", type=int, default=100, help="size of the planted group of near copies")
    ap.add_argument("--index", choices=["exact", "approximate"], default="exact")
    ap.add_argument("--recall-queries", type=int, default=1000,
                    help="approximate index: rows whose exact neighbours are compared with its (0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from diffmem.scan.image_duplicates import image_clusters, neighbour_recall

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (args.rows, 8, 8, 3), dtype=np.uint8)
    thumbs = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)  # 32 x 32, smooth at 4-pixel blocks
    del small
    noise = rng.integers(-3, 4, (args.copies - 1, *thumbs.shape[1:]))
    thumbs[1 : args.copies] = np.clip(thumbs[0].astype(np.int16) + noise, 0, 255)
    # random hashes: no pair within the Hamming bound, so every link comes from the neighbour search
    phash = rng.integers(0, 2**62, args.rows).astype(np.int64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = image_clusters(phash, thumbs, np.ones(args.rows, bool), index=args.index)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    planted = res.labels[: args.copies]
    figures = {"rows": args.rows, "index": args.index, "seconds": seconds, "peak_rss_mb": peak,
               "rss_before_mb": before,
               "planted_group_found": bool(planted[0] >= 0 and (planted == planted[0]).all()
                                           and (res.labels == planted[0]).sum() == args.copies),
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


if __name__ == "__main__":
    main()
