"""The report and the interactive page in headless Chromium (Debian's package, driven by Selenium)."""

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import DIFFMEM, browser, console_errors, free_port, run_cli, wait_for_url

SHOTS = Path(os.environ.get("DIFFMEM_SCREENSHOTS", "test-screenshots"))


def _wait(driver, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def test_report_renders_without_console_errors(memlab_audit):
    out, _ = memlab_audit
    from selenium.webdriver.common.by import By

    driver = browser()
    try:
        driver.get((out / "report.html").resolve().as_uri())
        for sid in ("summary", "scores", "roc", "flagged"):
            el = driver.find_element(By.ID, sid)
            assert el.is_displayed() and el.size["height"] > 40, sid
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) > 5
        # every inlined image decoded: a broken data URI has naturalWidth 0
        assert all(driver.execute_script("return arguments[0].naturalWidth", im) > 0 for im in images)
        assert len(driver.find_elements(By.CSS_SELECTOR, ".diffmem-attribution .tok")) > 50
        assert console_errors(driver) == []
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / "report.png"))
        assert (SHOTS / "report.png").stat().st_size > 10_000
    finally:
        driver.quit()


def test_markup_in_prompts_shows_as_text_and_never_runs(tmp_path, memlab_manifest):
    from selenium.webdriver.common.by import By

    from diffmem.memlab import dataset as ds

    hostile = ['<script>window.__xss = 1</script> ' + ds.prompts(memlab_manifest, "verbatim")[0],
               ds.prompts(memlab_manifest, "verbatim")[1] + ' <img src=x onerror="window.__xss = 2">',
               "\u202e" + ds.prompts(memlab_manifest, "verbatim")[2]]  # would be laid out mirrored
    prompts = tmp_path / "p.txt"
    long = ds.prompts(memlab_manifest, "novel")[4] + " and" * 100  # longer than the model reads
    prompts.write_text("\n".join(hostile + ds.prompts(memlab_manifest, "novel")[:4] + [long]) + "\n", encoding="utf-8")
    reference = tmp_path / "r.txt"
    reference.write_text("\n".join(ds.prompts(memlab_manifest, "control")[:60]) + "\n")
    out = tmp_path / "out"
    r = run_cli("audit", "--out", out, "--prompts", prompts, "--reference", reference, "--fpr", "0.5",
                "--skip", "categorize", "--max-mitigate", "2", "--mitigate-generations", "1", "--mitigate-iters", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    html = (out / "report.html").read_text()
    assert "<script>window.__xss" not in html and "<img src=x" not in html
    assert html.count("(truncated)") == 1 and r.stderr.count("truncated to 77 tokens") == 1
    driver = browser()
    try:
        driver.get((out / "report.html").resolve().as_uri())
        assert driver.execute_script("return window.__xss === undefined")
        driver.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".prompt-text")]
        assert hostile[0] in shown and hostile[1] in shown  # shown as the text the user wrote
        assert "[U+202E]" + hostile[2][1:] in shown and "\u202e" not in html  # the override shown, not obeyed
        flagged = driver.find_element(By.ID, "flagged").text
        assert "<script>" in flagged or "onerror" in flagged  # at least one is flagged, its words shown as text
        assert console_errors(driver) == []
    finally:
        driver.quit()


def _shaded_words(driver, page: Path) -> list[tuple[str, float]]:
    from selenium.webdriver.common.by import By

    driver.get(page.resolve().as_uri())
    return [(t.text, t.rect["x"]) for t in driver.find_elements(By.CSS_SELECTOR, ".tok")]


def test_an_override_in_a_prompt_does_not_reorder_the_words_after_it(tmp_path):
    import numpy as np

    from diffmem.explain import AttributionResult

    def page(words, name):
        prompt = " ".join(words)
        res = AttributionResult(prompt, words, np.ones(len(words)), list(words), np.arange(1.0, len(words) + 1),
                                list(range(len(words))), "token_attribution", {}, [0])
        (tmp_path / name).write_text(f"<!doctype html><meta charset='utf-8'><p>{res.to_html()}</p>", encoding="utf-8")
        return tmp_path / name

    # a right-to-left override (CLIP makes it a word of its own) would lay out "circle on a blue square"
    # from right to left, each word mirrored, and shade them in that order
    driver = browser()
    try:
        shown = _shaded_words(driver, page(["a", "red", "\u202e", "circle", "on", "a", "blue", "square"], "rlo.html"))
        assert [w for w, _ in shown] == ["a", "red", "[U+202E]", "circle", "on", "a", "blue", "square"]
        xs = [x for _, x in shown]
        assert xs == sorted(xs), shown
        # right-to-left words themselves keep their reading order: only formatting characters are shown
        shown = _shaded_words(driver, page(["a", "red", "circle", "\u05e6\u05d1\u05e2", "\u05d0\u05d3\u05d5\u05dd", "on",
                                            "a", "square"], "hebrew.html"))
        xs = [x for _, x in shown]
        assert xs[0] < xs[1] < xs[2] < xs[4] < xs[3] < xs[5] < xs[6] < xs[7], shown
    finally:
        driver.quit()


@contextlib.contextmanager
def serving(*args):
    port = free_port()
    proc = subprocess.Popen([*DIFFMEM, "app", "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_url(f"http://127.0.0.1:{port}/", proc)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def app_server():
    with serving() as url:
        yield url


def test_app_scores_highlights_the_trigger_and_rescores_an_edit(app_server, memlab_manifest):
    from selenium.webdriver.common.by import By

    template = memlab_manifest["groups"]["template"][0]
    prompt = template["test_prompts"][0]["prompt"]
    trigger = template["trigger"].split()
    driver = browser()
    try:
        driver.get(app_server)
        _wait(driver, lambda d: "threshold" in d.find_element(By.ID, "info").text)
        box = driver.find_element(By.ID, "prompt")
        box.send_keys(prompt)
        driver.find_element(By.ID, "score-btn").click()
        _wait(driver, lambda d: d.find_element(By.ID, "verdict").text != "")
        score = float(driver.find_element(By.ID, "score").text)
        threshold = float(driver.find_element(By.ID, "threshold").text)
        assert score > threshold and driver.find_element(By.ID, "verdict").text == "memorized"
        toks = driver.find_elements(By.CSS_SELECTOR, "#tokens span.tok")
        strongest = max(toks, key=lambda t: float(t.get_attribute("data-share")))
        assert strongest.text in trigger  # the most strongly shaded word is the planted trigger
        top = driver.find_elements(By.CSS_SELECTOR, "#tokens span.tok.top")  # marked by position, once
        assert [t.get_attribute("data-index") for t in top] == [strongest.get_attribute("data-index")]
        # and how far it leads the runner-up, in words
        lead = driver.find_element(By.ID, "lead").text
        assert lead.startswith(f"strongest: {strongest.text}, ") and "ahead" in lead, lead

        # drop the trigger's words one click at a time; the page re-scores each edit
        for word in trigger:
            tok = next(t for t in driver.find_elements(By.CSS_SELECTOR, "#tokens span.tok") if t.text == word)
            old = driver.find_element(By.ID, "score").text
            tok.click()
            driver.find_element(By.ID, "drop-btn").click()
            _wait(driver, lambda d: d.find_element(By.ID, "score").text != old)
        assert driver.find_element(By.ID, "prompt").get_attribute("value") == " ".join(
            w for w in prompt.split() if w not in trigger)
        assert float(driver.find_element(By.ID, "score").text) < threshold
        assert driver.find_element(By.ID, "verdict").text == "not memorized"

        def score_anew(text):  # the shaded words of another prompt, once its score has come
            old = driver.find_element(By.ID, "score").text
            box.clear()
            box.send_keys(text)
            driver.find_element(By.ID, "score-btn").click()
            _wait(driver, lambda d: d.find_element(By.ID, "score").text != old)
            return driver.find_elements(By.CSS_SELECTOR, "#tokens span.tok")

        # the trigger's words twice over: the top word stands twice, and only the one ranked top is marked
        toks = score_anew(f"{prompt} {template['trigger']}")
        strongest = max(toks, key=lambda t: float(t.get_attribute("data-share")))
        top = driver.find_elements(By.CSS_SELECTOR, "#tokens span.tok.top")
        assert [t.text for t in toks].count(strongest.text) == 2
        assert [t.get_attribute("data-index") for t in top] == [strongest.get_attribute("data-index")]
        # its other occurrence ranks second, and the lead names it as the same word again
        ranked = sorted(toks, key=lambda t: float(t.get_attribute("data-share")), reverse=True)
        assert ranked[1].text == strongest.text
        assert f'ahead of the other "{strongest.text}"' in driver.find_element(By.ID, "lead").text
        assert console_errors(driver) == []
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / "app.png"))

        # a right-to-left override is shown by its code point, and the words after it stay in order;
        # the prompt keeps it, so dropping that word edits it out
        toks = score_anew(f"{prompt} \u202e{template['trigger']}")
        assert [t.text for t in toks] == prompt.split() + ["[U+202E]"] + trigger
        xs = [t.rect["x"] + t.rect["y"] * 10_000 for t in toks]  # reading order, across wrapped lines
        assert xs == sorted(xs)
        old = driver.find_element(By.ID, "score").text
        toks[len(prompt.split())].click()
        driver.find_element(By.ID, "drop-btn").click()
        _wait(driver, lambda d: d.find_element(By.ID, "score").text != old)
        assert driver.find_element(By.ID, "prompt").get_attribute("value") == f"{prompt} {template['trigger']}"

        # one mitigation at a time: the button waits for the job's end, here its cancelling
        button = driver.find_element(By.ID, "mitigate-btn")
        button.click()
        _wait(driver, lambda d: d.find_element(By.ID, "job").is_displayed())
        assert not button.is_enabled()
        driver.find_element(By.ID, "cancel-btn").click()
        _wait(driver, lambda d: d.find_element(By.ID, "job-message").text == "cancelled")
        _wait(driver, lambda d: button.is_enabled(), timeout=5)
        assert console_errors(driver) == []
    finally:
        driver.quit()


def test_app_page_without_a_mitigation_target_says_why_its_button_is_off(tiny_pipe_dir, tiny_calibration):
    from selenium.webdriver.common.by import By

    with serving("--model", str(tiny_pipe_dir), "--calibration", str(tiny_calibration)) as url:
        driver = browser()
        try:
            driver.get(url)
            _wait(driver, lambda d: "threshold" in d.find_element(By.ID, "info").text)
            button = driver.find_element(By.ID, "mitigate-btn")
            assert not button.is_enabled()
            assert "start the app with --audit DIR" in button.get_attribute("title")
            assert console_errors(driver) == []
        finally:
            driver.quit()


@contextlib.contextmanager
def path_proxy(upstream: str, prefix: str):
    """A reverse proxy serving ``upstream`` under ``prefix``, as Jupyter's /proxy/PORT/ does: the path
    loses the prefix, Host becomes the upstream's, Origin is passed on; anything else is a 404 page."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    netloc = urlsplit(upstream).netloc

    class Forward(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _forward(self):
            if not self.path.startswith(prefix):
                self.send_response(404)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<html><body>no such page</body></html>")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn = http.client.HTTPConnection(netloc, timeout=120)
            try:
                conn.request(self.command, "/" + self.path[len(prefix):], body=body or None, headers={**headers, "Host": netloc})
                reply = conn.getresponse()
            except OSError:  # the app has stopped: a proxy's own error page
                self.send_response(502)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<html><body>bad gateway</body></html>")
                return
            data = reply.read()
            self.send_response(reply.status)
            for k, v in reply.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()

        do_GET = do_POST = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_app_page_works_behind_a_proxy_path_prefix(tiny_pipe_dir, tiny_calibration):
    """Opened through a proxy under /proxy/PORT/ (JupyterHub, a remote machine), the page reaches the
    app's API through the proxy, and scores; the proxy's origin is the one --allow-origin names."""
    from selenium.webdriver.common.by import By

    port = free_port()
    # the proxy's port is taken first, so --allow-origin can name it
    with contextlib.ExitStack() as stack:
        origin = stack.enter_context(path_proxy(f"http://127.0.0.1:{port}", f"/proxy/{port}/"))
        proc = subprocess.Popen([*DIFFMEM, "app", "--port", str(port), "--model", str(tiny_pipe_dir), "--calibration",
                                 str(tiny_calibration), "--allow-origin", origin], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        stack.callback(lambda: (proc.terminate(), proc.wait(timeout=30)))
        wait_for_url(f"http://127.0.0.1:{port}/", proc)
        driver = browser()
        stack.callback(driver.quit)
        driver.get(f"{origin}/proxy/{port}/")
        _wait(driver, lambda d: "threshold" in d.find_element(By.ID, "info").text, timeout=60)
        driver.find_element(By.ID, "prompt").send_keys("a red circle on a blue square")
        driver.find_element(By.ID, "score-btn").click()
        _wait(driver, lambda d: d.find_element(By.ID, "verdict").text != "" or d.find_element(By.ID, "error").text != "",
              timeout=60)
        assert driver.find_element(By.ID, "error").text == ""
        assert driver.find_element(By.ID, "verdict").text in ("memorized", "not memorized")
        float(driver.find_element(By.ID, "score").text)
        assert console_errors(driver) == []
        # the app stopped: the proxy's error page is named as such, not as a JSON syntax error
        proc.terminate()
        proc.wait(timeout=30)
        driver.find_element(By.ID, "score-btn").click()
        _wait(driver, lambda d: d.find_element(By.ID, "error").text != "", timeout=30)
        error = driver.find_element(By.ID, "error").text
        assert error.startswith("HTTP 502") and "is it still running" in error and "api/score" in error, error


def test_app_mitigation_job_reports_progress_and_cancels(memlab_audit):
    # served with the audit's target calibration, whose loss steps and seeds the jobs take: the
    # target a first job calibrates on MemLab's reference set (40 s) is tested in test_app.py
    out, _ = memlab_audit
    calibrated = json.loads((out / "mitigate" / "target_calibration.json").read_text())["settings"]
    with serving("--audit", str(out)) as url:
        _mitigation_job_reports_progress_and_cancels(url, generations=calibrated["generations"],
                                                     target_source="the audit's target calibration")


def _mitigation_job_reports_progress_and_cancels(app_server, generations, target_source):
    import time
    import urllib.request

    def post(path, body):
        req = urllib.request.Request(app_server + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=60).read())

    def get(path):
        return json.loads(urllib.request.urlopen(app_server + path, timeout=60).read())

    job = post("api/mitigate", {"prompt": "a yellow cross in the center in a room"})["job"]
    t0 = time.time()
    while get(f"api/jobs/{job}")["progress"] == 0:
        assert time.time() - t0 < 60
        time.sleep(0.1)
    post(f"api/jobs/{job}/cancel", {})
    while (state := get(f"api/jobs/{job}"))["state"] not in ("cancelled", "done", "error"):
        assert time.time() - t0 < 120
        time.sleep(0.1)
    assert state["state"] == "cancelled" and state["result"] is None
    # a full run returns before / after images
    job = post("api/mitigate", {"prompt": "a yellow cross in the center in a room"})["job"]
    while (state := get(f"api/jobs/{job}"))["state"] not in ("done", "error", "cancelled"):
        assert time.time() - t0 < 300
        time.sleep(0.2)
    assert state["state"] == "done", state
    assert len(state["result"]["before"]) == len(state["result"]["after"]) == generations
    assert state["result"]["seeds"] == list(range(generations))
    assert state["result"]["before"][0].startswith("data:image/png;base64,")
    # a planted prompt starts above the first-step target and the optimization runs
    r = state["result"]
    assert r["initial_loss"] > r["target"] and r["final_loss"] < r["initial_loss"]
    assert r["after"] != r["before"]  # changed: from the RNA rewrite, optimized while above the target
    assert r["target_source"] == target_source
    for path in ("api/score", "api/mitigate"):  # bad requests: status 400 and what was wrong with them
        for body, why in (({"prompt": "   "}, "the prompt is empty"), ({"prompt": 5}, "the prompt must be text, got int 5"),
                          ({"text": "a cat"}, 'the request has no "prompt"'), (["a cat"], 'the request has no "prompt"'),
                          (b'{"prompt": "a cat \\ud83d"}', "the prompt holds a lone surrogate \\ud83d"),
                          (b"a cat", "the request body is not JSON")):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(app_server + path, data), timeout=60)
            assert e.value.code == 400 and why in json.loads(e.value.read())["error"], (path, body)
    # the served app refuses a page of another site, and a name it was not served as (DNS rebinding)
    port = app_server.rsplit(":", 1)[1].strip("/")
    for headers in ({"Origin": "https://evil.example"}, {"Host": f"evil.example:{port}"}):
        request = urllib.request.Request(app_server + "api/mitigate", json.dumps({"prompt": "a cat"}).encode(),
                                         {"Content-Type": "text/plain", **headers})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=60)
        assert e.value.code == 403 and "refused" in json.loads(e.value.read())["error"], headers
