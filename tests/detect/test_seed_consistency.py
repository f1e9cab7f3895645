import numpy as np
import pytest
import torch

from diffmem.detect.seed_consistency import SeedConsistencyDetector, pairwise_agreement


def test_agreement_is_one_for_identical_outputs_and_low_for_noise():
    x = torch.randn(1, 50).expand(4, 50)
    assert torch.allclose(pairwise_agreement(x), torch.ones(4), atol=1e-5)
    noise = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0))
    assert pairwise_agreement(noise).abs().max() < 0.1
    ref = np.corrcoef(noise.numpy())
    np.testing.assert_allclose(pairwise_agreement(noise).numpy(), (ref.sum(1) - 1) / 3, atol=1e-5)


@pytest.mark.parametrize("mode", ["x0", "images"])
def test_runs_on_a_pipeline(tiny_pipe, mode):
    res = SeedConsistencyDetector(tiny_pipe, mode=mode, generations=3, num_inference_steps=3).score(["a cat", "a dog"])
    assert res.values.shape == (2, 3, 1) and np.isfinite(res.scores).all()
    assert res.method == "seed_consistency" and res.seeds == [0, 1, 2]


@pytest.mark.parametrize("sampler", ["PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_first_step_mode_runs_with_multistep_samplers(tiny_pipe_with, sampler):
    # their step output has no pred_original_sample; PNDM is Stable Diffusion 1.x's own sampler
    res = SeedConsistencyDetector(tiny_pipe_with(sampler), generations=3, num_inference_steps=5).score(["a cat", "a dog"])
    assert res.values.shape == (2, 3, 1) and np.isfinite(res.scores).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_predicted_x0_is_the_samplers_own(prediction_type, sampler):
    import diffusers

    from diffmem.core import denoise
    from diffmem.core.components import tiny_pipeline

    pipe = tiny_pipeline(seed=0, prediction_type=prediction_type)
    pipe.scheduler = getattr(diffusers, sampler).from_config(pipe.scheduler.config)
    sched = denoise.fresh_scheduler(pipe, 5)
    x = denoise.initial_latents(pipe, sched, 0, 2)
    for i, t in enumerate(sched.timesteps[:2]):  # Euler's second timestep lies between integers
        xin = sched.scale_model_input(x, t)
        out = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        step = sched.step(out, t, x)
        x0 = step.pred_original_sample
        torch.testing.assert_close(denoise.predicted_x0(pipe, xin, out, t), x0, rtol=1e-5, atol=1e-5)
        # the epsilon the sampler's x0 implies, from its own noise level: a difference of two in epsilon units
        if sampler == "EulerDiscreteScheduler":
            eps = (x - x0) / sched.sigmas[i]
            torch.testing.assert_close(denoise.to_epsilon(pipe, out[0] - out[1], t), eps[0] - eps[1], rtol=1e-4, atol=1e-5)
        x = step.prev_sample[:1].expand_as(x)  # both samples at one x_t, as a difference of predictions is taken


@pytest.mark.parametrize("mode", ["x0", "images"])
def test_progress_is_reported_as_the_generations_are_made(tiny_pipe, mode):
    # diffmem detect's bar moves by it within a chunk of prompts: full generations take minutes each on a CPU
    seen = []
    det = SeedConsistencyDetector(tiny_pipe, mode=mode, generations=3, num_inference_steps=3, batch_size=2)
    det.score(["a cat", "a dog", "a red circle"], on_progress=lambda done, total: seen.append((done, total)))
    assert len(seen) > 1 and seen[-1] == (9, 9)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and {t for _, t in seen} == {9}


def test_detect_file_moves_its_bar_within_a_chunk_and_takes_detectors_that_do_not_report(tmp_path, tiny_pipe):
    from diffmem.detect.run import detect_file

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na red circle\n")
    given = []

    class Reporting(SeedConsistencyDetector):
        def score(self, prompts, progress=False, on_progress=None):
            given.append(on_progress)
            return super().score(prompts, progress, on_progress)

    class Silent(SeedConsistencyDetector):  # a detector of the user's, without the argument
        def score(self, prompts, progress=False):
            return super().score(prompts, progress)

    detect_file(Reporting(tiny_pipe, "x0", 2, 3), prompts, tmp_path / "a.parquet", chunk=2, progress=False)
    assert len(given) == 2 and all(callable(f) for f in given)
    silent = detect_file(Silent(tiny_pipe, "x0", 2, 3), prompts, tmp_path / "b.parquet", chunk=2, progress=False)
    assert silent.n_prompts == 3
