import pytest
import torch

from diffmem.core import denoise
from diffmem.core.errors import InputError


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_a_guidance_scale_that_is_not_a_number_is_refused(tiny_pipe, scale):
    # NaN guidance turns every later latent into NaN: images of noise and scores of nan, silently
    from diffmem.core.generate import generate
    from diffmem.explain import TokenAttribution

    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(InputError, match="guidance scale must be a finite number"):
        denoise.guided(x, x, scale)
    with pytest.raises(InputError, match="guidance scale"):
        generate(tiny_pipe, ["a red circle"], [0], num_inference_steps=2, guidance_scale=scale)
    with pytest.raises(InputError, match="guidance scale"):
        TokenAttribution(tiny_pipe, num_inference_steps=3, guidance_scale=scale, steps=(0, 1)).attribute("a red circle")
    # any finite scale stands, 0 included; at 1 or less the pipeline follows the conditional prediction alone
    assert torch.equal(denoise.guided(x, x + 1, 0.0), x + 1) and torch.equal(denoise.guided(x, x + 1, 3.0), x + 3)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_neither_torch_nor_numpy_takes_is_refused_before_any_image(tiny_pipe, seed):
    from diffmem.core.generate import generate
    from diffmem.detect import NoiseNormDetector
    from diffmem.mitigate import BASELINES

    with pytest.raises(InputError, match="a seed must be a whole number in"):
        generate(tiny_pipe, ["a red circle"], [0, seed], num_inference_steps=2)
    with pytest.raises(InputError, match="a seed must be a whole number in"):
        NoiseNormDetector(tiny_pipe, num_inference_steps=2, seed=seed).score(["a red circle"], progress=False)
    with pytest.raises(InputError, match="a seed must be a whole number in"):
        BASELINES["gni"](tiny_pipe, seed=seed, sigma=0.1)


def test_seeds_across_their_whole_range_are_taken_and_only_whole_numbers():
    import numpy as np

    for seed in (1.5, True, "3", None):
        with pytest.raises(InputError, match="a seed must be a whole number in"):
            denoise.check_seed(seed)
    assert [denoise.check_seed(s) for s in (0, np.int64(7), 2**64 - 1)] == [0, 7, 2**64 - 1]


def test_too_few_steps_for_the_pipelines_sampler_are_refused_before_any_work(tiny_pipe_with):
    # PNDM, Stable Diffusion 1.x's sampler, fails inside diffusers below 4 steps with a message about array shapes
    from diffmem.core.generate import generate
    from diffmem.detect import NoiseNormDetector, SeedConsistencyDetector
    from diffmem.explain import TokenAttribution
    from diffmem.mitigate import EmbeddingOptimization

    pipe = tiny_pipe_with("PNDMScheduler")
    needs = r"sampler \(PNDMScheduler\) cannot sample in 3 inference steps; it needs at least 4"
    for make in (lambda: NoiseNormDetector(pipe, num_inference_steps=3),
                 lambda: SeedConsistencyDetector(pipe, num_inference_steps=3),
                 lambda: TokenAttribution(pipe, num_inference_steps=3),
                 lambda: EmbeddingOptimization(pipe, target=1.0, num_inference_steps=3),
                 lambda: generate(pipe, ["a red circle"], [0], num_inference_steps=3)):
        with pytest.raises(InputError, match=needs):
            make()
    assert denoise.check_inference_steps(pipe, 4) == 4
    assert NoiseNormDetector(pipe, num_inference_steps=4).score(["a red circle"]).scores.shape == (1,)


def test_a_tokenizer_without_the_text_encoders_length_is_a_clear_error(tiny_pipe_with):
    # saved without model_max_length, a tokenizer pads to about 1e30 tokens: an OverflowError that named nothing
    from diffmem.core.tokenizer import clip_tokenizer
    from diffmem.detect import NoiseNormDetector

    pipe = tiny_pipe_with("DDIMScheduler")  # a copy: the session's tiny_pipe keeps its tokenizer
    pipe.tokenizer = clip_tokenizer(model_max_length=int(1e30))
    with pytest.raises(InputError, match=r'set "model_max_length": 77 in the model\'s tokenizer/tokenizer_config.json'):
        NoiseNormDetector(pipe, num_inference_steps=2).score(["a red circle"])
    from diffmem.train.trainer import _tokenize

    with pytest.raises(InputError, match="the text encoder has 77 positions"):  # training captions likewise
        _tokenize(pipe, ["a red circle"])


@pytest.mark.parametrize("sampler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_scoring_only_where_a_zero_terminal_snr_schedule_has_no_signal_is_refused(tiny_pipe_v, sampler):
    # v-prediction, zero terminal SNR, "trailing" spacing: step 0 is t = 999 where alpha_bar is 0 (Euler
    # keeps 2**-24), and there every prompt scored 0 and every word carried nothing, silently
    import diffusers

    from diffmem.detect import NoiseNormDetector
    from diffmem.explain import TokenAttribution
    from diffmem.mitigate import EmbeddingOptimization

    zsnr = getattr(diffusers, sampler).from_config(tiny_pipe_v.scheduler.config, timestep_spacing="trailing",
                                                   rescale_betas_zero_snr=True)
    pipe = type(tiny_pipe_v)(**{**tiny_pipe_v.components, "scheduler": zsnr})
    no_signal = r"every scored step \(0\) is at a timestep \(999\) where this model's schedule has no signal left"
    for make in (lambda: NoiseNormDetector(pipe, num_inference_steps=4),
                 lambda: TokenAttribution(pipe, num_inference_steps=4),
                 lambda: EmbeddingOptimization(pipe, target=1.0, num_inference_steps=4, loss_steps=1)):
        with pytest.raises(InputError, match=no_signal + r".*\(steps 0,1,2,3\)"):
            make()
    # with a later step scored the score is not identically 0, and the loss of the first two steps is taken
    assert (NoiseNormDetector(pipe, num_inference_steps=4, steps=[0, 1]).score(["a red circle"]).scores > 1e-4).all()
    EmbeddingOptimization(pipe, target=1.0, num_inference_steps=4, loss_steps=2)
    NoiseNormDetector(tiny_pipe_v, num_inference_steps=4)  # an ordinary schedule ends with signal left


@pytest.mark.parametrize("sampler", ["EDMEulerScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_a_sampler_without_the_ddpm_schedule_is_refused_by_name(tiny_pipe_with, sampler):
    # diffmem converts to epsilon units and noises as in training from alphas_cumprod: an AttributeError before
    from diffmem.detect import NoiseNormDetector

    with pytest.raises(InputError, match=rf"the pipeline's sampler {sampler} is not one diffmem can run: it has no alphas_cumprod"):
        NoiseNormDetector(tiny_pipe_with(sampler), num_inference_steps=4)
