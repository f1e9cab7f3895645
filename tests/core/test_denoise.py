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
    assert torch.equal(denoise.guided(x, x + 1, 0.0), x)  # any finite scale stands, 0 included
