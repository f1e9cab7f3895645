import pytest


@pytest.fixture(scope="module")
def tiny_app(tiny_pipe_dir, tmp_path_factory):
    """The app on a model that is not MemLab, with a calibration (made with the app's own detection
    settings) but no audit: it can score prompts and has no target to mitigate them to."""
    from diffmem.core.loading import load_pipeline, sampler_defaults
    from diffmem.detect import Calibration, NoiseNormDetector
    from diffmem.report.app import AppState
    from diffmem.report.audit import AuditSettings

    pipe = load_pipeline(str(tiny_pipe_dir))
    d = sampler_defaults(pipe)
    detector = NoiseNormDetector(pipe, d["num_inference_steps"], d["guidance_scale"], generations=1, seed=0,
                                 steps=[x for x in AuditSettings.steps if x < d["num_inference_steps"]])
    path = tmp_path_factory.mktemp("app") / "calibration.json"
    Calibration.fit(detector.score([f"a photo number {i}" for i in range(10)], progress=False), fpr=0.1).save(path)
    return AppState(model=str(tiny_pipe_dir), calibration=path)


def test_a_mitigation_the_app_has_no_target_for_is_refused_at_the_request(tiny_app):
    from diffmem.core.errors import InputError

    assert tiny_app.score("a photo of a cat")["threshold"] == tiny_app.calibration.threshold  # it scores
    with pytest.raises(InputError, match="mitigation needs a target on the scale of its loss"):
        tiny_app.start_mitigation("a photo of a cat")
    assert tiny_app.jobs == {}  # no job queued to fail later
