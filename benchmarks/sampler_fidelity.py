"""diffmem's noise-norm scores against a plain StableDiffusionPipeline run, sampler by sampler.

For each sampler, on the tiny random pipeline (epsilon and v-prediction), scores 3 prompts with 2
seeds at steps 0, 1 and 3 of 6 and compares them with the norms recorded inside the pipeline's own
``__call__`` (the reference of tests/detect/test_noise_norm.py). The pipeline is first run once with
4 steps, so a sampler left set by an earlier run cannot help. Prints the largest relative
difference per sampler; stochastic samplers are run twice, so a score that changes between runs
shows too. A few seconds per sampler on 2 cores.

    python benchmarks/sampler_fidelity.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

SAMPLERS = [("DDIMScheduler", {}), ("PNDMScheduler", {}), ("EulerDiscreteScheduler", {}), ("HeunDiscreteScheduler", {}),
            ("LMSDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {}),
            ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}), ("UniPCMultistepScheduler", {}),
            ("DEISMultistepScheduler", {}), ("KDPM2DiscreteScheduler", {}), ("DPMSolverSinglestepScheduler", {}),
            ("LCMScheduler", {}), ("TCDScheduler", {}), ("EulerAncestralDiscreteScheduler", {}), ("DDPMScheduler", {}),
            ("KDPM2AncestralDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
            ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}), ("LMSDiscreteScheduler", {"timestep_spacing": "leading"}),
            ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "leading"})]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # the tiny pipeline has no safety checker, and says so each time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "detect"))
    from test_noise_norm import PROMPTS, _pipeline_reference  # the tests' reference, not a second copy of it

    from diffmem.core.components import tiny_pipeline
    from diffmem.detect import NoiseNormDetector

    rows = []
    for name, config in SAMPLERS:
        worst, repeat = 0.0, 0.0
        for prediction_type in ("epsilon", "v_prediction"):
            base = tiny_pipeline(seed=0, prediction_type=prediction_type)
            sampler = getattr(diffusers, name).from_config(base.scheduler.config, **config)
            pipe = type(base)(**{**base.components, "scheduler": sampler})
            pipe.set_progress_bar_config(disable=True)
            pipe(PROMPTS[:1], num_inference_steps=4, output_type="latent")
            det = NoiseNormDetector(pipe, num_inference_steps=6, guidance_scale=7.5, steps=[0, 1, 3], generations=2, seed=11)
            first, again = det.score(PROMPTS).values, det.score(PROMPTS).values
            ref = _pipeline_reference(pipe, PROMPTS, [11, 12], [0, 1, 3], 6, 7.5)
            worst = max(worst, float(np.abs(first - ref).max() / np.abs(ref).max()))
            repeat = max(repeat, float(np.abs(first - again).max() / np.abs(ref).max()))
        label = name + "".join(f" {k}={v}" for k, v in config.items())
        rows.append({"sampler": label, "max_relative_difference": worst, "run_to_run": repeat})
        print(f"{label:70s} against the pipeline {worst:.1e}   run to run {repeat:.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
