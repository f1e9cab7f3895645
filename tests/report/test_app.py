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


class RunAtOnce:
    """A job thread that runs in the request: each job has ended when it returns, its views read as it goes."""

    def __init__(self, target, args, daemon):
        self.target, self.args = target, args

    def start(self):
        self.target(*self.args)


def test_the_server_keeps_only_the_newest_ended_jobs(tiny_pipe_dir, tiny_calibration, monkeypatch):
    from diffmem.report import app as app_module

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


def _ask(app, method, path, headers, body=b""):
    """One request to an ASGI app, without a server: its status and decoded JSON or text body."""
    import asyncio
    import json

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 7860)}
    messages, delivered = [], False

    async def receive():
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        messages.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    text = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body").decode()
    return status, (json.loads(text) if text.startswith("{") else text)


def test_a_page_of_another_site_may_not_use_the_app():
    """A "simple" cross-site POST (text/plain) reaches a local server without the browser asking first,
    and a rebound DNS name makes another site same-origin to itself: both are refused, while the
    app's own page, its loopback names and clients without an Origin are served."""
    from diffmem.report.app import create_app

    class Scorer:  # stands in for the model: only the requests that get through reach it
        def __init__(self):
            self.calls = []

        def score(self, prompt):
            self.calls.append(prompt)
            return {"prompt": prompt}

    state = Scorer()
    app = create_app(state, served_as=("127.0.0.1",))
    own = {"host": "127.0.0.1:7860", "content-type": "application/json"}
    body = b'{"prompt": "a cat"}'
    assert _ask(app, "POST", "/api/score", own, body) == (200, {"prompt": "a cat"})  # curl, a script
    assert _ask(app, "POST", "/api/score", {**own, "origin": "http://127.0.0.1:7860"}, body)[0] == 200  # its page
    assert _ask(app, "POST", "/api/score", {"host": "localhost:7860", "origin": "http://localhost:7860"}, body)[0] == 200
    assert _ask(app, "GET", "/", {"host": "[::1]:7860"})[0] == 200
    for headers, why in (({"host": "127.0.0.1:7860", "origin": "https://evil.example", "content-type": "text/plain"},
                          "a page of another site (https://evil.example) may not use this app"),
                         ({"host": "127.0.0.1:7860", "origin": "null"}, "a page of another site (null)"),
                         ({"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:9999"}, "another site"),
                         ({"host": "evil.example:7860", "origin": "http://evil.example:7860"},
                          "addressed to 'evil.example:7860', which is not this app's address")):
        status, answer = _ask(app, "POST", "/api/score", headers, body)
        assert status == 403 and why in answer["error"], (headers, answer)
    status, answer = _ask(app, "GET", "/", {"host": "evil.example:7860"})  # nor may a rebound name read the page
    assert status == 403 and "not this app's address" in answer["error"]
    assert state.calls == ["a cat"] * 3
    # bound to every address, the app answers any name it is reached by, still only from its own page
    everywhere = create_app(state, served_as=("0.0.0.0",))
    assert _ask(everywhere, "GET", "/", {"host": "box.lan:7860"})[0] == 200
    assert _ask(everywhere, "POST", "/api/score", {"host": "box.lan:7860", "origin": "http://evil.example"}, body)[0] == 403
    # a proxy serving the page over https, with the Host kept or rewritten to the app's: allowed by name
    assert _ask(app, "POST", "/api/score", {"host": "127.0.0.1:7860", "origin": "https://127.0.0.1:7860"}, body)[0] == 200
    proxied = create_app(state, served_as=("127.0.0.1",), allowed_origins=["https://Hub.example.org/"])
    for host in ("hub.example.org", "127.0.0.1:7860"):
        assert _ask(proxied, "POST", "/api/score", {"host": host, "origin": "https://hub.example.org"}, body)[0] == 200
    assert _ask(proxied, "POST", "/api/score", {"host": "hub.example.org", "origin": "https://evil.example"}, body)[0] == 403
    assert len(state.calls) == 6  # the 3 above, the https page and the proxied two


@pytest.mark.parametrize("origin", ["hub.example.org", "ftp://hub.example.org", "https://hub.example.org/app",
                                    "https://hub.example.org:port", "https://me@hub.example.org", ""])
def test_an_allowed_origin_that_is_not_one_is_refused_before_the_model_loads(origin):
    from diffmem.core.errors import InputError
    from diffmem.report.app import create_app

    with pytest.raises(InputError, match="--allow-origin takes a page's origin, a scheme and a host"):
        create_app(None, allowed_origins=[origin])


def test_a_page_address_given_as_an_allowed_origin_is_answered_with_its_origin():
    from diffmem.core.errors import InputError
    from diffmem.report.app import check_origins

    with pytest.raises(InputError, match=r"got 'https://Hub.example.org:8443/user/me/proxy/7860/\?x=1'; "
                                         r"for this page, https://Hub.example.org:8443$"):
        check_origins(["https://Hub.example.org:8443/user/me/proxy/7860/?x=1"])
    for nothing_to_offer in ("hub.example.org", "ftp://hub.example.org/x", "https://me@hub.example.org/x"):
        with pytest.raises(InputError) as refused:
            check_origins([nothing_to_offer])
        assert "for this page" not in str(refused.value)


def test_the_printed_address_of_an_ipv6_host_is_a_url():
    from diffmem.report.app import page_url

    assert page_url("::1", 7860) == "http://[::1]:7860/" and page_url("::", 80) == "http://[::]:80/"
    assert page_url("127.0.0.1", 7860) == "http://127.0.0.1:7860/" and page_url("box.lan", 8080) == "http://box.lan:8080/"


def test_a_first_mitigation_calibrates_its_target_in_the_first_half_of_its_bar_and_once(tiny_pipe_dir, tiny_calibration,
                                                                                      monkeypatch):
    """Without an audit, the first job calibrates the target on the reference set: its bar's first
    half, cancellable there with nothing kept, after which the next job calibrates afresh and the
    one after that reuses its target."""
    from diffmem.mitigate import EmbeddingOptimization
    from diffmem.report import app as app_module

    app = app_module.AppState(model=str(tiny_pipe_dir), calibration=tiny_calibration, generations=2)
    monkeypatch.setattr(app_module.threading, "Thread", RunAtOnce)
    reference = [f"a reference photo number {i}" for i in range(10)]
    monkeypatch.setattr(app, "_reference", reference)
    real = EmbeddingOptimization.calibrated.__func__
    seen, cancelling = [], [True]

    def calibrated(cls, pipe, ref, on_progress=None, **kw):
        def tick(n, of):
            job = list(app.jobs.values())[-1]
            if cancelling:  # at the first reference batch
                app.cancel(job["id"])
            on_progress(n, of)
            seen.append((job["progress"], job["message"]))
        return real(cls, pipe, ref, on_progress=tick, **kw)

    monkeypatch.setattr(EmbeddingOptimization, "calibrated", classmethod(calibrated))
    first = app.job_view(app.start_mitigation("a photo of a cat"))
    assert first["state"] == "cancelled" and first["result"] is None
    assert app._mitigator_cache is None and app._target_calibration is None  # nothing half-calibrated is kept
    cancelling.clear()
    seen.clear()
    second = app.job_view(app.start_mitigation("a photo of a cat"))
    assert second["state"] == "done", second
    assert seen and all(0 < progress <= 0.5 for progress, _ in seen)
    assert seen[-1][0] == 0.5 and all(m.startswith("calibrating the mitigation target: ") for _, m in seen)
    result = second["result"]
    assert result["target_source"].endswith(f"on {len(reference)} reference prompts")
    assert result["target"] == app._target_calibration.threshold and app._target_calibration.n_reference == len(reference)
    assert result["seeds"] == [0, 1] and len(result["before"]) == len(result["after"]) == 2
    seen.clear()
    third = app.job_view(app.start_mitigation("a photo of a dog"))
    assert third["state"] == "done" and seen == []  # calibrated once
    assert third["result"]["target"] == result["target"]
