"""Inference-time mitigation (Wen et al., ICLR 2024, section 5):
``EmbeddingOptimization(pipe, target, ...).mitigate(prompts) -> MitigationResult``, the interface the
baselines of Somepalli et al. 2023 (``baselines.py``) share.

``EmbeddingOptimization`` optimizes the conditional prompt embedding (the text-encoder output;
the BOS position kept fixed) with AdamW to bring the first-step loss, averaged over n seeded x_T,
to a target; then it generates normally with the optimized embedding and the same seeds.
Official settings: lr 0.05, at most 10 iterations, n = 4, target calibrated per model (3 for SD
v1.4). A prompt already at or below the target is left untouched: no step runs and its images
are the unmitigated generation, bit for bit.

``loss_steps=k`` (our extension; 1 = Wen et al.) minimizes the norm averaged over the first k
sampling steps instead, the score the detector gives at steps 0..k-1. On MemLab the first-step
norm misses template layouts that the first five steps see (detection AUC 0.992 against 1.000),
and so does a mitigation that only lowers the first step.

``positions="eos"`` (our extension; "all" = Wen et al.) optimizes only the EOS output and the
padding after it, and keeps every word's output as the text encoder gave it. CLIP's text encoder
is causal, so those end positions are the only ones that see the whole prompt; Adam moves every
optimized coordinate by about the learning rate whatever its gradient, so optimizing the word
positions rewrites what the prompt names as much as what it memorized. On MemLab's 100 planted
prompts (5-step loss, its FPR-1% target, 20 iterations; bench mitigate) "all" takes replication
from 0.978 to 0.045 and attribute agreement from 0.926 to 0.841; "eos" keeps agreement (0.929)
but leaves replication at 0.072, template layouts mostly (0.108 of their generations).

``rewrite="rna"`` (our extension; None = Wen et al.) starts a prompt that is above the target from
its RNA rewrite (four random numbers, Somepalli et al.'s baseline, appended) and optimizes from
there while it stays above; a prompt below the target is still untouched. The rewrite alone keeps
alignment but leaves some replication (0.140 on MemLab), and the optimization removes the rest
with far less movement than from the prompt itself. With "eos": replication 0.978 -> 0.000 at
agreement 0.926 -> 0.987 (bench mitigate), the setting ``diffmem audit`` uses. Appended, not at
random places as the RNA baseline puts them: there MemLab's agreement falls to 0.453.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..core import denoise
from ..core.errors import DiffmemError, InputError
from .baselines import BASELINES
from .result import MitigationResult


class NonFiniteLoss(DiffmemError):
    pass




def _trajectory_loss(pipe, emb: torch.Tensor, x_T: torch.Tensor, seeds: list[int], uncond_emb: torch.Tensor,
                     first_uncond: torch.Tensor, num_inference_steps: int, loss_steps: int, guidance_scale: float) -> torch.Tensor:
    """Mean over the first ``loss_steps`` sampling steps and the n seeds of
    || eps(x_t, c) - eps(x_t, empty) || (epsilon units): the noise-norm detector's score at steps
    0 .. loss_steps-1 (x_T holds the n ``seeds``' starts). The latent advances with guidance under
    the embedding being optimized, as a pipeline would; the gradient flows through each step's
    conditional prediction, not through the latent's path (detached), so a step costs one backward
    pass."""
    sched = denoise.fresh_scheduler(pipe, num_inference_steps)
    x, n, total = x_T, len(x_T), 0.0
    step_kwargs = denoise.step_kwargs(pipe, sched, seeds)  # fresh each call: every iteration sees the same noise
    for i, t in enumerate(sched.timesteps[:loss_steps]):
        xin = sched.scale_model_input(x, t)
        cond = pipe.unet(xin, t, encoder_hidden_states=emb.expand(n, -1, -1)).sample
        if i == 0:
            uncond = first_uncond  # x_T does not depend on the embedding: computed once
        else:
            with torch.no_grad():
                uncond = pipe.unet(xin, t, encoder_hidden_states=uncond_emb.expand(n, -1, -1)).sample
        total = total + denoise.to_epsilon(pipe, cond.float() - uncond.float(), t).flatten(1).norm(dim=1).mean()
        if i < loss_steps - 1:
            with torch.no_grad():
                x = sched.step(denoise.guided(uncond, cond.detach(), guidance_scale), t, x, **step_kwargs).prev_sample
    return total / loss_steps


POSITIONS = ("all", "eos")
REWRITES = ("rna", "rta")  # prompt-text baselines an optimization may start from


def _positive(name: str, value) -> float:
    """``value`` as a finite positive float, or an error naming it (None and strings included)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise InputError(f"{name} must be a positive number, got {value!r}")
    return number


class EmbeddingOptimization:
    method = "embedding_optimization"
    # 4: the detector's revision 2 (other samplers run as the pipeline runs them); 3: the
    # rewrite's words kept inside what the model reads; 2: rewrite="rna" draws numbers below 100,000,
    # 1 below 10,000 (see the baselines' revisions)
    revision = 4

    def __init__(self, pipe, target: float, lr: float = 0.05, max_iters: int = 10, generations: int = 4, seed: int = 0,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, target_source: str = "given",
                 loss_steps: int = 1, positions: str = "all", rewrite: str | None = None):
        target, lr = _positive("the target loss", target), _positive("the learning rate", lr)
        if max_iters < 0 or generations < 1:
            raise InputError(f"max_iters must be >= 0 and generations >= 1, got {max_iters} and {generations}")
        if not 1 <= loss_steps <= num_inference_steps:
            raise InputError(f"loss_steps must lie in [1, {num_inference_steps}], got {loss_steps}")
        if positions not in POSITIONS:
            raise InputError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        if rewrite is not None and rewrite not in REWRITES:
            raise InputError(f"rewrite must be one of {', '.join(REWRITES)} or None, got {rewrite!r}")
        denoise.check_inference_steps(pipe, num_inference_steps)
        denoise.check_scored_steps(pipe, num_inference_steps, range(loss_steps))  # its loss is the score of these
        self.pipe = pipe
        self.settings = {"target": float(target), "lr": lr, "max_iters": max_iters, "generations": generations,
                         "seed": seed, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                         "target_source": target_source, "loss_steps": loss_steps, "positions": positions,
                         "rewrite": rewrite, "revision": self.revision}
        self._rewriter = None

    def seeds(self) -> list[int]:
        return [self.settings["seed"] + g for g in range(self.settings["generations"])]

    @classmethod
    def from_calibration(cls, pipe, calibration, source: str = "calibration", **kw) -> "EmbeddingOptimization":
        """Take the target from a calibration of the loss this method minimizes: the norm at steps
        0..loss_steps-1 averaged over the same seeded generations and sampler steps. A calibration of another
        score (later steps, other seeds) is on another scale and is refused: on MemLab the mean over
        steps 0-4 is about twice the first-step norm, so its threshold would leave every prompt
        "already below target" and untouched."""
        from ..core.loading import model_identity
        from ..detect.calibration import CalibrationMismatch

        m = cls(pipe, calibration.threshold, target_source=source, **kw)
        s, c = m.settings, calibration.settings
        want = {"steps": list(range(s["loss_steps"])), "generations": s["generations"], "seed": s["seed"],
                "num_inference_steps": s["num_inference_steps"]}
        got = {k: c.get(k) for k in want}
        got["steps"] = list(got["steps"] or [])
        problems = [f"{k}={got[k]!r} (needs {v!r})" for k, v in want.items() if got[k] != v]
        if problems:
            raise CalibrationMismatch(
                "this calibration is not of the mitigation loss (the norm at the same steps over the same seeded "
                f"generations): {'; '.join(problems)}. Calibrate with `diffmem detect --steps "
                f"{','.join(str(i) for i in range(s['loss_steps']))} "
                f"--generations {s['generations']} --seed {s['seed']} --num-inference-steps {s['num_inference_steps']} "
                "--calibrate-with REFERENCE`, or give --target")
        if (wrong := calibration.model_mismatch(model_identity(pipe))) is not None:
            raise CalibrationMismatch(f"this calibration does not apply: {wrong}")
        return m

    @classmethod
    def calibrated(cls, pipe, reference: Sequence[str], fpr: float = 0.01, progress: bool = False, on_progress=None, **kw):
        """(method, calibration): the target is the (1 - fpr) quantile of the mitigation loss over
        non-memorized reference prompts, scored with exactly the mitigation's settings.
        ``on_progress(done, total)`` as in ``NoiseNormDetector.score``."""
        from ..detect import Calibration, NoiseNormDetector

        probe = cls(pipe, 1.0, **kw).settings
        det = NoiseNormDetector(pipe, probe["num_inference_steps"], probe["guidance_scale"], steps=range(probe["loss_steps"]),
                                generations=probe["generations"], seed=probe["seed"])
        cal = Calibration.fit(det.score(list(reference), progress=progress, on_progress=on_progress), fpr=fpr)
        return cls.from_calibration(pipe, cal, source=f"calibration of the loss at steps 0-{probe['loss_steps'] - 1} at FPR {fpr} "
                                    f"on {len(reference)} reference prompts",
                                    **kw), cal

    def first_optimized_position(self, prompt: str) -> int:
        """1 (after BOS) for positions="all"; the EOS position for positions="eos"."""
        if self.settings["positions"] == "all":
            return 1
        ids = denoise.tokenize(self.pipe, [prompt], warn=False)[0].tolist()
        return min(denoise.text_end(self.pipe, ids), len(ids) - 1)  # after the last word (truncated: the final EOS)

    def rewritten(self, prompt: str) -> str:
        """The text the optimization starts from: the prompt itself, or with ``rewrite`` set, the
        prompt after that baseline (RNA: four random numbers appended, or just before CLIP's cut for
        a prompt that fills what the model reads). Its random draw depends only on the seed and the
        prompt, so a prompt is rewritten the same way in any batch."""
        if self.settings["rewrite"] is None:
            return prompt
        if self._rewriter is None:
            # appended, not at random places as the baseline itself: the prompt's own words keep their order
            self._rewriter = BASELINES[self.settings["rewrite"]](self.pipe, seed=self.settings["seed"], placement="end")
        return self._rewriter.rewrite(prompt, self._rewriter.rng_for(prompt))

    @staticmethod
    def started_from_rewrite(trajectory: list[float], settings: dict) -> bool:
        """Whether ``optimize`` started from the rewrite: one is set and the prompt's own loss (the
        trajectory's first entry) was above the target."""
        return settings.get("rewrite") is not None and trajectory[0] > settings["target"]

    @classmethod
    def changes(cls, trajectory: list[float], steps: int, settings: dict) -> bool:
        """Whether the optimization changed the prompt's embedding: it took a step, or it started
        from a rewrite."""
        return steps > 0 or cls.started_from_rewrite(trajectory, settings)

    def optimize(self, prompt: str, callback=None) -> tuple[torch.Tensor, list[float], int, bool]:
        """(embedding (1, L, D), loss trajectory, steps taken, target reached).

        With ``rewrite`` set, a prompt whose own loss is above the target is rewritten first and the
        optimization starts from the rewrite's embedding; the trajectory's first entry is still the
        prompt's own loss. ``callback(iteration, loss, text)`` is called after each loss evaluation,
        ``text`` being the prompt whose embedding is evaluated (the prompt itself, or its rewrite once
        optimization starts from it); it may raise to stop."""
        pipe, s = self.pipe, self.settings
        sched = denoise.fresh_scheduler(pipe, s["num_inference_steps"])
        t = sched.timesteps[0]
        x = torch.cat([denoise.initial_latents(pipe, sched, seed, 1) for seed in self.seeds()])
        with torch.no_grad():
            emb0 = denoise.encode_text(pipe, [prompt]).float()
            uncond_emb = denoise.encode_text(pipe, [""], warn=False)
            first_uncond = pipe.unet(sched.scale_model_input(x, t), t, encoder_hidden_states=uncond_emb.expand(len(x), -1, -1)).sample
        traj: list[float] = []
        if s["rewrite"] is not None:
            with torch.no_grad():
                own = float(_trajectory_loss(pipe, emb0.to(pipe.unet.dtype), x, self.seeds(), uncond_emb, first_uncond,
                                             s["num_inference_steps"], s["loss_steps"], s["guidance_scale"]))
            self._check_finite(own, 0, prompt)
            traj.append(own)
            if callback is not None:
                callback(0, own, prompt)
            if own <= s["target"]:  # below the target: untouched, bit for bit
                return emb0.to(pipe.unet.dtype), traj, 0, True
            prompt = self.rewritten(prompt)
            with torch.no_grad():
                emb0 = denoise.encode_text(pipe, [prompt], warn=False).float()
        start = self.first_optimized_position(prompt)
        head = emb0[:, :start]  # the BOS position (and with positions="eos" every word's) stays fixed
        rest = emb0[:, start:].clone().requires_grad_(True)
        opt = torch.optim.AdamW([rest], lr=s["lr"])
        steps = 0
        for it in range(s["max_iters"] + 1):
            emb = torch.cat([head, rest], dim=1).to(pipe.unet.dtype)
            loss = _trajectory_loss(pipe, emb, x, self.seeds(), uncond_emb, first_uncond, s["num_inference_steps"], s["loss_steps"],
                                    s["guidance_scale"])
            value = float(loss.detach())
            self._check_finite(value, it, prompt)
            traj.append(value)
            if callback is not None:
                callback(it, value, prompt)
            if value <= s["target"] or it == s["max_iters"]:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        final = torch.cat([head, rest.detach()], dim=1).to(pipe.unet.dtype)
        if steps == 0:
            final = emb0.to(pipe.unet.dtype)  # the prompt's (or its rewrite's) own embedding, bit for bit
        return final, traj, steps, traj[-1] <= s["target"]

    def _check_finite(self, value: float, it: int, prompt: str) -> None:
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the mitigation loss became {value} at iteration {it} for prompt {prompt!r}; "
                                f"lower the learning rate (now {self.settings['lr']})")

    def mitigate(self, prompts: Sequence[str], generate_images: bool = True, progress: bool = False,
                 batch_size: int = 64) -> MitigationResult:
        from ..core.generate import generate
        from ..detect.noise_norm import check_prompts

        prompts = check_prompts(prompts)
        s = self.settings
        embs, trajs, iters, reached = [], [], [], []
        from tqdm.auto import tqdm

        for p in tqdm(prompts, desc="optimizing embeddings", unit="prompt", disable=not progress):
            e, tr, n, ok = self.optimize(p)
            embs.append(e)
            trajs.append(tr)
            iters.append(n)
            reached.append(ok)
        texts = [self.rewritten(p) if self.started_from_rewrite(t, s) else p for p, t in zip(prompts, trajs)]
        res = MitigationResult(self.method, prompts, dict(s), self.seeds(), np.array([t[0] for t in trajs]),
                               np.array([t[-1] for t in trajs]), trajs, np.array(iters), np.array(reached), texts,
                               truncated=denoise.truncated(self.pipe, prompts),
                               mitigated_truncated=denoise.truncated(self.pipe, texts))
        if generate_images:
            kw = dict(num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"], batch_size=batch_size,
                      progress=progress)
            res.images_before = generate(self.pipe, prompts, self.seeds(), **kw)
            after = res.images_before.copy()
            # untouched prompts keep their images, bit for bit
            touched = [i for i, (tr, n) in enumerate(zip(trajs, iters)) if self.changes(tr, n, s)]
            if touched:
                emb = torch.cat([embs[i] for i in touched])
                after[touched] = generate(self.pipe, [prompts[i] for i in touched], self.seeds(), prompt_embeds=emb, **kw)
            res.images_after = after
        return res
