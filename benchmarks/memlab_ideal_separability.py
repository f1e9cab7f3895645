"""Design check for the MemLab world, no model training needed: how well could an ideal denoiser's
first-step Wen score separate planted prompts from non-memorized ones?

With v-prediction and a zero-terminal-SNR schedule, at the first step x_T carries (almost) no
signal, an ideal denoiser predicts x0 = E[x0 | caption], and the epsilon-unit score is
sqrt(alpha_bar_t) * || E[x0 | c] - E[x0] || in latent space. For a planted caption E[x0 | c] is
its one image; for a caption the model generalizes on it is the mean over the caption's
undescribed variation. This script computes those means (in the shipped VAE's latent space) and
the AUC they would give.

    python benchmarks/memlab_ideal_separability.py [--samples 24] [--negatives 200] [--space pixel]

``--space pixel`` needs no VAE: use it to judge a new world before any model exists for it.
Positives are the planted verbatim prompts and the template test prompts, as in the detection
benchmark.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from diffmem.core.loading import load_pipeline
from diffmem.memlab import dataset as ds
from diffmem.memlab import world
from diffmem.train.trainer import encode_images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=24, help="background seeds per non-memorized caption")
    ap.add_argument("--negatives", type=int, default=200)
    ap.add_argument("--space", choices=("latent", "pixel"), default="latent",
                    help="latent: the shipped model's VAE; pixel: no model needed")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.space == "latent":
        pipe = load_pipeline("memlab")

        def embed(imgs):
            return encode_images(pipe, imgs).flatten(1)
    else:
        def embed(imgs):
            return torch.from_numpy(np.ascontiguousarray(imgs)).flatten(1)
    d = ds.build()
    ids, images = d.unique_images()
    lat = embed(images)
    pos_of = {int(i): k for k, i in enumerate(ids)}
    rows = torch.tensor([pos_of[r.image_id] for r in d.rows])
    global_mean = lat[rows].mean(0)  # the unconditional model's E[x0], duplicates weighted as trained
    m = d.manifest
    planted = [lat[pos_of[e["image_id"]]] for e in m["groups"]["verbatim"]]
    rng = np.random.default_rng(0)

    def caption_mean(s: world.Scene):
        imgs = np.stack([world.render(s.with_seed(int(x))) for x in rng.integers(0, 2**31 - 1, a.samples)])
        return embed(imgs).mean(0)

    for entry in m["groups"]["template"]:  # fixed layout, undescribed object jitter
        for t in entry["test_prompts"]:
            f = t["expected_features"]
            planted.append(caption_mean(world.Scene(f["colour"], f["shape"], f["position"], trigger=entry["template_id"])))
    negs = []
    scenes = [world.Scene(**e["scene"]) for e in m["groups"]["novel"]]
    ctrl = [r.scene for r in d.rows if r.group == "control"][:: m["config"]["control_images"]]
    pool = scenes + ctrl
    for k in rng.choice(len(pool), min(a.negatives, len(pool)), replace=False):
        negs.append(caption_mean(pool[int(k)]))
    ps = torch.stack(planted).sub(global_mean).norm(dim=1).numpy()
    ns = torch.stack(negs).sub(global_mean).norm(dim=1).numpy()
    y = np.r_[np.ones(len(ps)), np.zeros(len(ns))]
    fpr, tpr, _ = roc_curve(y, np.r_[ps, ns])
    tpr_at = float(tpr[fpr < 0.01].max())
    print(f"world v{world.WORLD_VERSION}, {a.space} space: ideal first-step AUC {roc_auc_score(y, np.r_[ps, ns]):.3f}, "
          f"TPR@1%FPR {tpr_at:.3f}; ||E[x0|c] - E[x0]||: planted median "
          f"{np.median(ps):.2f} (min {ps.min():.2f}), non-memorized median {np.median(ns):.2f} (max {ns.max():.2f})")


if __name__ == "__main__":
    main()
