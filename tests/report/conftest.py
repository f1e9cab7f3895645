import os
import shutil
import socket
import time
from pathlib import Path

import forked_cli
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
DIFFMEM = forked_cli.PLAIN


def browser():
    """Headless Debian Chromium through Selenium. CI installs chromium (``.ci/run``): a missing
    browser fails there; elsewhere the browser tests skip with the reason."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium / chromedriver not installed: .ci/run installs Debian's chromium and chromium-driver")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,1600"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, timeout=900, env=None):
    return forked_cli.run_cli(*args, timeout=timeout, env=env)


def wait_for_url(url: str, proc, timeout: float = 180) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s")


# A small MemLab audit shared by the report tests: MemLab's built-in prompt and reference sets,
# every stage, with the stages' sample sizes cut down for time.
SMALL = ["--max-explain", "12", "--max-categorize", "2", "--categorize-n", "2", "--max-mitigate", "2", "--no-grid"]


@pytest.fixture(scope="session")
def memlab_audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "out"
    r = run_cli("audit", "--out", out, *SMALL, "--mitigate-generations", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.fixture(scope="session")
def tiny_calibration(tiny_pipe_dir, tmp_path_factory):
    """A calibration for the tiny random pipeline made with the app's own detection settings: the app
    on a model that is not MemLab, with no audit, scores prompts with it and has no mitigation target."""
    from diffmem.core.loading import load_pipeline, sampler_defaults
    from diffmem.detect import Calibration, NoiseNormDetector
    from diffmem.report.audit import AuditSettings

    pipe = load_pipeline(str(tiny_pipe_dir))
    d = sampler_defaults(pipe)
    detector = NoiseNormDetector(pipe, d["num_inference_steps"], d["guidance_scale"], generations=1, seed=0,
                                 steps=[x for x in AuditSettings.steps if x < d["num_inference_steps"]])
    path = tmp_path_factory.mktemp("app") / "calibration.json"
    Calibration.fit(detector.score([f"a photo number {i}" for i in range(10)], progress=False), fpr=0.1).save(path)
    return path
