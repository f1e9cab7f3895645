import numpy as np
import pytest

from diffmem.scan.memorization import sample_noise_norms
from diffmem.scan.sources import ScanRow


@pytest.mark.parametrize("sampler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler"])
def test_rows_are_noised_as_in_training_whatever_sampler_the_folder_holds(tiny_pipe_with, sampler):
    # Euler's own add_noise is on its sigma scale and DPM-Solver's knows only its inference
    # timesteps: a pair's norm must not depend on which sampler the pipeline was saved with
    rng = np.random.default_rng(0)
    rows = [ScanRow(i, f"image number {i}", image=rng.uniform(0, 1, (16, 16, 3)).astype(np.float32)) for i in range(3)]
    ddim = sample_noise_norms(tiny_pipe_with("DDIMScheduler"), rows, timestep=500)
    other = sample_noise_norms(tiny_pipe_with(sampler), rows, timestep=500)
    assert np.isfinite(ddim).all()
    np.testing.assert_array_equal(other, ddim)
