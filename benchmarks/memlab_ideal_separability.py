"""Design check for the MemLab world, no model training needed: how well could an ideal denoiser's
first-step Wen score separate planted prompts from non-memorized ones?

With v-prediction and a zero-terminal-SNR schedule, at the first step x_T carries (almost) no
signal, an ideal denoiser predicts x0 = E[x0 | caption], and the epsilon-unit score is
sqrt(alpha_bar_t) * || E[x0 | c] - E[x0] || in latent space. For a planted caption E[x0 | c] is
its one image; for a caption the model generalizes on it is the mean over the caption's
undescribed variation. This script computes those means (in the shipped VAE's latent space) and
the AUC they would give.

    python benchmarks/memlab_ideal_separability.py [--samples 24] [--negatives 200]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from diffmem.core.loading import load_pipeline
from diffmem.memlab import dataset as ds
from diffmem.memlab import world
from diffmem.train.trainer import encode_images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=24, help="background seeds per non-memorized caption")
    ap.add_argument("--negatives", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline("memlab")
    d = ds.build()
    ids, images = d.unique_images()
    lat = encode_images(pipe, images).flatten(1)
    pos_of = {int(i): k for k, i in enumerate(ids)}
    rows = torch.tensor([pos_of[r.image_id] for r in d.rows])
    global_mean = lat[rows].mean(0)  # the unconditional model's E[x0], duplicates weighted as trained
    m = d.manifest
    planted = [lat[pos_of[e["image_id"]]] for e in m["groups"]["verbatim"]]
    rng = np.random.default_rng(0)
    negs = []
    scenes = [world.Scene(**e["scene"]) for e in m["groups"]["novel"]]
    ctrl = [r.scene for r in d.rows if r.group == "control"][:: m["config"]["control_images"]]
    pool = scenes + ctrl
    for k in rng.choice(len(pool), min(a.negatives, len(pool)), replace=False):
        s = pool[int(k)]
        imgs = np.stack([world.render(s.with_seed(int(x))) for x in rng.integers(0, 2**31 - 1, a.samples)])
        negs.append(encode_images(pipe, imgs).flatten(1).mean(0))
    ps = torch.stack(planted).sub(global_mean).norm(dim=1).numpy()
    ns = torch.stack(negs).sub(global_mean).norm(dim=1).numpy()
    y = np.r_[np.ones(len(ps)), np.zeros(len(ns))]
    print(f"ideal first-step AUC {roc_auc_score(y, np.r_[ps, ns]):.3f}; ||E[x0|c] - E[x0]||: planted median "
          f"{np.median(ps):.2f} (min {ps.min():.2f}), non-memorized median {np.median(ns):.2f} (max {ns.max():.2f})")


if __name__ == "__main__":
    main()
