"""``diffmem app``: a local page to edit a prompt and watch its memorization score and attribution.

A small Starlette (ASGI) app served by uvicorn on 127.0.0.1, with one plain HTML page and a JSON
API. Chosen over Gradio: two small dependencies instead of a large framework, no assets fetched at
run time, and a page whose elements a browser test can address directly.

- ``POST /api/score {"prompt"}``: the noise norm (the audit's scored steps) against the calibrated
  threshold, and the words' attribution (Wen et al.'s token gradients) from the same pass: about
  half a second on MemLab on a CPU.
- ``POST /api/mitigate {"prompt"}``: a background job (generate before, optimize the prompt
  embedding, generate after), polled at ``GET /api/jobs/{id}`` and stopped by
  ``POST /api/jobs/{id}/cancel`` between images or optimization iterations (a queued job at once).
  The server keeps the newest ``KEPT_JOBS`` ended jobs.
Model calls are serialised by one lock: the model is not shared between concurrent requests.
Requests from a page of another site are refused (``request_refusal``): the API starts minutes of
work and returns what the model makes of a prompt.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.prompts import lone_surrogate

MAX_PROMPT_CHARS = 2000
KEPT_JOBS = 100  # ended mitigation jobs whose results the server keeps (a few hundred KB of images each)


class Cancelled(Exception):
    pass


def _png(img: np.ndarray, scale: int = 4) -> str:
    from PIL import Image

    im = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


NO_MITIGATION_TARGET = ("mitigation needs a target on the scale of its loss: start the app with --audit DIR "
                        "from an audit that ran its mitigation stage")


class AppState:
    """The model, its calibration and the running jobs."""

    def __init__(self, model: str = "memlab", calibration: str | Path | None = None, audit: str | Path | None = None,
                 seed: int = 0, generations: int = 4, progress: bool = False, device: str = "cpu", dtype: str = "float32",
                 lora: str | Path | list | None = None, lora_scale: float | list[float] = 1.0, textual_inversion: tuple = ()):
        from ..core.loading import load_pipeline, sampler_defaults
        from ..detect import Calibration, NoiseNormDetector

        if calibration is not None and audit is not None:
            raise InputError("give --calibration or --audit, not both")
        self._target_calibration = None  # the mitigation target's own calibration (see _mitigator)
        from .audit import AuditSettings

        # the positions the audit's mitigation optimized and the rewrite it started from
        self._mitigate_positions, self._mitigate_rewrite = AuditSettings.mitigate_positions, AuditSettings.mitigate_rewrite
        if audit is not None:
            done = Path(audit) / "mitigate" / "mitigation.json"
            if done.exists():
                done_settings = json.loads(done.read_text())["settings"]
                self._mitigate_positions = done_settings.get("positions", "all")
                self._mitigate_rewrite = done_settings.get("rewrite")
            calibration = Path(audit) / "detect" / "calibration.json"
            if not calibration.exists():  # said before the model loads, and as what the folder is not
                raise InputError(f"{audit} is not an audit folder with a finished detect stage (no detect/calibration.json): "
                                 "give the --out folder of `diffmem audit`")
            if (Path(audit) / "mitigate" / "target_calibration.json").exists():
                self._target_calibration = Calibration.load(Path(audit) / "mitigate" / "target_calibration.json")
        cal = Calibration.load(calibration) if calibration is not None else None
        if cal is not None and cal.method != NoiseNormDetector.method:  # before the model loads
            raise InputError(f"{calibration} calibrates the {cal.method.replace('_', ' ')} detector; the app scores the "
                             "noise norm as a prompt is edited: give a calibration of it (`diffmem detect "
                             "--calibrate-with`, or an audit's with --detect-method noise-norm)")
        self.pipe = load_pipeline(model, device=device, dtype=dtype, lora=lora, lora_scale=lora_scale,
                                  textual_inversion=textual_inversion)
        self.sampler = sampler_defaults(self.pipe)
        self.seed, self.generations = seed, generations
        if cal is not None:  # score exactly as the calibration was made
            cs = cal.settings
            self.sampler = {"num_inference_steps": cs["num_inference_steps"], "guidance_scale": cs["guidance_scale"]}
            steps, self.seed = cs["steps"], cs["seed"]
        else:
            steps = [x for x in AuditSettings.steps if x < self.sampler["num_inference_steps"]]
        self.detector = NoiseNormDetector(self.pipe, self.sampler["num_inference_steps"], self.sampler["guidance_scale"],
                                          steps=steps, generations=1, seed=self.seed)
        self._reference = None
        if cal is not None:
            self.calibration = cal
        else:  # MemLab: calibrate on its reference set, as the audit does
            from .audit import memlab_audit_prompts
            from ..memlab.verify import load_manifest

            try:
                manifest = load_manifest(model)
            except InputError:
                raise InputError(f"{model} is not a MemLab model: give --calibration FILE or --audit DIR") from None
            self._reference = memlab_audit_prompts(manifest).reference
            self.calibration = Calibration.fit(self.detector.score(self._reference, progress=progress))
        self._mitigator_cache = None
        probe = self.detector.score(["a probe"])
        self.calibration.check(probe)  # a calibration made with other settings or for another model is refused
        self.lock = threading.Lock()
        self.jobs: dict[str, dict] = {}

    def _check(self, prompt) -> str:
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be text, got {type(prompt).__name__} {json.dumps(prompt)[:40]}")
        if not prompt.strip():
            raise InputError("the prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        if problem := lone_surrogate(prompt):
            raise InputError(f"the prompt {problem}")
        return prompt

    def score(self, prompt: str) -> dict:
        import warnings

        from ..core.denoise import PromptTruncationWarning
        from ..explain import TokenAttribution

        prompt = self._check(prompt)
        asked = time.time()
        with self.lock, warnings.catch_warnings(record=True) as caught:
            # the scoring's own time, apart from the wait for a mitigation job holding the model: a
            # score asked mid-job would otherwise report the job's minutes as its own
            t0 = time.time()
            warnings.simplefilter("always", PromptTruncationWarning)
            a = TokenAttribution(self.pipe, self.sampler["num_inference_steps"], self.sampler["guidance_scale"],
                                 steps=self.detector.settings.steps, generations=1, seed=self.seed).attribute(prompt)
        shares = a._shares()
        thr = self.calibration.threshold
        return {"prompt": prompt, "score": a.detection_score, "threshold": thr, "memorized": a.detection_score > thr,
                "words": [{"before": b, "text": w, "score": float(sc), "share": float(sh)}
                          for (b, w), sc, sh in zip(a.segments(), a.word_scores, shares)],
                "top_word": a.top_word, "top_index": a.top_index, "lead": a.lead_text(), "seconds": time.time() - t0,
                "waited": t0 - asked,
                "warnings": [str(w.message) for w in caught],
                "settings": {**self.detector.settings.to_dict(), "fpr": self.calibration.fpr}}

    # -- mitigation jobs -----------------------------------------------------------------------
    @property
    def can_mitigate(self) -> bool:
        """Whether a mitigation target is at hand: the audit's, or one to calibrate on MemLab's reference set."""
        return not (self._mitigator_cache is None and self._target_calibration is None and self._reference is None)

    def start_mitigation(self, prompt: str) -> str:
        prompt = self._check(prompt)
        if not self.can_mitigate:
            raise InputError(NO_MITIGATION_TARGET)  # said to the request, not after a queued job has waited its turn
        job = {"id": uuid.uuid4().hex[:12], "prompt": prompt, "state": "queued", "progress": 0.0, "message": "queued",
               "cancel": threading.Event(), "result": None, "error": None}
        self._forget_old_jobs()
        self.jobs[job["id"]] = job
        threading.Thread(target=self._mitigate, args=(job,), daemon=True).start()
        return job["id"]

    def _forget_old_jobs(self) -> None:
        """Keep the newest KEPT_JOBS ended jobs: each holds its images, and a page left open for days
        would otherwise grow the server without end. Queued and running jobs are always kept."""
        ended = [k for k, j in self.jobs.items() if j["state"] in ("done", "cancelled", "error")]  # oldest first
        for k in ended[: max(0, len(ended) - KEPT_JOBS + 1)]:
            del self.jobs[k]

    def _mitigate(self, job: dict) -> None:
        from ..core.generate import generate

        kw = dict(num_inference_steps=self.sampler["num_inference_steps"], guidance_scale=self.sampler["guidance_scale"])
        # set under the lock, before the first tick: where the bar starts (a first job calibrates the
        # target on the reference set in the first half), and the total once the mitigator is known
        done = total = 0
        start = 0.0

        def tick(message: str):
            nonlocal done
            if job["cancel"].is_set():
                raise Cancelled()
            done += 1
            job["progress"], job["message"] = start + (1 - start) * done / total, message

        def calibration_tick(n: int, of: int):
            if job["cancel"].is_set():
                raise Cancelled()  # nothing is cached: the next job calibrates afresh
            job["progress"], job["message"] = start * n / of, f"calibrating the mitigation target: {n}/{of} reference generations"

        try:
            with self.lock:
                if job["cancel"].is_set():  # cancelled while queued: nothing to undo
                    raise Cancelled()
                job["state"] = "running"
                if self._mitigator_cache is None and self._target_calibration is None:
                    start, job["message"] = 0.5, "calibrating the mitigation target"
                m = self._mitigator(on_progress=calibration_tick)
                seeds = list(m.seeds())  # after = the same seeds as the loss was optimized over
                # loss evaluations: the optimization's, and the prompt's own first when it starts from a rewrite
                total = 2 * len(seeds) + m.settings["max_iters"] + 1 + (m.settings["rewrite"] is not None)
                before = []
                for s in seeds:
                    tick(f"generating before, seed {s}")
                    before.append(generate(self.pipe, [job["prompt"]], [s], **kw)[0, 0])

                def on_loss(it, value, text):  # with a rewrite, its own iteration 0 follows the prompt's
                    source = "" if text == job["prompt"] else f" from the rewrite {text!r}"
                    tick(f"optimizing{source}: iteration {it}, loss {value:.4g}")

                emb, traj, steps, reached = m.optimize(job["prompt"], callback=on_loss)
                after = []
                for s in seeds:
                    tick(f"generating after, seed {s}")
                    after.append(before[len(after)] if not m.changes(traj, steps, m.settings) else
                                 generate(self.pipe, [job["prompt"]], [s], prompt_embeds=emb, **kw)[0, 0])
            job["result"] = {"before": [_png(i) for i in before], "after": [_png(i) for i in after], "seeds": seeds,
                             "initial_loss": traj[0], "final_loss": traj[-1], "iterations": steps, "reached_target": reached,
                             "target": m.settings["target"], "target_source": m.settings["target_source"]}
            job["state"], job["progress"], job["message"] = "done", 1.0, "done"
        except Cancelled:
            job["state"], job["message"] = "cancelled", "cancelled"
        except Exception as e:  # reported to the page, not lost in a thread
            job["state"], job["error"], job["message"] = "error", str(e), f"error: {e}"

    def _mitigator(self, on_progress=None):
        """The embedding optimization, its target on the scale of its own loss (the norm over its
        loss steps and the job's seeds): the detection threshold is on the score of the scored steps, another
        scale. From the audit's target calibration, else calibrated once on MemLab's reference set."""
        from ..mitigate import EmbeddingOptimization

        if self._mitigator_cache is None:
            kw = dict(generations=self.generations, seed=self.seed, num_inference_steps=self.sampler["num_inference_steps"],
                      guidance_scale=self.sampler["guidance_scale"], positions=self._mitigate_positions,
                      rewrite=self._mitigate_rewrite)
            if self._target_calibration is not None:
                # the loss the audit's target was calibrated on: its steps (0..k-1) and seeds
                tc = self._target_calibration.settings
                kw.update(loss_steps=len(tc.get("steps") or [0]), generations=tc.get("generations", self.generations),
                          seed=tc.get("seed", self.seed))
                m = EmbeddingOptimization.from_calibration(self.pipe, self._target_calibration, source="the audit's target calibration", **kw)
            elif self._reference is not None:
                from .audit import AuditSettings

                kw["loss_steps"] = AuditSettings().mitigation_loss_steps(self.sampler["num_inference_steps"])  # as an audit would
                m, self._target_calibration = EmbeddingOptimization.calibrated(self.pipe, self._reference, fpr=self.calibration.fpr,
                                                                               on_progress=on_progress, **kw)
            else:
                raise InputError(NO_MITIGATION_TARGET)
            self._mitigator_cache = m
        return self._mitigator_cache

    def cancel(self, job_id: str) -> None:
        """Stop a job at its next image or iteration; a queued job is cancelled at once, rather than
        showing "queued" until the jobs before it end."""
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        job["cancel"].set()
        if job["state"] == "queued":  # its thread sees the flag when its turn comes, and returns
            job["state"], job["message"] = "cancelled", "cancelled"

    def job_view(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return {k: job[k] for k in ("id", "state", "progress", "message", "result", "error")}


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
EVERY_ADDRESS = ("0.0.0.0", "::", "")  # bound to every address: any name may reach the app


def check_origins(origins) -> tuple[str, ...]:
    """``--allow-origin`` values, each a scheme and a host (and port): "https://hub.example.org"."""
    from urllib.parse import urlsplit

    checked = []
    for origin in origins:
        try:
            parts = urlsplit(origin)
            site = parts.scheme in ("http", "https") and parts.hostname and not parts.username
            parts.port  # raises ValueError for a port that is not a number
        except ValueError:
            site = False
        if not (site and parts.path in ("", "/") and not (parts.query or parts.fragment)):
            # the page's whole address is what a user has at hand, behind a proxy's path above all
            hint = f"; for this page, {parts.scheme}://{parts.netloc}" if site else ""
            raise InputError(f"--allow-origin takes a page's origin, a scheme and a host with its port if any "
                             f"(https://hub.example.org, http://10.0.0.5:8888), got {origin!r}{hint}")
        checked.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(checked)


def request_refusal(method: str, host: str | None, origin: str | None, served_as: tuple[str, ...],
                    allowed_origins: tuple[str, ...] = ()) -> str | None:
    """Why the app refuses a request, or None. A browser sends another site's POST with its Origin,
    and a "simple" one (text/plain, a form) without asking first, so a page open in another tab
    could start mitigation jobs here: an Origin whose host is not the request's Host is refused for
    all but GET / HEAD (the scheme is not compared: a proxy may serve the page over https). A site
    whose name was made to resolve to this machine (DNS rebinding) is same-origin to itself but
    sends its own name as Host, which is refused unless the app answers every address. Clients that
    are not browsers (curl, scripts) send no Origin and are served. ``allowed_origins`` (checked by
    ``check_origins``): pages the user serves the app through, a proxy's say, accepted with their names."""
    from urllib.parse import urlsplit

    if host is not None and not any(name in EVERY_ADDRESS for name in served_as):
        try:
            name = urlsplit("//" + host).hostname
        except ValueError:
            name = None
        names = {*LOOPBACK_NAMES, *(n.lower() for n in served_as), *(urlsplit(o).hostname for o in allowed_origins)}
        if name not in names:
            return (f"refused: the request was addressed to {host!r}, which is not this app's address "
                    f"({', '.join(dict.fromkeys((*served_as, *LOOPBACK_NAMES)))}); open the app at the address it printed, "
                    "or give the page you open it through as --allow-origin")
    if method not in ("GET", "HEAD") and origin is not None and origin.lower() not in allowed_origins:
        try:
            same = host is not None and urlsplit(origin).netloc.lower() == host.lower()
        except ValueError:
            same = False
        if not same:
            return (f"refused: a page of another site ({origin}) may not use this app; open the app's own page "
                    f"(http://{host or 'HOST:PORT'}/), or give a page you trust as --allow-origin")
    return None


def create_app(state: AppState, served_as: tuple[str, ...] = ("127.0.0.1",), allowed_origins: tuple[str, ...] = ()):
    """The app, answering requests addressed to the names in ``served_as`` (the --host given and the
    address bound) or to this machine's loopback names, from its own page, from ``allowed_origins``
    or from clients that are not browsers."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    allowed_origins = check_origins(allowed_origins)

    class OwnPageOnly:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                why = request_refusal(scope["method"], headers.get("host"), headers.get("origin"), served_as,
                                      allowed_origins)
                if why is not None:
                    await JSONResponse({"error": why}, status_code=403)(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    def bad(msg: str, code: int = 400):
        return JSONResponse({"error": msg}, status_code=code)

    async def prompt_of(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise InputError('the request body is not JSON: send {"prompt": "..."}') from None
        if not isinstance(body, dict) or "prompt" not in body:
            raise InputError('the request has no "prompt": send {"prompt": "..."}')
        return body["prompt"]

    async def page(request: Request):
        return HTMLResponse(PAGE)

    async def score(request: Request):
        from starlette.concurrency import run_in_threadpool

        try:
            return JSONResponse(await run_in_threadpool(state.score, await prompt_of(request)))
        except InputError as e:
            return bad(str(e))

    async def mitigate(request: Request):
        try:
            return JSONResponse({"job": state.start_mitigation(await prompt_of(request))})
        except InputError as e:
            return bad(str(e))

    async def job(request: Request):
        try:
            return JSONResponse(state.job_view(request.path_params["job_id"]))
        except KeyError:
            return bad("no such job", 404)

    async def cancel(request: Request):
        try:
            state.cancel(request.path_params["job_id"])
        except KeyError:
            return bad("no such job", 404)
        return JSONResponse({"job": request.path_params["job_id"], "cancelling": True})

    async def info(request: Request):
        return JSONResponse({"threshold": state.calibration.threshold, "fpr": state.calibration.fpr,
                             "model": state.calibration.model, "settings": state.detector.settings.to_dict(),
                             "mitigation": None if state.can_mitigate else NO_MITIGATION_TARGET})

    return Starlette(routes=[Route("/", page), Route("/api/info", info), Route("/api/score", score, methods=["POST"]),
                             Route("/api/mitigate", mitigate, methods=["POST"]), Route("/api/jobs/{job_id}", job),
                             Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"])],
                     middleware=[Middleware(OwnPageOnly)])


def bind(host: str = "127.0.0.1", port: int = 7860) -> socket.socket:
    """Take the page's address before the model loads, so that a port in use or an unknown host is
    an error at once rather than after the model and its calibration have loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = e.strerror or str(e)
        raise InputError(f"cannot serve on {host}:{port}: {why}; choose another --port or --host") from None
    return sock


def page_url(host: str, port: int) -> str:
    """The address to open, printed when the app starts: an IPv6 address in brackets, as a URL needs."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(state: AppState, sock: socket.socket, host: str | None = None, allowed_origins: tuple[str, ...] = ()) -> None:
    """Serve the page on a socket from ``bind``, to requests addressed to ``host`` (the name given to
    ``bind``), the address it bound, or this machine's loopback names (``create_app``)."""
    import uvicorn

    served_as = tuple(dict.fromkeys(n for n in (host, sock.getsockname()[0]) if n is not None))
    app = create_app(state, served_as, allowed_origins)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


# The page builds every user-derived node with textContent, never innerHTML: a prompt is shown as text.
PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>diffmem: prompt memorization</title>
<style>
 body { font: 15px/1.5 system-ui, sans-serif; max-width: 900px; margin: 1.5em auto; padding: 0 1em; color: #222; }
 textarea { width: 100%; font: inherit; padding: .4em; box-sizing: border-box; }
 button { font: inherit; padding: .25em .8em; margin-right: .4em; }
 #tokens span.tok { cursor: pointer; border-radius: 3px; padding: 0 1px; }
 #tokens span.tok:hover { outline: 1px solid #333; }
 #verdict.mem { color: #c22; font-weight: 700; } #verdict.ok { color: #2a7; font-weight: 700; }
 #bar { height: 14px; background: #eee; position: relative; margin: .4em 0; max-width: 600px; }
 #bar div { position: absolute; top: 0; bottom: 0; } #fill { background: #d63; left: 0; } #thr { width: 2px; background: #000; }
 #menu { display: none; border: 1px solid #aaa; background: #fff; padding: .4em; position: absolute; box-shadow: 0 2px 6px #0003; }
 .imgs img { image-rendering: pixelated; margin: 2px; width: 96px; } .muted { color: #666; font-size: .85em; }
 progress { width: 300px; }
</style></head>
<body>
<h1>Does this prompt replicate training data?</h1>
<p class="muted" id="info">loading…</p>
<textarea id="prompt" rows="2" placeholder="type a prompt"></textarea>
<p><button id="score-btn">Score</button><button id="mitigate-btn">Before / after mitigation</button> <span class="muted" id="score-status"></span></p>
<div id="result" hidden>
 <p>score <b id="score"></b> against threshold <b id="threshold"></b>: <span id="verdict"></span> <span class="muted" id="timing"></span></p>
 <div id="bar"><div id="fill"></div><div id="thr"></div></div>
 <p id="tokens"></p>
 <p class="muted" id="lead"></p>
 <p class="muted">click a word to drop or replace it; the prompt is re-scored</p>
 <p class="muted" id="warnings"></p>
</div>
<div id="menu"><button id="drop-btn">drop</button> or replace with <input id="replace-input" size="12"><button id="replace-btn">replace</button></div>
<div id="job" hidden><progress id="job-progress" max="1" value="0"></progress> <span id="job-message"></span> <button id="cancel-btn">Cancel</button></div>
<div id="images" hidden><h3>before</h3><div class="imgs" id="before"></div><h3>after</h3><div class="imgs" id="after"></div><p class="muted" id="mit-info"></p></div>
<p id="error" style="color:#c22"></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let current = null, chosen = null, job = null;
async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  // a proxy in between answers with its own page when the app has stopped or the path is not passed on
  let data;
  try { data = JSON.parse(await r.text()); } catch (e) {
    throw new Error(`HTTP ${r.status} ${r.statusText}: not an answer of the app; is it still running, and does a proxy in between pass ${path} on?`);
  }
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
// bidirectional formatting characters shown by code point, not obeyed, as in diffmem's HTML files
// (core.prompts.reveal_bidi_controls): one would reorder the words after it. The data keeps them,
// so an edit sends them back
const shown = (t) => t.replace(/[\u202A-\u202E\u2066-\u2069]/g,
  (c) => "[U+" + c.charCodeAt(0).toString(16).toUpperCase() + "]");
function showError(e) { $("error").textContent = e ? shown(String(e.message || e)) : ""; }
async function score() {
  const prompt = $("prompt").value;
  showError(null);
  $("score-btn").disabled = true;
  // the model scores one request at a time: a running mitigation job keeps it until its end
  $("score-status").textContent = job ? "scoring when the mitigation job ends (Cancel it to score now)" : "";
  try {
    const d = await api("api/score", {prompt});
    current = d;
    $("result").hidden = false;
    $("score").textContent = d.score.toFixed(4);
    $("threshold").textContent = d.threshold.toFixed(4);
    $("verdict").textContent = d.memorized ? "memorized" : "not memorized";
    $("verdict").className = d.memorized ? "mem" : "ok";
    $("timing").textContent = "(" + d.seconds.toFixed(2) + " s" +
      (d.waited >= 0.5 ? ", after " + d.waited.toFixed(1) + " s waiting for the model (busy with a mitigation job)" : "") + ")";
    const top = Math.max(d.score, d.threshold) * 1.3;
    $("fill").style.width = Math.min(100, 100 * d.score / top) + "%";
    $("thr").style.left = (100 * d.threshold / top) + "%";
    const box = $("tokens");
    box.replaceChildren();
    d.words.forEach((w, i) => {
      box.appendChild(document.createTextNode(shown(w.before)));
      const s = document.createElement("span");
      s.className = "tok" + (i === d.top_index ? " top" : "");  // by position: a word can stand twice
      s.dataset.index = i;
      s.dataset.share = w.share.toFixed(3);
      s.textContent = shown(w.text);
      s.title = w.score.toPrecision(3);
      s.style.background = "rgba(220, 40, 40, " + (0.85 * w.share).toFixed(3) + ")";
      s.addEventListener("click", (ev) => openMenu(ev, i));
      box.appendChild(s);
    });
    $("lead").textContent = d.lead ? shown("strongest: " + d.words[d.top_index].text + ", " + d.lead) : "";
    $("warnings").textContent = shown(d.warnings.join(" "));
  } catch (e) { showError(e); } finally { $("score-btn").disabled = false; $("score-status").textContent = ""; }
}
function openMenu(ev, i) {
  chosen = i;
  const m = $("menu");
  m.style.display = "block";
  m.style.left = ev.pageX + "px";
  m.style.top = (ev.pageY + 12) + "px";
  $("replace-input").value = "";
}
function edit(replacement) {
  const parts = current.words.map((w) => [w.before, w.text]);
  let text = "";
  parts.forEach(([b, w], i) => {
    if (i !== chosen) text += b + w;
    else if (replacement) text += b + replacement;
    // dropped: the word and the space before it go, unless a word written against it follows
    // ("(circle" or an invisible control before "circle"), which the space still keeps apart
    else if (i + 1 < parts.length && parts[i + 1][0] === "" && /^[\p{L}\p{N}]/u.test(parts[i + 1][1])) text += b;
  });
  // the prompt's text past its last word goes on after the edit, where the words are the prompt as
  // written; where they are the tokenizer's (a spelling it changed), there is nothing to cut it from
  const written = parts.map(([b, w]) => b + w).join("");
  const rest = current.prompt.startsWith(written) ? current.prompt.slice(written.length) : "";
  text = (text + rest).replace(/\s+/g, " ").trim();
  $("menu").style.display = "none";
  $("prompt").value = text;
  score();
}
// one job at a time from the page: a second would queue behind the first, which the Cancel button
// could then no longer reach
async function mitigate() {
  showError(null);
  $("mitigate-btn").disabled = true;
  try {
    const d = await api("api/mitigate", {prompt: $("prompt").value});
    job = d.job;
    $("job").hidden = false;
    $("images").hidden = true;
    poll();
  } catch (e) { showError(e); $("mitigate-btn").disabled = false; }
}
function jobEnded() { job = null; $("mitigate-btn").disabled = false; }
async function poll() {
  if (!job) return;
  let d;
  try { d = await api("api/jobs/" + job); } catch (e) { showError(e); jobEnded(); return; }
  $("job-progress").value = d.progress;
  $("job-message").textContent = d.message;
  if (d.state === "done") {
    for (const [key, el] of [["before", $("before")], ["after", $("after")]]) {
      el.replaceChildren();
      d.result[key].forEach((src, k) => { const im = document.createElement("img"); im.src = src; im.alt = key + " seed " + d.result.seeds[k]; el.appendChild(im); });
    }
    $("mit-info").textContent = "first-step loss " + d.result.initial_loss.toFixed(4) + " → " + d.result.final_loss.toFixed(4) +
      " (target " + d.result.target.toFixed(4) + ", " + d.result.iterations + " iterations); seeds " + d.result.seeds.join(", ");
    $("images").hidden = false;
    jobEnded();
  } else if (d.state === "cancelled" || d.state === "error") {
    if (d.error) showError(d.error);
    jobEnded();
  } else { setTimeout(poll, 300); }
}
$("score-btn").addEventListener("click", score);
$("mitigate-btn").addEventListener("click", mitigate);
$("drop-btn").addEventListener("click", () => edit(null));
$("replace-btn").addEventListener("click", () => edit($("replace-input").value.trim()));
$("cancel-btn").addEventListener("click", async () => { if (job) await api("api/jobs/" + job + "/cancel", {}); });
$("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); score(); } });
api("api/info").then((d) => {
  $("info").textContent = "model " + (d.model.name_or_path || "?") + "; threshold " + d.threshold.toFixed(4) + " (calibrated FPR " + d.fpr +
    "); scored steps " + d.settings.steps.join(",") + " of " + d.settings.num_inference_steps + " steps, guidance " + d.settings.guidance_scale + ", seed " + d.settings.seed;
  if (d.mitigation) { $("mitigate-btn").disabled = true; $("mitigate-btn").title = d.mitigation; }  // why it cannot run
}).catch(showError);
</script>
</body></html>
"""
