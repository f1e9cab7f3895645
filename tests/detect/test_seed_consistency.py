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
