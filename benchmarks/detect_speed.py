"""Detection speed, in one run on one model, prompt set, batch and device.

(a) first-step detection throughput against the bare batched UNet forward rate for the same
    shapes (the limit: one conditional UNet pass per prompt);
(b) against the official way: a full pipeline call with 50 DDIM steps and the VAE decode per
    generation, norms recorded along the way through a UNet hook and the first step kept; both
    give the same first-step scores (checked), hence the same AUC;
(c) peak RSS while scoring 10,000 prompts streamed from a file, against 1,000 (each in a fresh
    process, results written incrementally).

    python benchmarks/detect_speed.py [--model memlab] [--prompts 512] [--batch 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def memlab_prompts(n: int) -> list[str]:
    from diffmem.memlab import dataset as ds

    d = ds.build()
    caps = list(dict.fromkeys(d.captions))
    caps += ds.prompts(d.manifest, "novel")
    rng = np.random.default_rng(0)
    return [caps[i] for i in rng.choice(len(caps), n, replace=len(caps) < n)]


def bare_unet_rate(pipe, batch: int, t, reps: int) -> float:
    from diffmem.core import denoise

    emb = denoise.encode_text(pipe, ["a red circle on the left"] * batch, warn=False)
    x = torch.randn(denoise.latent_shape(pipe, batch))
    with torch.inference_mode():
        pipe.unet(x, t, encoder_hidden_states=emb)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            pipe.unet(x, t, encoder_hidden_states=emb)
        dt = time.perf_counter() - t0
    return batch * reps / dt


def official_way(pipe, prompts: list[str], steps: int, guidance: float, seed: int) -> tuple[np.ndarray, float]:
    """Wen et al.'s script: every generation runs all steps and decodes; norms kept along the way."""
    from diffmem.core import denoise

    firsts = []

    def hook(module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        uncond, cond = sample.chunk(2)
        firsts.append((int(t), denoise.to_epsilon(pipe, cond - uncond, t).flatten(1).norm(dim=1)))

    h = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    scores = []
    t0 = time.perf_counter()
    try:
        for p in prompts:
            firsts.clear()
            pipe(p, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                 output_type="np")
            scores.append(float(firsts[0][1][0]))
    finally:
        h.remove()
    return np.array(scores), time.perf_counter() - t0


def rss_run(model: str, n: int, batch: int) -> None:
    """Child process: stream ``n`` prompts from a file through ``detect_file``; print peak RSS."""
    from diffmem.bench.memory import peak_rss_mb
    from diffmem.core.loading import load_pipeline, sampler_defaults
    from diffmem.detect import NoiseNormDetector
    from diffmem.detect.run import detect_file

    pipe = load_pipeline(model)
    d = sampler_defaults(pipe)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "prompts.txt"
        f.write_text("\n".join(memlab_prompts(n)) + "\n")
        det = NoiseNormDetector(pipe, d["num_inference_steps"], d["guidance_scale"], batch_size=batch)
        t0 = time.perf_counter()
        detect_file(det, f, Path(tmp) / "out.parquet", progress=False)
        dt = time.perf_counter() - t0
    # the child's own peak: ru_maxrss would start at the parent's, which has scored with the model in (a) and (b)
    print(json.dumps({"n": n, "peak_rss_mb": peak_rss_mb(), "seconds": dt}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="memlab")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--official-prompts", type=int, default=8, help="prompts for the (slow) official-way reference")
    ap.add_argument("--rss", default="1000,10000", help="prompt counts for the memory check ('' to skip)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--rss-run", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rss_run is not None:
        rss_run(a.model, a.rss_run, a.batch)
        return

    from diffmem.core import denoise
    from diffmem.core.loading import load_pipeline, sampler_defaults
    from diffmem.detect import NoiseNormDetector

    pipe = load_pipeline(a.model)
    d = sampler_defaults(pipe)
    prompts = memlab_prompts(a.prompts)
    out: dict = {"model": a.model, "device": "cpu", "threads": torch.get_num_threads(), "batch": a.batch,
                 "prompts": a.prompts, "sampler": d}

    # (a) detector vs the bare UNet forward rate, same batch and shapes
    det = NoiseNormDetector(pipe, d["num_inference_steps"], d["guidance_scale"], batch_size=a.batch)
    det.score(prompts[: a.batch])  # warm-up
    t0 = time.perf_counter()
    det.score(prompts)
    dt = time.perf_counter() - t0
    t_first = denoise.fresh_scheduler(pipe, d["num_inference_steps"]).timesteps[0]
    limit = bare_unet_rate(pipe, a.batch, t_first, reps=max(3, a.prompts // a.batch))
    out["a_detector_prompts_per_s"] = a.prompts / dt
    out["a_bare_unet_prompts_per_s"] = limit
    out["a_ratio"] = out["a_detector_prompts_per_s"] / limit

    # (b) the official way, 50 DDIM steps with decode, one generation, first step kept
    ref_prompts = prompts[: a.official_prompts]
    ref_scores, ref_dt = official_way(pipe, ref_prompts, 50, d["guidance_scale"], seed=0)
    det50 = NoiseNormDetector(pipe, 50, d["guidance_scale"], batch_size=a.batch)
    t0 = time.perf_counter()
    ours50 = det50.score(prompts)
    dt50 = time.perf_counter() - t0
    same = np.allclose(ours50.scores[: len(ref_prompts)], ref_scores, rtol=1e-4)
    out["b_official_prompts_per_s"] = len(ref_prompts) / ref_dt
    out["b_detector_prompts_per_s"] = a.prompts / dt50
    out["b_speedup"] = out["b_detector_prompts_per_s"] / out["b_official_prompts_per_s"]
    out["b_same_first_step_scores"] = bool(same)

    # (c) peak RSS, streamed from a file, fresh process each
    if a.rss:
        rss = {}
        for n in [int(x) for x in a.rss.split(",")]:
            r = subprocess.run([sys.executable, __file__, "--model", a.model, "--batch", str(a.batch), "--rss-run", str(n)],
                               capture_output=True, text=True, check=True, env={**os.environ})
            rss[n] = json.loads(r.stdout.strip().splitlines()[-1])
        counts = sorted(rss)
        out["c_peak_rss_mb"] = {str(n): rss[n]["peak_rss_mb"] for n in counts}
        out["c_seconds"] = {str(n): rss[n]["seconds"] for n in counts}
        out["c_rss_ratio_largest_vs_smallest"] = rss[counts[-1]]["peak_rss_mb"] / rss[counts[0]]["peak_rss_mb"]

    print(f"(a) detector {out['a_detector_prompts_per_s']:.1f} prompts/s vs bare UNet forward {limit:.1f}/s: "
          f"ratio {out['a_ratio']:.2f} (bar >= 0.8)")
    print(f"(b) detector {out['b_detector_prompts_per_s']:.1f} prompts/s vs official way {out['b_official_prompts_per_s']:.3f}/s "
          f"(50 DDIM steps + decode): {out['b_speedup']:.0f}x (bar >= 50x); same first-step scores: {same}")
    if a.rss:
        print(f"(c) peak RSS {out['c_peak_rss_mb']} MB: ratio {out['c_rss_ratio_largest_vs_smallest']:.3f} (bar <= 1.10)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
