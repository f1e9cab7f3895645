import pytest


def test_a_mitigation_the_app_has_no_target_for_is_refused_at_the_request(tiny_pipe_dir, tiny_calibration):
    from diffmem.core.errors import InputError
    from diffmem.report.app import AppState

    app = AppState(model=str(tiny_pipe_dir), calibration=tiny_calibration)
    assert app.score("a photo of a cat")["threshold"] == app.calibration.threshold  # it scores
    assert not app.can_mitigate
    with pytest.raises(InputError, match="mitigation needs a target on the scale of its loss"):
        app.start_mitigation("a photo of a cat")
    assert app.jobs == {}  # no job queued to fail later
