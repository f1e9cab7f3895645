"""The built-in no-weights replication measure (pixel correlation) against MemLab's own measure.

On a real model diffmem measures replication with SSCD when given its weights, else with the
built-in pixel correlation of grey 64x64 thumbnails (``PixelReplication``). This script says how
far that fallback can be trusted: it generates from MemLab's prompt groups (verbatim and template
prompts, which replicate; their one-word neighbours, single-copy captions and novel prompts, which
should not), and compares the pixel verdict of each generation with MemLab's ground-truth measure
(the ratio to the nearest training image's VAE round-trip error).

Printed per group: the share of generations each measure calls a copy; overall: agreement,
precision and recall of the pixel verdict against MemLab's, and the ROC AUC of the pixel
similarity (sklearn).

    python benchmarks/replication_measures.py [--seeds 4] [--per-group 40] [--json FILE]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

GROUPS = ("verbatim", "template", "neighbour", "single", "novel")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4, help="generations per prompt")
    ap.add_argument("--per-group", type=int, default=40, help="prompts per group at most")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from sklearn.metrics import roc_auc_score

    from diffmem.core.generate import generate
    from diffmem.core.loading import load_pipeline
    from diffmem.memlab import dataset as ds
    from diffmem.memlab.verify import DEFAULT_SAMPLER, load_manifest
    from diffmem.mitigate.measures import MemLabReplication, PixelReplication

    t0 = time.perf_counter()
    manifest = load_manifest("memlab")
    pipe = load_pipeline("memlab")
    truth = MemLabReplication(pipe, manifest)
    dataset = ds.build(ds.MemLabConfig(**manifest["config"]))
    _, train_images = dataset.unique_images()
    pixel = PixelReplication(train_images)

    seeds = list(range(args.seeds))
    rows = []
    for group in GROUPS:
        prompts = ds.prompts(manifest, group)[: args.per_group]
        images = generate(pipe, prompts, seeds, progress=True, **DEFAULT_SAMPLER)
        flat = images.reshape(-1, *images.shape[2:])
        t, p = truth(flat), pixel(flat)
        rows.append({"group": group, "prompts": len(prompts), "generations": len(flat),
                     "memlab": np.asarray(t["replicated"], bool), "pixel": np.asarray(p["replicated"], bool),
                     "similarity": np.asarray(p["similarity"], float)})

    memlab = np.concatenate([r["memlab"] for r in rows])
    pix = np.concatenate([r["pixel"] for r in rows])
    sim = np.concatenate([r["similarity"] for r in rows])
    tp = int((pix & memlab).sum())
    figures = {
        "seeds": args.seeds, "per_group": args.per_group, "pixel_threshold": PixelReplication.threshold,
        "groups": [{"group": r["group"], "prompts": r["prompts"], "generations": r["generations"],
                    "memlab_rate": float(r["memlab"].mean()), "pixel_rate": float(r["pixel"].mean())} for r in rows],
        "agreement": float((pix == memlab).mean()),
        "precision": tp / max(int(pix.sum()), 1),
        "recall": tp / max(int(memlab.sum()), 1),
        "auc": float(roc_auc_score(memlab, sim)) if 0 < memlab.sum() < len(memlab) else None,
        "seconds": time.perf_counter() - t0,
    }
    print(f"{'group':<10} {'prompts':>7} {'gens':>5} {'MemLab':>7} {'pixel':>7}")
    for g in figures["groups"]:
        print(f"{g['group']:<10} {g['prompts']:>7} {g['generations']:>5} {g['memlab_rate']:>7.3f} {g['pixel_rate']:>7.3f}")
    print(f"pixel verdict against MemLab's: agreement {figures['agreement']:.3f}, precision {figures['precision']:.3f}, "
          f"recall {figures['recall']:.3f}; AUC of the pixel similarity {figures['auc']:.3f}; {figures['seconds']:.0f} s")
    if args.json:
        from diffmem.core.results import dump_json

        dump_json(figures, args.json)


if __name__ == "__main__":
    main()
