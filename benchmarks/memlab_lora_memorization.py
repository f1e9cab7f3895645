"""A LoRA fine-tune memorizes, and diffmem sees it through --lora: MemLab's model fine-tuned with a
LoRA on a small duplicated set, then audited fused with its base, as `diffmem detect --model memlab
--lora LORA` runs it.

1. The fine-tune set: ``--captions`` of MemLab's novel prompts (never in its training data), each
   with one image of its scene on a new background, copied ``--copies`` times: the few-images,
   many-epochs fine-tune where memorization is likeliest. As many other novel prompts are held out.
2. A LoRA of ``--rank`` on the UNet's attention (``diffmem train --lora-rank``), ``--steps`` steps;
   and again with the memorization filter (Wen et al.) at the ``--filter-quantile`` of the base
   model's per-sample noise norms on the fine-tune rows.
3. For the base model and each LoRA, fused: the first-5-steps noise norm (the audit's detector) of
   the fine-tuned captions against the held-out ones (AUC, sklearn), and that of the first-step norm
   and of seed consistency (the first step's x0 over 4 seeds), each also as the change from the base
   model's score of the same prompt (the base model as a reference), and, as an audit judges them,
   against MemLab's reference prompts (AUC, and the share flagged at a threshold calibrated at FPR 1%
   on those prompts); and the share of generations of
   the fine-tuned captions (``--seeds`` each) that copy their fine-tune image (pixel correlation of
   grey thumbnails >= 0.95, the measure for models without a manifest), the share of the held-out
   prompts' generations that copy any fine-tune image, and MemLab's attribute
   agreement with the held-out prompts' named features (the alignment of bench mitigate:
   what the fine-tune must not break).

    python benchmarks/memlab_lora_memorization.py [--json FILE] [--steps 1200] [--rank 8] [--threads N]
(about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def fine_tune_set(manifest: dict, n: int, seed: int):
    """``n`` novel prompts with one new image each, and ``n`` other novel prompts held out."""
    from diffmem.memlab import world

    novel = manifest["groups"]["novel"]
    if len(novel) < 2 * n:
        raise SystemExit(f"MemLab's manifest has {len(novel)} novel prompts; --captions must be at most {len(novel) // 2}")
    rng = np.random.default_rng(seed)
    tuned, held = novel[:n], novel[n:2 * n]
    images = np.stack([world.render(world.Scene(**{**e["scene"], "background_seed": int(rng.integers(2**31))}))
                       for e in tuned])
    return [e["prompt"] for e in tuned], images, [e["prompt"] for e in held]


def train_lora(captions, images, copies: int, args, threshold: float | None, folder: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    from diffmem.core.loading import load_pipeline
    from diffmem.train.trainer import TrainConfig, TrainData, Trainer, encode_images, lora_layers

    pipe = load_pipeline("memlab")
    index = np.repeat(np.arange(len(captions)), copies)
    data = TrainData(encode_images(pipe, images), index, [captions[i] for i in index])
    cfg = TrainConfig(steps=args.steps, batch_size=32, lr=args.lr, warmup_steps=args.steps // 10, train_text_encoder=False,
                      checkpoint_every=0, lora_rank=args.rank, mem_filter_threshold=threshold, seed=args.seed)
    trainer = Trainer(pipe, data, cfg, folder / "run")
    started = time.time()
    trainer.run(progress=True)
    StableDiffusionPipeline.save_lora_weights(folder / "lora", unet_lora_layers=lora_layers(pipe.unet), safe_serialization=True)
    dropped = trainer.filter_counts["dropped"]
    return {"lora": folder / "lora", "train_s": round(time.time() - started, 1), "final_loss": trainer.log[-1]["loss"],
            "dropped": dropped if threshold is not None else None,
            "dropped_share": dropped / (args.steps * 32) if threshold is not None else None}


def base_norms(captions, images, copies: int) -> np.ndarray:
    """Per-sample noise norms of the fine-tune rows under the base model, at seeded random timesteps (as the filter measures them)."""
    import importlib.util

    from diffmem.core.loading import load_pipeline
    from diffmem.train.trainer import encode_images

    spec = importlib.util.spec_from_file_location("retrain", Path(__file__).with_name("memlab_filter_retrain.py"))
    retrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(retrain)
    pipe = load_pipeline("memlab")
    index = np.repeat(np.arange(len(captions)), copies)
    latents = encode_images(pipe, images)[torch.from_numpy(index)]
    return retrain.per_sample_norms(pipe, [captions[i] for i in index], latents)


# the detectors compared: the audit's (first 5 steps), detect's default (first step) and the seed consistency of
# the first step's predicted x0 over 4 seeds (`diffmem detect --method seed-consistency`)
DETECTORS = ("norm_5_steps", "norm_first_step", "seed_consistency_x0")


def detector_scores(pipe, prompts, sampler: dict) -> dict[str, np.ndarray]:
    from diffmem.detect import NoiseNormDetector, SeedConsistencyDetector

    n, g = sampler["num_inference_steps"], sampler["guidance_scale"]
    return {"norm_5_steps": NoiseNormDetector(pipe, n, g, steps=range(5)).score(prompts).scores,
            "norm_first_step": NoiseNormDetector(pipe, n, g).score(prompts).scores,
            "seed_consistency_x0": SeedConsistencyDetector(pipe, "x0", 4, n, g).score(prompts).scores}


def against_reference(tuned_scores: np.ndarray, reference_scores: np.ndarray, fpr: float = 0.01) -> dict:
    """The audit's view: the fine-tuned captions judged against non-memorized reference prompts, at the
    threshold a calibration on those prompts sets (Calibration.fit)."""
    from sklearn.metrics import roc_auc_score

    from diffmem.detect import Calibration

    threshold = Calibration.fit(reference_scores, fpr=fpr).threshold
    labels = np.r_[np.ones(len(tuned_scores)), np.zeros(len(reference_scores))]
    return {"auc": float(roc_auc_score(labels, np.r_[tuned_scores, reference_scores])),
            "flagged_at_1pct_fpr": float(np.mean(tuned_scores > threshold))}


def measure(pipe, tuned, held, images, seeds: int, reference: list[str]) -> dict:
    from sklearn.metrics import roc_auc_score

    from diffmem.core.generate import generate
    from diffmem.core.loading import sampler_defaults
    from diffmem.mitigate.measures import MemLabAlignment, PixelReplication

    sampler = sampler_defaults(pipe)
    by_detector = detector_scores(pipe, tuned + held, sampler)
    on_reference = detector_scores(pipe, reference, sampler)
    scores = by_detector["norm_5_steps"]
    labels = np.r_[np.ones(len(tuned)), np.zeros(len(held))]
    made = generate(pipe, tuned, list(range(seeds)), **sampler)  # (P, S, H, W, 3)
    copied = PixelReplication(images)(made.reshape(-1, *made.shape[2:]))
    own = np.repeat(np.arange(len(tuned)), seeds)
    replicated = np.asarray(copied["replicated"]) & (np.asarray(copied["nearest"]) == own)
    novel = generate(pipe, held, list(range(seeds)), **sampler).reshape(-1, *made.shape[2:])
    agreement = MemLabAlignment()(novel, [p for p in held for _ in range(seeds)])
    return {"auc_tuned_vs_held": float(roc_auc_score(labels, scores)),
            "auc_by_detector": {name: float(roc_auc_score(labels, v)) for name, v in by_detector.items()},
            "against_reference": {name: against_reference(np.asarray(v[: len(tuned)]), np.asarray(on_reference[name]))
                                  for name, v in by_detector.items()},
            "scores": {name: np.asarray(v, float).round(6).tolist() for name, v in by_detector.items()},
            "score_median_tuned": float(np.median(scores[: len(tuned)])), "score_median_held": float(np.median(scores[len(tuned):])),
            "replication_tuned": float(replicated.mean()),
            # held-out prompts that bring back one of the fine-tune images anyway: memorization beyond its captions
            "replication_held_any": float(np.mean(PixelReplication(images)(novel)["replicated"])),
            "agreement_held": float(np.mean(agreement))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--captions", type=int, default=20)
    ap.add_argument("--copies", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--filter-quantile", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffmem.core.loading import load_pipeline
    from diffmem.memlab.verify import load_manifest

    started = time.time()
    from diffmem.report.audit import memlab_audit_prompts

    manifest = load_manifest("memlab")
    tuned, images, held = fine_tune_set(manifest, args.captions, args.seed)
    # the audit's reference prompts, less those fine-tuned on or held out
    reference = [p for p in memlab_audit_prompts(manifest).reference if p not in set(tuned + held)]
    threshold = float(np.quantile(base_norms(tuned, images, args.copies), args.filter_quantile))
    rows = {"base": measure(load_pipeline("memlab"), tuned, held, images, args.seeds, reference)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, t in (("lora", None), ("lora_filtered", threshold)):
            trained = train_lora(tuned, images, args.copies, args, t, Path(tmp) / name)
            fused = load_pipeline("memlab", lora=trained.pop("lora"))
            rows[name] = {**measure(fused, tuned, held, images, args.seeds, reference), **trained}
    out = {"settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                        "filter_threshold": threshold},
           "rows": rows, "seconds": round(time.time() - started, 1)}
    print(f"{len(tuned)} novel captions fine-tuned ({args.copies} copies of one image each), {len(held)} held out; "
          f"LoRA rank {args.rank}, {args.steps} steps; filter at {threshold:.4g} (quantile {args.filter_quantile} of the "
          "base model's norms on the fine-tune rows)")
    print(f"{'model':>14} {'AUC tuned/held':>15} {'median tuned':>13} {'median held':>12} {'replication':>12} "
          f"{'held copying':>13} {'agreement':>10} {'dropped':>8}")
    for name, r in rows.items():
        share = "" if r.get("dropped_share") is None else f"{r['dropped_share']:.1%}"
        print(f"{name:>14} {r['auc_tuned_vs_held']:>15.3f} {r['score_median_tuned']:>13.4f} {r['score_median_held']:>12.4f} "
              f"{r['replication_tuned']:>12.3f} {r['replication_held_any']:>13.3f} {r['agreement_held']:>10.3f} {share:>8}")
    labels = np.r_[np.ones(len(tuned)), np.zeros(len(held))]
    base = {name: np.asarray(v) for name, v in rows["base"]["scores"].items()}
    print("\nAUC, fine-tuned captions against held-out ones, by detector (and of the change from the base model's score):")
    print(f"{'model':>14} " + " ".join(f"{name:>22}" for name in DETECTORS))
    from sklearn.metrics import roc_auc_score

    for name, r in rows.items():
        if name != "base":  # the base model as the reference: the rise of each prompt's score
            r["auc_change_from_base"] = {d: float(roc_auc_score(labels, np.asarray(r["scores"][d]) - base[d])) for d in DETECTORS}
        change = r.get("auc_change_from_base", {})
        print(f"{name:>14} " + " ".join(f"{r['auc_by_detector'][d]:>13.3f}" + (f" ({change[d]:.3f})" if d in change else " " * 8)
                                        for d in DETECTORS))
    print(f"\nAs an audit judges them: the fine-tuned captions against {len(reference)} of MemLab's reference prompts, "
          "AUC and the share flagged at a threshold calibrated at FPR 1% on those prompts:")
    print(f"{'model':>14} " + " ".join(f"{name:>22}" for name in DETECTORS))
    for name, r in rows.items():
        print(f"{name:>14} " + " ".join(f"{r['against_reference'][d]['auc']:>13.3f} ({r['against_reference'][d]['flagged_at_1pct_fpr']:.2f})"
                                        for d in DETECTORS))
    print(f"{out['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
