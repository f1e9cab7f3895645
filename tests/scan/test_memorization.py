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


def test_a_timestep_outside_the_schedule_or_without_signal_is_refused_before_any_shard(tmp_path, tiny_pipe_v, monkeypatch):
    import diffusers

    from diffmem.core.errors import InputError
    from diffmem.scan import DatasetScanner, ListSource

    rng = np.random.default_rng(0)
    src = ListSource(["a red circle", "a cat"], images=[rng.uniform(0, 1, (16, 16, 3)).astype(np.float32) for _ in range(2)])
    zsnr = diffusers.DDIMScheduler.from_config(tiny_pipe_v.scheduler.config, timestep_spacing="trailing", rescale_betas_zero_snr=True)
    pipe = type(tiny_pipe_v)(**{**tiny_pipe_v.components, "scheduler": zsnr})
    monkeypatch.setattr("diffmem.core.loading.load_pipeline", lambda *a, **k: pipe)  # a folder saved with that sampler
    for timestep, message in [(5000, r"timestep must lie in \[0, 999\] for this model's schedule, got 5000"),
                              (999, "at timestep 999 this model's schedule has no signal left")]:
        out = tmp_path / str(timestep)
        with pytest.raises(InputError, match=message):
            DatasetScanner(src, out, progress=False, checks=["memorization"], model="stand-in", timestep=timestep).scan()
        assert not list(out.rglob("*.parquet"))  # no shard written
    res = DatasetScanner(src, tmp_path / "ok", progress=False, checks=["memorization"], model="stand-in", timestep=900).scan()
    assert (res.rows["memorization_score"] > 0).all()
