"""The dataset scan on MemLab, measured against its manifest (issue 6's MemLab bars).

1. a full scan of the MemLab training set (images, captions, triggers);
2. every planted verbatim group found as one image cluster holding exactly its copies;
3. trigger phrases: recall and precision against the planted ones;
4. trigger verification with the shipped model: replication in new captions, against random
   phrases of the same length in the same captions;
5. the per-sample memorization score on a sample of rows: AUC of verbatim rows and of template
   rows against all other rows, at a fixed timestep (the scan's default) and at random ones.

With ``--image-index approximate`` the thumbnails' neighbour search is faiss's inverted-file index,
as ``diffmem scan`` takes it past 100,000 images; the figures then also give the share of the exact
10 nearest neighbours it returns, on MemLab's images, which have the structure of real pictures.

    python benchmarks/scan_memlab.py [--out DIR] [--json FILE] [--contexts 8] [--seeds 2] [--image-index exact]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="keep the scan results and report here")
    ap.add_argument("--json", default=None)
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--score-rows", type=int, default=480, help="rows sampled for the memorization-score AUC")
    ap.add_argument("--image-index", choices=["exact", "approximate"], default="exact",
                    help="the thumbnails' neighbour search (diffmem scan --image-index)")
    args = ap.parse_args(argv)

    import torch
    from sklearn.metrics import roc_auc_score

    from diffmem.core.loading import load_pipeline
    from diffmem.memlab import dataset as ds
    from diffmem.memlab.verify import load_manifest
    from diffmem.scan import DatasetScanner
    from diffmem.scan.memorization import sample_noise_norms
    from diffmem.scan.report import write_report
    from diffmem.scan.sources import ScanRow
    from diffmem.scan.verify import VerifySettings, verify_triggers

    manifest = load_manifest("memlab")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="scan-memlab-"))
    t0 = time.perf_counter()
    result = DatasetScanner("memlab", out / "work", image_index=args.image_index).scan()
    scan_seconds = time.perf_counter() - t0
    result.save(out)
    write_report(result, out, result.thumbs)

    rows = result.rows
    verbatim_ok = 0
    for g in manifest["groups"]["verbatim"]:
        labels = rows["image_cluster"].iloc[g["first_row"]:g["first_row"] + g["copies"]]
        verbatim_ok += int(labels.nunique() == 1 and labels.iloc[0] >= 0
                           and (rows["image_cluster"] == labels.iloc[0]).sum() == g["copies"])
    truth = {g["trigger"] for g in manifest["groups"]["template"]}
    found = set(result.triggers["phrase"])

    pipe = load_pipeline("memlab")
    t1 = time.perf_counter()
    ver = verify_triggers(pipe, result, result.cluster_images(), result.images["mean"],
                          VerifySettings(contexts=args.contexts, seeds=tuple(range(args.seeds))))
    verify_seconds = time.perf_counter() - t1
    ver.save(out)
    ver.plot(out / "trigger_verification.png")

    # memorization score: a stratified sample of rows, scored directly (the scan's own function)
    d = ds.build()
    verbatim_ids = {g["image_id"] for g in manifest["groups"]["verbatim"]}
    kind = np.array(["verbatim" if r.image_id in verbatim_ids else "template" if r.scene.trigger is not None
                     else "other" for r in d.rows])
    rng = np.random.default_rng(0)
    k = args.score_rows // 4
    pick = np.r_[rng.choice(np.flatnonzero(kind == "verbatim"), k, replace=False),
                 rng.choice(np.flatnonzero(kind == "template"), k, replace=False),
                 rng.choice(np.flatnonzero(kind == "other"), 2 * k, replace=False)]
    sample = [ScanRow(int(i), d.rows[i].caption, image=d.image(d.rows[i].image_id)) for i in pick]
    lab = kind[pick]
    auc = {}
    for name, t in (("fixed_t500", 500), ("fixed_t100", 100), ("fixed_t800", 800)):
        s = sample_noise_norms(pipe, sample, timestep=t)
        auc[name] = {
            "verbatim_vs_other": roc_auc_score(lab[lab != "template"] == "verbatim", s[lab != "template"]),
            "template_vs_other": roc_auc_score(lab[lab != "verbatim"] == "template", s[lab != "verbatim"]),
        }
    # random timesteps per row, as the training-time filter draws them, among those with signal left:
    # MemLab's zero-terminal-SNR schedule has none at its last, where the scan refuses to score
    from diffmem.core.denoise import scores_nothing_at

    with_signal = [t for t in range(pipe.scheduler.config.num_train_timesteps) if not scores_nothing_at(pipe, t)]
    gen = torch.Generator().manual_seed(0)
    ts = [with_signal[k] for k in torch.randint(0, len(with_signal), (len(sample),), generator=gen).tolist()]
    s = np.concatenate([sample_noise_norms(pipe, [row], timestep=t) for row, t in zip(sample, ts)])
    auc["random_t"] = {
        "verbatim_vs_other": roc_auc_score(lab[lab != "template"] == "verbatim", s[lab != "template"]),
        "template_vs_other": roc_auc_score(lab[lab != "verbatim"] == "template", s[lab != "verbatim"]),
    }

    figures = {
        "rows": int(len(rows)),
        "image_index": args.image_index,
        "scan_seconds": round(scan_seconds, 1),
        "image_clusters": int(rows["image_cluster"].max() + 1),
        "verbatim_groups_found_exactly": f"{verbatim_ok}/{len(manifest['groups']['verbatim'])}",
        "trigger_recall": len(truth & found) / len(truth),
        "trigger_precision": len(truth & found) / max(len(found), 1),
        "trigger_verification": {**ver.summary, "seconds": round(verify_seconds, 1),
                                 "min_trigger_rate": float(ver.table["replication_rate"].min()),
                                 "max_baseline_rate": float(ver.table["baseline_rate"].max())},
        "memorization_score_auc": auc,
        "results": str(out),
    }
    if args.image_index == "approximate":
        from diffmem.scan.image_duplicates import neighbour_recall

        # the search runs on the distinct thumbnails, so its recall is measured on them
        with_image = [t for t in result.thumbs if t is not None]
        distinct = np.unique(np.stack(with_image).reshape(len(with_image), -1), axis=0)
        figures["neighbour_recall_at_10"] = neighbour_recall(distinct, 10, 1000)
        figures["distinct_thumbnails"] = int(len(distinct))
    print(json.dumps(figures, indent=1, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))


if __name__ == "__main__":
    main()
