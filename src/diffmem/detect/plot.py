"""The picture of a detection run: its scores against the threshold (and the reference scores the
threshold was calibrated on, when at hand). Drawn by ``diffmem detect`` and by the audit's report."""

from __future__ import annotations

import numpy as np


# each detector's score, as the histogram's axis names it
AXIS_LABELS = {"noise_norm": "text-conditional noise norm (Wen et al.)",
               "seed_consistency": "seed consistency (correlation across seeds)"}


def settings_caption(method: str, settings: dict, seeds) -> str:
    """A detector's settings as the histogram, the ROC and the report name them."""
    seeds = list(seeds)
    head = f"{settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}"
    generations = f"{len(seeds)} generation{'s' if len(seeds) != 1 else ''} from seed {seeds[0]}"
    if method == "seed_consistency":
        return f"{head}, {'first-step x0' if settings.get('mode', 'x0') == 'x0' else 'full images'} of {generations}"
    return f"{head}, scored step(s) {','.join(map(str, settings['steps']))}, {generations}"


def draw_scores(ax, scores, threshold: float | None = None, reference=None, label: str = "scored prompts",
                method: str = "noise_norm") -> None:
    """Histograms on a log count scale: a memorized prompt lies far right of the reference mass."""
    scores = np.asarray(scores, float)
    shown = [scores] if reference is None else [scores, np.asarray(reference, float)]
    finite = np.concatenate([v[np.isfinite(v)] for v in shown])
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 50)  # one distinct score still gets a bar
    if reference is not None:
        ref = shown[1]
        ax.hist(ref[np.isfinite(ref)], bins=bins, alpha=0.55, label=f"reference (non-memorized), n={len(ref)}", color="#79a")
    ax.hist(scores[np.isfinite(scores)], bins=bins, alpha=0.6, label=f"{label}, n={len(scores)}", color="#d63")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1.2, label=f"threshold {threshold:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel(AXIS_LABELS.get(method, method))
    ax.set_ylabel("prompts")
    ax.legend(fontsize=7)


def score_figure(scores, threshold: float | None = None, reference=None, caption: str = "", label: str = "scored prompts",
                 method: str = "noise_norm"):
    from ..core.figures import subplots

    fig, ax = subplots(figsize=(6.4, 3.0))
    draw_scores(ax, scores, threshold, reference, label, method)
    ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    return fig
