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


def test_the_server_keeps_only_the_newest_ended_jobs(tiny_pipe_dir, tiny_calibration, monkeypatch):
    from diffmem.report import app as app_module

    class RunAtOnce:  # the job runs in the request, so each has ended before the next starts
        def __init__(self, target, args, daemon):
            self.target, self.args = target, args

        def start(self):
            self.target(*self.args)

    app = app_module.AppState(model=str(tiny_pipe_dir), calibration=tiny_calibration)
    monkeypatch.setattr(app_module, "KEPT_JOBS", 3)
    monkeypatch.setattr(app_module.threading, "Thread", RunAtOnce)
    monkeypatch.setattr(app, "_reference", ["a reference prompt"])  # a target could be calibrated
    outcomes = iter(["running", "done", "error", "cancelled", "done", "done"])
    monkeypatch.setattr(app, "_mitigate", lambda job: job.update(state=next(outcomes)))
    ids = [app.start_mitigation(f"prompt {i}") for i in range(6)]
    # the running one stays whatever its age; of the ended ones, the newest three
    assert list(app.jobs) == [ids[0], ids[3], ids[4], ids[5]]
    assert app.job_view(ids[5])["state"] == "done"


def test_a_queued_job_is_cancelled_at_once_and_never_runs(tiny_pipe_dir, tiny_calibration, monkeypatch):
    import threading

    from diffmem.report import app as app_module

    threads = []

    class Recorded(threading.Thread):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            threads.append(self)

    app = app_module.AppState(model=str(tiny_pipe_dir), calibration=tiny_calibration)
    monkeypatch.setattr(app_module.threading, "Thread", Recorded)
    monkeypatch.setattr(app, "_reference", ["a reference prompt"])
    asked = []
    monkeypatch.setattr(app, "_mitigator", lambda on_progress=None: asked.append(1))
    with app.lock:  # another job holds the model
        job = app.start_mitigation("a photo of a cat")
        assert app.job_view(job)["state"] == "queued"
        app.cancel(job)
        assert app.job_view(job)["state"] == "cancelled"  # at once, not when its turn comes
    threads[0].join(timeout=60)  # its turn: it returns without running
    assert not threads[0].is_alive()
    assert asked == [] and app.job_view(job)["state"] == "cancelled" and app.job_view(job)["result"] is None


def test_an_audit_folder_without_its_detect_stage_is_named_as_such(tmp_path, monkeypatch):
    from diffmem.core import loading
    from diffmem.core.errors import InputError
    from diffmem.report.app import AppState

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(InputError, match="is not an audit folder with a finished detect stage"):
            AppState(audit=folder)


def test_a_score_asked_while_a_job_holds_the_model_reports_its_wait_apart(tiny_pipe_dir, tiny_calibration):
    import threading
    import time

    from diffmem.report.app import AppState

    app = AppState(model=str(tiny_pipe_dir), calibration=tiny_calibration)
    alone = app.score("a photo of a cat")
    assert alone["waited"] < 1.0
    held = threading.Event()

    def job():  # a mitigation job holding the model for 3 s
        with app.lock:
            held.set()
            time.sleep(3.0)

    t = threading.Thread(target=job)
    t.start()
    held.wait(10)
    waited = app.score("a photo of a cat")
    t.join()
    assert waited["waited"] > 2.0  # the job's time, said as a wait
    assert waited["seconds"] < 2.0  # not counted as the scoring's own time
    assert waited["score"] == alone["score"]
