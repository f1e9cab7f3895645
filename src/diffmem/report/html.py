"""``report.html``: one self-contained page (images inlined) from a jinja2 template with autoescaping.

Everything user-supplied (prompts, paths, trigger phrases, captions) goes through the template's
autoescaping; the only markup passed as safe is the token-attribution fragment, which is itself
rendered by an autoescaping template.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from markupsafe import Markup

from ..core.results import atomic_write_text

MAX_TABLE_ROWS = 2000  # prompts listed in the report's table; all of them are in detect/detections.parquet
METHOD_NAMES = {"token_attribution": "token attribution (gradient norms)",
                "token_ablation": "word ablation (score drop with the word masked)"}


def _png_data(path: Path) -> str | None:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.exists() else None


def _fig_data(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _array_data(img: np.ndarray, scale: int = 3) -> str:
    from PIL import Image

    a = img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(a)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _score_figure(scores, reference, threshold, caption: str, method: str = "noise_norm") -> str:
    from ..detect.plot import score_figure

    return _fig_data(score_figure(scores, threshold, reference, caption, label="audited prompts", method=method))


def _detector_text(det) -> tuple[str, str]:
    """The detector that flagged the audited prompts, and its settings, as the report names them."""
    from ..detect.plot import settings_caption

    name = (f"seed consistency of the first step's x0 ({len(det.seeds)} seeds)" if det.method == "seed_consistency"
            else "noise norm (Wen et al.)")
    return name, settings_caption(det.method, det.settings, det.seeds)


def _roc_figure(roc: dict, caption: str) -> str:
    from ..core.figures import subplots

    fig, ax = subplots(figsize=(4.2, 3.6))
    ax.plot(roc["fpr"], roc["tpr"], color="#d63", lw=1.5)
    ax.axvline(0.01, color="grey", ls=":", lw=1)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 1)
    ax.set_xlabel("false-positive rate (log above 0.01)")
    ax.set_ylabel("true-positive rate")
    ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    return _fig_data(fig)


def _nearest_training_images(measures: dict, k: int) -> dict[str, str]:
    """Before / after: the training row nearest to prompt ``k``'s most similar generation and where
    its image is, for a mitigation measured against training data."""
    found = {}
    for when in ("before", "after"):
        if f"nearest_{when}" in measures:
            locations = measures.get(f"nearest_location_{when}")  # results measured before locations were kept have none
            where = locations[k] if locations else None
            found[when] = f"row {int(measures[f'nearest_{when}'][k])}" + (f" ({where})" if where else "")
    return found


def _settings_text(settings: dict | None, seeds=None) -> str:
    if not settings:
        return ""
    s = {k: v for k, v in settings.items() if k not in ("batch_size", "target_source")}
    return json.dumps(s, default=str) + (f"; seeds {list(seeds)}" if seeds is not None else "")


def build_context(out: Path, result) -> dict:
    from ..detect.calibration import Calibration
    from ..detect.noise_norm import DetectionResult
    from ..mitigate.report import NEAREST_PNG

    out = Path(out)
    st = result.stages
    det = DetectionResult.load(out / "detect" / "detections.parquet")
    # audits scored before results marked long prompts have no column: none is marked
    truncated = det.truncated if det.truncated is not None else np.zeros(len(det.prompts), bool)
    ref = DetectionResult.load(out / "detect" / "reference.parquet")
    cal = Calibration.load(out / "detect" / "calibration.json")
    labels = json.loads((out / "detect" / "labels.json").read_text())
    dsum = st["detect"]["summary"]
    det_caption = f"detector settings {_settings_text(det.settings)}; seeds {det.seeds}; calibrated at FPR {cal.fpr} on {cal.n_reference} reference prompts"
    detector_name, detector_settings = _detector_text(det)
    ctx = {"settings": result.settings, "stages": st, "detect": dsum, "det_caption": det_caption,
           "detector_name": detector_name, "detector_settings": detector_settings,
           # the words' shares and the mitigation's loss are of the noise norm, whichever detector flagged
           "detector_note": None if det.method == "noise_norm" else
           (f"Flagged by {detector_name}. The words are shaded, and mitigation lowers the loss, by the noise norm "
            "(Wen et al.): a prompt already below the mitigation's target is generated as it was."),
           "score_fig": _score_figure(det.scores, ref.scores, cal.threshold, detector_settings, det.method),
           "roc_fig": None, "grid": None, "grid_fig": None}
    if labels.get("labels") is not None and (out / "detect" / "roc.json").exists():
        roc = json.loads((out / "detect" / "roc.json").read_text())
        ctx["roc_fig"] = _roc_figure(roc, f"{detector_name}: AUC {dsum['auc']:.3f}, TPR@1%FPR {dsum['tpr_at_1pct_fpr']:.3f}; "
                                          f"{detector_settings}")
        gpath = out / "detect" / "grid" / "bench_detect.json"
        if gpath.exists():
            g = json.loads(gpath.read_text())
            gens = sorted({r["generations"] for r in g["grid"]})
            rows = []
            for label in dict.fromkeys(r["steps"] for r in g["grid"]):
                cells = [next(r for r in g["grid"] if r["steps"] == label and r["generations"] == n) for n in gens]
                rows.append({"steps": label, "cells": [f"{c['auc']:.3f} / {c['tpr_at_1pct_fpr']:.3f}" for c in cells]})
            ctx["grid"] = {"gens": gens, "rows": rows, "caption": f"settings {_settings_text(g['settings'])}; seeds {g['seeds']}"}
            ctx["grid_fig"] = _png_data(out / "detect" / "grid" / "bench_detect_roc.png")
        groups = labels["groups"]
        ctx["groups"] = _group_table(det, groups)

    # per flagged prompt
    attributions = load_attributions(out)
    profile = _load_profile(out)
    mitigation = _load_mitigation(out)
    links = json.loads((out / "scan" / "links.json").read_text())["links"] if (out / "scan" / "links.json").exists() else {}
    scan_images = _load_scan_images(out)
    order = np.argsort(-det.scores, kind="stable")
    flagged = []
    seen = set()
    for i in order:
        if not det.verdicts[i] or det.prompts[i] in seen:
            continue
        p = det.prompts[i]
        seen.add(p)
        item = {"prompt": p, "score": float(det.scores[i]), "group": labels["groups"][i] if labels.get("groups") else None,
                "truncated": bool(truncated[i]),
                "attribution": None, "profile": None, "mitigation": None, "scan": None}
        if p in attributions:
            a = attributions[p]
            item["attribution"] = {"html": Markup(a.to_html()), "top": a.top_word, "lead": a.lead_text(),
                                   "caption": f"{METHOD_NAMES.get(a.method, a.method)}: {_settings_text(a.settings)}; seeds {a.seeds}"}
        if profile is not None and p in profile.prompts:
            k = profile.prompts.index(p)
            item["profile"] = {"img": _png_data(out / "categorize" / f"prompt_{k:04d}.png"),
                               "features": profile.memorized(p),
                               "caption": f"{profile.settings['n']} generations, {_settings_text(profile.settings)}; seeds {profile.seeds[0]}..{profile.seeds[-1]}; extractor {profile.extractor}"}
        if mitigation is not None and p in mitigation.prompts:
            k = mitigation.prompts.index(p)
            m = mitigation.measures
            item["mitigation"] = {"img": _png_data(out / "mitigate" / f"prompt_{k:04d}.png"),
                                  "initial": float(mitigation.initial_loss[k]), "final": float(mitigation.final_loss[k]),
                                  "reached": bool(mitigation.reached_target[k]), "iterations": int(mitigation.iterations[k]),
                                  "numbers": {n: float(m[n][k]) for n in ("replication_before", "replication_after",
                                                                          "alignment_before", "alignment_after") if n in m},
                                  "nearest": _nearest_training_images(m, k),
                                  "nearest_img": _png_data(out / "mitigate" / NEAREST_PNG.format(k)),
                                  "caption": f"top row before, bottom row after; {_settings_text(mitigation.settings)}; seeds {mitigation.seeds}"}
        if p in links and (links[p]["triggers"] or links[p]["clusters"]):
            lk = links[p]
            imgs = []
            for t in lk["triggers"]:
                if t["cluster"] in scan_images:
                    imgs.append({"src": _array_data(scan_images[t["cluster"]]), "label": f"cluster {t['cluster']} (trigger {t['phrase']!r})"})
            for c in lk["clusters"]:
                if c["cluster"] in scan_images:
                    imgs.append({"src": _array_data(scan_images[c["cluster"]]), "label": f"cluster {c['cluster']}: {c['cluster_size']} rows"})
            item["scan"] = {"triggers": lk["triggers"], "clusters": lk["clusters"], "images": imgs}
        flagged.append(item)
    ctx["flagged"] = flagged
    ctx["all_prompts"] = [{"prompt": det.prompts[i], "score": float(det.scores[i]), "flagged": bool(det.verdicts[i]),
                           "truncated": bool(truncated[i])}
                          for i in order[:MAX_TABLE_ROWS]]
    ctx["all_prompts_cut"] = len(det.prompts) > MAX_TABLE_ROWS
    ctx["profile_controls"] = []
    if profile is not None:
        for k, p in enumerate(profile.prompts):
            if p not in seen:
                ctx["profile_controls"].append({"prompt": p, "img": _png_data(out / "categorize" / f"prompt_{k:04d}.png"),
                                                "features": profile.memorized(p)})
    if (out / "scan" / "scan_summary.json").exists():
        ctx["scan"] = json.loads((out / "scan" / "scan_summary.json").read_text())
    return ctx


def _group_table(det, groups) -> list[dict]:
    out = []
    for g in dict.fromkeys(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        out.append({"group": g, "n": len(idx), "flagged": int(det.verdicts[idx].sum()),
                    "share": float(det.verdicts[idx].mean())})
    return out


def load_attributions(out: Path) -> dict:
    """{prompt: AttributionResult} from an audit folder's explain stage ({} if it did not run)."""
    from ..explain.batch import AttributionSet

    f = out / "explain" / "attributions.json"
    return AttributionSet.load(f).by_prompt() if f.exists() else {}


def _load_profile(out: Path):
    from ..categorize.profiler import ProfileResult

    f = out / "categorize" / "profile.json"
    if not f.exists():
        return None
    d = json.loads(f.read_text())  # not ProfileResult.load: the report needs the rows, not the image arrays
    return ProfileResult(d["prompts"], d["seeds"], d["rows"], d["settings"], d["extractor"], d["control_prompts"],
                         d["seconds_per_prompt"], None, d["image_features"])


def _load_mitigation(out: Path):
    from ..mitigate.result import MitigationResult

    return MitigationResult.load(out / "mitigate") if (out / "mitigate" / "mitigation.json").exists() else None


def _load_scan_images(out: Path) -> dict[int, np.ndarray]:
    f = out / "scan" / "scan_images.npz"
    if not f.exists():
        return {}
    with np.load(f, allow_pickle=False) as z:
        return {int(k.split("_", 1)[1]): z[k] for k in z.files if k.startswith("cluster_")}


def render(ctx: dict) -> str:
    from jinja2 import PackageLoader

    from ..core.prompts import html_environment

    env = html_environment(loader=PackageLoader("diffmem.report", "templates"))
    env.filters["fmt"] = lambda v, f=".3g": format(v, f) if isinstance(v, (int, float)) else v
    return env.get_template("report.html.j2").render(**ctx)


def write_report(out: str | Path, result) -> Path:
    out = Path(out)
    html = render(build_context(out, result))
    atomic_write_text(out / "report.html", html)
    return out / "report.html"
