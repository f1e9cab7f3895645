import numpy as np
import pytest
import torch

from diffmem.core import denoise
from diffmem.core.errors import InputError
from diffmem.detect import DetectionResult, NoiseNormDetector

PROMPTS = ["a red circle on the left", "a photo of a cat", "an astronaut riding a horse on the moon"]


def _pipeline_reference(pipe, prompts, seeds, steps, num_inference_steps, guidance):
    """Norms recorded inside the standard StableDiffusionPipeline.__call__ through a UNet hook."""
    calls = []

    def record(module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample  # the pipeline calls return_dict=False
        calls.append((args[1] if len(args) > 1 else kwargs["timestep"], sample.detach().clone(), args[0].detach().clone()))

    handle = pipe.unet.register_forward_hook(record, with_kwargs=True)
    out = np.zeros((len(prompts), len(seeds), len(steps)))
    try:
        for gi, seed in enumerate(seeds):
            calls.clear()
            gens = [torch.Generator().manual_seed(seed) for _ in prompts]
            pipe(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance, generator=gens, output_type="latent")
            for si, step in enumerate(steps):
                t, both, x_t = calls[step]
                if len(both) == 2 * len(prompts):
                    uncond, cond = both.chunk(2)  # the pipeline batches [unconditional, conditional]
                else:  # no guidance: the pipeline ran the conditional half alone; the other at the same x_t
                    cond, empty = both, denoise.encode_text(pipe, [""], warn=False).expand(len(prompts), -1, -1)
                    with torch.no_grad():
                        uncond = pipe.unet(x_t, t, encoder_hidden_states=empty).sample
                diff = denoise.to_epsilon(pipe, cond - uncond, t)
                out[:, gi, si] = diff.flatten(1).norm(dim=1).numpy()
    finally:
        handle.remove()
    return out


@pytest.mark.parametrize("fixture, guidance", [("tiny_pipe", 7.5), ("tiny_pipe_v", 7.5), ("tiny_pipe", 0.5)])
def test_scores_equal_a_plain_pipeline_run(fixture, guidance, request):
    # at a guidance scale of 1 or less the pipeline runs the conditional prediction alone
    pipe = request.getfixturevalue(fixture)
    det = NoiseNormDetector(pipe, num_inference_steps=6, guidance_scale=guidance, steps=[0, 1, 3], generations=2, seed=11, batch_size=2)
    res = det.score(PROMPTS)
    ref = _pipeline_reference(pipe, PROMPTS, [11, 12], [0, 1, 3], 6, guidance)
    np.testing.assert_allclose(res.values, ref, rtol=1e-4)
    np.testing.assert_allclose(res.scores, ref.mean(axis=(1, 2)), rtol=1e-4)


@pytest.mark.parametrize("sampler, config", [("EulerAncestralDiscreteScheduler", {}), ("DDPMScheduler", {}), ("PNDMScheduler", {}),
                                            ("DPMSolverMultistepScheduler", {}),
                                            ("EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
                                            ("TCDScheduler", {})])
def test_scores_past_the_first_step_equal_the_pipelines_with_other_samplers(tiny_pipe_with, sampler, config):
    # ancestral Euler and DDPM draw fresh noise at every step: from the seed's generator, as the
    # pipeline does. Euler with SD 1.x's "leading" spacing starts below its top sigma: x_T is scaled
    # by the sampler set for this run, not by the pipeline's, which a run of 4 steps left set here.
    # TCD's step takes the pipeline's eta, 0, not its own default of 0.3
    pipe = tiny_pipe_with(sampler, **config)
    pipe(PROMPTS[:1], num_inference_steps=4, output_type="latent")
    det = NoiseNormDetector(pipe, num_inference_steps=6, guidance_scale=7.5, steps=[0, 2, 4], generations=2, seed=11, batch_size=2)
    res = det.score(PROMPTS)
    torch.manual_seed(123)  # the global generator's state must not matter
    again = det.score(PROMPTS)
    ref = _pipeline_reference(pipe, PROMPTS, [11, 12], [0, 2, 4], 6, 7.5)
    np.testing.assert_allclose(res.values, ref, rtol=1e-4)
    np.testing.assert_array_equal(again.values, res.values)


def test_scores_equal_the_pipelines_with_textual_inversion_tokens(tiny_pipe_ti):
    # the pipeline writes a multi-vector token out as its vectors' tokens before tokenizing: diffmem
    # read the first vector alone
    prompts = ["a painting in <my-style> style", "<one> cat", "a photo of a cat"]
    with torch.no_grad():
        assert torch.equal(denoise.encode_text(tiny_pipe_ti, prompts), tiny_pipe_ti.encode_prompt(prompts, "cpu", 1, False)[0])
    det = NoiseNormDetector(tiny_pipe_ti, num_inference_steps=6, guidance_scale=7.5, steps=[0, 1], generations=1, seed=11)
    np.testing.assert_allclose(det.score(prompts).values, _pipeline_reference(tiny_pipe_ti, prompts, [11], [0, 1], 6, 7.5), rtol=1e-4)


def test_batching_does_not_change_scores(tiny_pipe):
    a = NoiseNormDetector(tiny_pipe, num_inference_steps=4, steps=[0, 2], batch_size=1).score(PROMPTS)
    b = NoiseNormDetector(tiny_pipe, num_inference_steps=4, steps=[0, 2], batch_size=3).score(PROMPTS)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5)


def test_result_round_trips(tmp_path, tiny_pipe):
    res = NoiseNormDetector(tiny_pipe, num_inference_steps=4, steps=[0, 1], generations=2).score(PROMPTS)
    for name in ("r.json", "r.parquet"):
        back = DetectionResult.load(res.save(tmp_path / name))
        assert back.prompts == res.prompts and back.seeds == res.seeds and back.settings == res.settings
        np.testing.assert_allclose(back.values, res.values)
    assert list(res.to_frame().columns[:2]) == ["prompt", "score"]


def test_prompts_longer_than_the_model_reads_are_marked(tmp_path, tiny_pipe):
    import warnings

    long = "a red circle " + "word " * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", denoise.PromptTruncationWarning)
        res = NoiseNormDetector(tiny_pipe, num_inference_steps=4).score(["a cat", long])
    assert res.truncated.tolist() == [False, True]
    assert res.to_frame()["truncated"].tolist() == [False, True]
    for name in ("r.json", "r.parquet"):
        assert DetectionResult.load(res.save(tmp_path / name)).truncated.tolist() == [False, True]
    # 77 tokens with BOS and EOS is the most the model reads: 75 one-token words fit, 76 do not
    assert denoise.truncated(tiny_pipe, ["a " * 75, "a " * 76]).tolist() == [False, True]


def test_bad_input(tiny_pipe):
    det = NoiseNormDetector(tiny_pipe, num_inference_steps=4)
    with pytest.raises(InputError, match="no prompts"):
        det.score([])
    with pytest.raises(InputError, match="prompt 1 is empty"):
        det.score(["fine", "  "])
    # the tokenizer failed on it with a TypeError that named nothing
    with pytest.raises(InputError, match=r"prompt 1 holds a lone surrogate \\ud83d at character 4"):
        det.score(["fine", "cat \ud83d"])
    with pytest.raises(InputError, match="steps must lie"):
        NoiseNormDetector(tiny_pipe, num_inference_steps=4, steps=[4])
    with pytest.warns(denoise.PromptTruncationWarning, match="truncated to 77 tokens"):
        det.score(["word " * 100])


def test_a_string_is_one_prompt_not_a_list_of_letters(tiny_pipe):
    det = NoiseNormDetector(tiny_pipe, num_inference_steps=4)
    one = det.score("a red circle")
    assert one.prompts == ["a red circle"]
    np.testing.assert_array_equal(one.scores, det.score(["a red circle"]).scores)
    for bad in (None, 3):
        with pytest.raises(InputError, match="a string or a list of strings"):
            det.score(bad)


def test_truncation_warning_names_where_the_cut_falls(tiny_pipe):
    import re

    prompt = " ".join(f"w{i}" for i in range(100))
    with pytest.warns(denoise.PromptTruncationWarning) as caught:
        ids = denoise.tokenize(tiny_pipe, ["short", prompt])
    assert len(caught) == 1  # only the long prompt
    kept = tiny_pipe.tokenizer.decode(ids[1][1:-1], skip_special_tokens=True)
    end = re.search(r"reads it only up to '\.\.\.(.*)'$", str(caught[0].message)).group(1)
    # the end of what the model reads, from the start of a word (not a word cut in half)
    assert kept.endswith(end) and kept[: -len(end)].endswith(" ") and 40 <= len(end) <= 60


def test_on_progress_counts_prompt_generations_and_can_stop_the_run(tiny_pipe):
    from diffmem.detect import NoiseNormDetector

    det = NoiseNormDetector(tiny_pipe, num_inference_steps=4, generations=2, batch_size=2)
    seen = []
    det.score(["a red circle", "a blue square", "a green star"], on_progress=lambda n, of: seen.append((n, of)))
    assert seen == [(2, 6), (4, 6), (5, 6), (6, 6)]  # per batch (2 then 1 prompts) and generation

    class Stop(Exception):
        pass

    def stop(n, of):
        raise Stop

    with pytest.raises(Stop):
        det.score(["a red circle"], on_progress=stop)
