"""Training-time mitigation (Wen et al.): retrain MemLab with the memorization filter, with the
shipped model's seed and budget, and compare the two models (filter_retrain.json; filter_retrain.png draws the
retraining's loss and the share of samples dropped in each epoch).

1. The threshold: per-sample text-conditional noise norms (epsilon units) of training rows at
   seeded random timesteps under the shipped model; T = the ``--quantile`` of the non-planted
   rows' norms (control and single captions; template rows carry a planted trigger) (Wen et al. used T = 2 for SD v1.4 fine-tuning; a from-scratch MemLab needs its
   own). ``--threshold`` overrides it.
2. ``diffmem memlab train`` with ``mem_filter_threshold = T`` (same recipe otherwise).
3. For both models: planted verbatim replication (8 seeds) and colour+shape agreement on novel
   prompts, as ``memlab verify`` measures them. Bars: replication <= 0.10, agreement within 3
   points of the shipped model's.

    python benchmarks/memlab_filter_retrain.py --out RUN [--quantile 0.9] [--threshold T] [--vae-from memlab|MODEL|MAIN/vae|none] [--threads N]
(about 45 minutes on 2 cores with the shipped model's VAE; resumable: re-run with the same --out)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def per_sample_norms(pipe, captions: list[str], latents: torch.Tensor, seed: int = 0, batch: int = 64) -> np.ndarray:
    from diffmem.core import denoise

    gen = torch.Generator().manual_seed(seed)
    sched = pipe.scheduler
    uncond = denoise.encode_text(pipe, [""], warn=False)
    out = []
    with torch.inference_mode():
        for i in range(0, len(captions), batch):
            x0 = latents[i : i + batch]
            t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen)
            noisy = sched.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
            emb = denoise.encode_text(pipe, captions[i : i + batch])
            diff = pipe.unet(noisy, t, emb).sample - pipe.unet(noisy, t, uncond.expand(len(x0), -1, -1)).sample
            if sched.config.prediction_type == "v_prediction":
                diff = diff * sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
            out.append(diff.flatten(1).norm(dim=1).numpy())
    return np.concatenate(out)


def replication_and_agreement(model) -> dict:
    from diffmem.memlab.verify import VerifySettings, verify

    r = verify(model, VerifySettings(control_prompts=20, single_prompts=4, novel_prompts=120), progress=False)
    return {"verbatim_replication": r["verbatim_replication"], "generalization_colour_shape": r["generalization_colour_shape"],
            "negative_replication_any": r["negative_replication_any"]}


def draw(model: Path, path: Path, threshold: float) -> Path:
    """The retrained model's loss by step and the share of samples the filter dropped in each epoch."""
    from diffmem.memlab import recipe
    from diffmem.train.plot import plot_training

    info = json.loads((Path(model) / recipe.RECIPE_RECORD).read_text())
    return plot_training(info["train_log"], info["mem_filter_epochs"], path,
                         title=f"MemLab retrained with the memorization filter (threshold {threshold:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quantile", type=float, default=0.9)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--vae-from", default="memlab",
                    help="the VAE stage to reuse (skips about 20 minutes): the shipped model's ('memlab', the default), "
                         "a finished MemLab model folder or a run's OUT/vae; 'none' trains it")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    from diffmem.core.loading import load_pipeline
    from diffmem.memlab import dataset as ds
    from diffmem.memlab import recipe

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rc = recipe.MemLabRecipe()
    if a.vae_from.lower() != "none":  # the VAE stage does not depend on the filter: reuse the shipped model's
        recipe.reuse_vae(a.vae_from, out, rc)
    shipped = load_pipeline("memlab")
    d = ds.build(rc.data)
    data = recipe.training_data(shipped, d, progress=False)
    norms = per_sample_norms(shipped, data.captions, data.latents[data.image_index])
    groups = np.array([r.group for r in d.rows])
    non_planted = np.isin(groups, ["control", "single"])
    thr = a.threshold if a.threshold is not None else float(np.quantile(norms[non_planted], a.quantile))
    summary = {"threshold": thr, "quantile": a.quantile,
               "norm_median_by_group": {g: float(np.median(norms[groups == g])) for g in np.unique(groups)},
               "share_of_rows_at_or_above": {g: float((norms[groups == g] >= thr).mean()) for g in np.unique(groups)}}
    print(json.dumps(summary, indent=1), flush=True)
    filtered = replace(rc, train=replace(rc.train, mem_filter_threshold=thr, threads=a.threads))
    model = recipe.run(filtered, out)
    epochs = json.loads((model / recipe.RECIPE_RECORD).read_text())["mem_filter_epochs"]
    summary["dropped"] = {"samples": sum(e["samples"] for e in epochs), "dropped": sum(e["dropped"] for e in epochs),
                          "per_epoch": [e["dropped"] for e in epochs]}
    summary["shipped"] = replication_and_agreement("memlab")
    summary["filtered"] = replication_and_agreement(str(model))
    summary["bars"] = {"filtered_replication_le_0.10": summary["filtered"]["verbatim_replication"] <= 0.10,
                       "agreement_within_3_points": abs(summary["filtered"]["generalization_colour_shape"]
                                                        - summary["shipped"]["generalization_colour_shape"]) <= 0.03}
    (out / "filter_retrain.json").write_text(json.dumps(summary, indent=1))
    draw(model, out / "filter_retrain.png", thr)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
