"""Would integrated gradients close the gap between gradient attribution and ablation?

Issue 4's bar asks ``TokenAttribution`` (Wen et al.'s gradient norm) and ``TokenAblation`` (the
score's drop with a word's input token embeddings zeroed) to rank the same top word on >= 80% of
flagged prompts; on MemLab they agree on 0.633 (verbatim captions 0.250). The gradient norm is a
local sensitivity; the ablation is a finite step to the zeroed word. Integrated gradients (Sundararajan
et al., 2017) integrate the gradient along the straight path from the same zeroed baseline (every
prompt word zeroed at once, BOS / EOS / padding kept) to the prompt, so a word's score is its share
of the score's change along that path. This script scores the prompts of a saved ``bench explain``
run with it, at each number of path points given, and prints the same figures as the bench:
agreement with the run's ablation top words, the trigger hit rate, and on flagged verbatim captions
how replication behaves with its top word masked (from the run's masked generations).

    python benchmarks/explain_integrated_gradients.py --bench-explain benchmarks/results/memlab-v3 [--points 8 32]

With ``--smoothgrad-sigmas`` it scores SmoothGrad instead (Smilkov et al., 2017): Wen et al.'s
gradient norm averaged over ``--samples`` copies of the prompt's input token embeddings with
Gaussian noise added, sigma given as a multiple of the prompt words' embedding standard deviation:

    python benchmarks/explain_integrated_gradients.py --bench-explain benchmarks/results/memlab-v3 \
        --smoothgrad-sigmas 0.3 1 2 --samples 16

It is a one-off check, not a diffmem explainer: the first-step score at seed 0 and the path's
points (or the noisy copies) in one batch, as the bench's attribution scores it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from diffmem.bench.explain import ExplainBenchResult, top_index
from diffmem.core import denoise
from diffmem.core.loading import load_pipeline
from diffmem.explain.tokens import encode_token_embeddings, prompt_tokens


def first_step_inputs(pipe, prompt: str, num_inference_steps: int, seed: int):
    """What both scorers differentiate at: the prompt's words and input token embeddings, the
    unconditional embedding, the first timestep and its scaled initial latents."""
    tokens, word_of, words = prompt_tokens(pipe, prompt)
    n = len(tokens)
    ids = denoise.tokenize(pipe, [prompt]).to(pipe.text_encoder.device)
    with torch.no_grad():
        uncond_emb = denoise.encode_text(pipe, [""], warn=False)
        tok0 = pipe.text_encoder.get_input_embeddings()(ids)
    sched = denoise.fresh_scheduler(pipe, num_inference_steps)
    t = sched.timesteps[0]
    xin = sched.scale_model_input(denoise.initial_latents(pipe, seed, 1), t)
    return word_of, words, n, ids, tok0, uncond_emb, t, xin


def integrated_gradients(pipe, prompt: str, points: int, num_inference_steps: int, seed: int = 0):
    """(words, word scores, completeness gap): per word, the sum over its tokens of input x (the gradient
    of the first-step score averaged over ``points`` midpoints of the path from the zeroed words to the
    prompt). The gap is |sum of the scores - (score of the prompt - score of the baseline)| over the
    latter: how far the midpoint rule is from the exact path integral."""
    word_of, words, n, ids, tok0, uncond_emb, t, xin = first_step_inputs(pipe, prompt, num_inference_steps, seed)
    alphas = (torch.arange(points, dtype=tok0.dtype) + 0.5) / points
    scale = torch.ones(points, tok0.shape[1], 1, dtype=tok0.dtype)
    scale[:, 1 : 1 + n, 0] = alphas[:, None]  # +1: after BOS; EOS and padding stay as they are
    path = (tok0 * scale).detach().requires_grad_(True)
    cond = pipe.unet(xin.repeat(points, 1, 1, 1), t,
                     encoder_hidden_states=encode_token_embeddings(pipe, ids.repeat(points, 1), path)).sample
    with torch.no_grad():
        uncond = pipe.unet(xin, t, encoder_hidden_states=uncond_emb).sample
    score = denoise.to_epsilon(pipe, cond.float() - uncond.float(), t).flatten(1).norm(dim=1).sum()
    (grad,) = torch.autograd.grad(score, path)
    token_scores = (grad.mean(0) * tok0[0]).sum(-1)[1 : 1 + n].float().numpy()
    word_scores = np.zeros(len(words))
    np.add.at(word_scores, word_of, token_scores)
    with torch.no_grad():
        baseline = tok0.clone()
        baseline[0, 1 : 1 + n] = 0
        ends = torch.cat([baseline, tok0])
        eps = pipe.unet(xin.repeat(2, 1, 1, 1), t, encoder_hidden_states=encode_token_embeddings(pipe, ids.repeat(2, 1), ends)).sample
        ends_score = denoise.to_epsilon(pipe, eps.float() - uncond.float(), t).flatten(1).norm(dim=1)
    change = float(ends_score[1] - ends_score[0])
    return words, word_scores, abs(word_scores.sum() - change) / abs(change)


def smoothgrad(pipe, prompt: str, sigma: float, samples: int, num_inference_steps: int, seed: int = 0):
    """(words, word scores, nan): per word, the sum over its tokens of the gradient norm of the first-step
    score, averaged over ``samples`` noisy copies of the input token embeddings (BOS, EOS and padding
    get noise too: they are inputs like the others); ``sigma`` in units of the words' embedding std."""
    word_of, words, n, ids, tok0, uncond_emb, t, xin = first_step_inputs(pipe, prompt, num_inference_steps, seed)
    noise = torch.randn((samples, *tok0.shape[1:]), generator=torch.Generator().manual_seed(seed + 1), dtype=tok0.dtype)
    noisy = (tok0 + sigma * float(tok0[0, 1 : 1 + n].std()) * noise).detach().requires_grad_(True)
    cond = pipe.unet(xin.repeat(samples, 1, 1, 1), t,
                     encoder_hidden_states=encode_token_embeddings(pipe, ids.repeat(samples, 1), noisy)).sample
    with torch.no_grad():
        uncond = pipe.unet(xin, t, encoder_hidden_states=uncond_emb).sample
    score = denoise.to_epsilon(pipe, cond.float() - uncond.float(), t).flatten(1).norm(dim=1).sum()
    (grad,) = torch.autograd.grad(score, noisy)  # each copy's score depends on its own embeddings only
    token_scores = grad.float().norm(dim=-1).mean(0)[1 : 1 + n].numpy()
    word_scores = np.zeros(len(words))
    np.add.at(word_scores, word_of, token_scores)
    return words, word_scores, float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench-explain", required=True, help="a folder with a saved `diffmem bench explain` run")
    ap.add_argument("--model", default="memlab")
    ap.add_argument("--points", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--smoothgrad-sigmas", type=float, nargs="+",
                    help="score SmoothGrad at these noise levels instead of integrated gradients")
    ap.add_argument("--samples", type=int, default=16, help="SmoothGrad's noisy copies per prompt")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bench = ExplainBenchResult.load(a.bench_explain)
    if bench.agreement_rows and "ablation_top_index" not in bench.agreement_rows[0]:
        raise SystemExit(f"{a.bench_explain} was saved before the bench recorded the top words' positions: run "
                         "`diffmem bench explain` again")
    pipe = load_pipeline(a.model)
    steps = bench.settings["num_inference_steps"]
    if a.smoothgrad_sigmas:
        variants = [(f"SmoothGrad sigma {sg} x {a.samples}", lambda p, sg=sg: smoothgrad(pipe, p, sg, a.samples, steps))
                    for sg in a.smoothgrad_sigmas]
    else:
        variants = [(f"IG {pt} points", lambda p, pt=pt: integrated_gradients(pipe, p, pt, steps)) for pt in a.points]
    print("| method | agree (all) | trigger | verbatim | trigger hit | verbatim: top word masked -> "
          "replication | top word = largest effect | Spearman | completeness gap (median) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, score in variants:
        start = time.monotonic()
        top, gaps = {}, []

        def explained(prompt):  # (words, scores, top word's position), once per prompt
            if prompt not in top:
                words, scores, gap = score(prompt)
                top[prompt] = (words, scores, int(np.argmax(scores)))
                gaps.append(gap)
            return top[prompt]

        # by position, as the bench compares them
        agree = {g: [explained(r["prompt"])[2] == r["ablation_top_index"] for r in bench.agreement_rows if r["group"] == g]
                 for g in ("trigger", "verbatim")}
        hit = []
        for r in bench.trigger_rows:
            words, _, best = explained(r["prompt"])
            hit.append(words[best].lower() in r["trigger"].split())
        masked, is_largest, rho = [], [], []
        for r in bench.outcome_rows:
            words, scores, best = explained(r["prompt"])
            effect = np.mean(r["ratio_masked"], axis=1) - np.mean(r["ratio_unmasked"])  # as the bench computes it
            masked.append(r["replicated_masked"][best])
            is_largest.append(best == top_index(r, "outcome"))
            rho.append(spearmanr(scores, effect).correlation)
        everything = agree["trigger"] + agree["verbatim"]
        print(f"| {label} | {np.mean(everything):.3f} ({len(everything)}) | {np.mean(agree['trigger']):.3f} | "
              f"{np.mean(agree['verbatim']):.3f} | {np.mean(hit):.3f} | {np.mean(masked):.3f} | {np.mean(is_largest):.3f} | "
              f"{np.nanmean(rho):.3f} | {'-' if np.isnan(gaps).all() else f'{np.median(gaps):.3f}'} | {time.monotonic() - start:.0f} |")


if __name__ == "__main__":
    main()
