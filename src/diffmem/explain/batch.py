"""Explaining many prompts: ``explain_prompts`` runs one explainer over a list, checkpointing after
every prompt so an interrupted run resumes where it stopped, and returns an ``AttributionSet``
that saves and loads (JSON), tabulates itself (one row per word) and draws an HTML page.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import InputError
from ..core.prompts import prompt_list
from ..core.results import atomic_write_text, dump_json, reading_saved, to_jsonable
from .result import AttributionResult
from .tokens import check_prompt, check_words


@dataclass
class AttributionSet:
    method: str
    settings: dict
    seeds: list[int]
    results: list[AttributionResult] = field(default_factory=list)
    model: dict = field(default_factory=dict)  # model_identity and dtype: what a resumed run must match
    revision: int = 1  # the explainer's: a set saved before sets carried one was made by revision 1

    def __len__(self) -> int:
        return len(self.results)

    def by_prompt(self) -> dict[str, AttributionResult]:
        return {r.prompt: r for r in self.results}

    def top_words(self) -> dict[str, str]:
        return {r.prompt: r.top_word for r in self.results}

    def to_dict(self) -> dict:
        return {"method": self.method, "revision": self.revision, "settings": self.settings, "seeds": self.seeds,
                "model": self.model, "attributions": [r.to_dict() for r in self.results]}

    def save(self, path: str | Path) -> Path:
        dump_json(self.to_dict(), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "AttributionSet":
        path = Path(path)
        with reading_saved(path, "attributions file (attributions.json)"):
            d = json.loads(path.read_text(encoding="utf-8"))
            results = [AttributionResult.from_dict(a) for a in d["attributions"]]
        first = results[0] if results else None
        # files written by the audit before the set carried its own settings: take the first result's
        return cls(d.get("method", first.method if first else ""), d.get("settings", first.settings if first else {}),
                   d.get("seeds", first.seeds if first else []), results, d.get("model", {}), d.get("revision", 1))

    def to_frame(self):
        """One row per word: prompt index and text, word index and text, score, rank (1 = top), the
        prompt's detection score, how far its top word leads the second (``top_lead``, a share of the
        top score; below ``DECISIVE_LEAD`` a near tie) and whether it is longer than the model reads
        (its words past the cut have no rows)."""
        import pandas as pd

        rows = []
        for i, r in enumerate(self.results):
            rank = np.empty(len(r.words), int)
            rank[np.argsort(-r.word_scores, kind="stable")] = np.arange(1, len(r.words) + 1)
            for j, (w, s) in enumerate(zip(r.words, r.word_scores)):
                rows.append({"prompt_index": i, "prompt": r.prompt, "word_index": j, "word": w,
                             "score": float(s), "rank": int(rank[j]), "detection_score": r.detection_score,
                             "top_lead": r.top_lead, "truncated": r.truncated})
        return pd.DataFrame(rows, columns=["prompt_index", "prompt", "word_index", "word", "score", "rank",
                                           "detection_score", "top_lead", "truncated"])

    @property
    def n_near_ties(self) -> int:
        return sum(r.near_tie for r in self.results)

    @property
    def n_truncated(self) -> int:
        return sum(bool(r.truncated) for r in self.results)

    def to_html(self, title: str = "diffmem explain") -> str:
        """A self-contained page: each prompt with its words shaded by score, its top word (and how far
        it leads the second) and its detection score. Everything from the prompts is escaped."""
        from markupsafe import Markup

        from ..core.prompts import html_environment

        tmpl = html_environment().from_string(
            "<!doctype html><html><head><meta charset='utf-8'><title>{{ title }}</title><style>"
            "body{font:15px/1.5 system-ui,sans-serif;margin:2em;max-width:70em}"
            "table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}"
            "td.num{text-align:right;font-variant-numeric:tabular-nums}.settings,.lead{color:#555;font-size:13px}"
            ".near-tie{color:#a15c00}"
            "</style></head><body><h1>{{ title }}</h1>"
            "<p class='settings'>{{ method }} &middot; {{ settings }} &middot; seeds {{ seeds }}</p>"
            "<table><tr><th>#</th><th>prompt, words shaded by score</th><th>top word</th><th>detection score</th></tr>"
            "{% for r, frag in rows %}<tr><td class='num'>{{ loop.index }}</td><td>{{ frag }}</td>"
            "{% set lead = r.lead_text() %}<td>{{ r.top_word }}{% if lead %}<br>"
            "<span class='lead{{ ' near-tie' if r.near_tie else '' }}'>{{ lead }}</span>{% endif %}</td><td class='num'>"
            "{{ '%.4g'|format(r.detection_score) if r.detection_score is not none else '' }}</td></tr>{% endfor %}"
            "</table></body></html>")
        return tmpl.render(title=title, method=self.method, seeds=self.seeds,
                           settings=json.dumps(to_jsonable(self.settings), sort_keys=True),
                           rows=[(r, Markup(r.to_html())) for r in self.results])


def explain_prompts(explainer, prompts: Sequence[str], checkpoint: str | Path | None = None,
                    progress: bool = False, stale: str = "refuse", save_every: float = 5.0) -> AttributionSet:
    """Explain each distinct prompt (in first-seen order) with ``explainer`` (``TokenAttribution`` or
    ``TokenAblation``).

    With ``checkpoint`` (a JSON path) the set is saved after a prompt once ``save_every`` seconds
    have passed since the last save (the file grows with every prompt: rewriting it after each of
    thousands of fast prompts would cost more than explaining them), and a run that finds the file
    resumes it: prompts already explained by the same model, explainer (and its revision) and settings
    are kept, not recomputed. A checkpoint from another model, other settings or another revision of
    the explainer is never mixed in:
    ``stale="refuse"`` stops with an error (the user's files are theirs), ``"restart"`` starts over
    (for callers that own the folder, as the audit does).
    """
    from tqdm.auto import tqdm

    from ..core.loading import weights_identity

    if stale not in ("refuse", "restart"):
        raise InputError(f"stale must be 'refuse' or 'restart', got {stale!r}")
    # an empty prompt, or one of special tokens only, fails before any work
    wanted = [check_words(explainer.pipe, check_prompt(p)) for p in dict.fromkeys(prompt_list(prompts))]
    settings = to_jsonable(explainer.settings)
    model = weights_identity(explainer.pipe)
    revision = getattr(explainer, "revision", 1)
    done: dict[str, AttributionResult] = {}
    if checkpoint is not None and Path(checkpoint).exists():
        old = AttributionSet.load(checkpoint)
        if (old.method, to_jsonable(old.settings), old.model, old.revision) == (explainer.method, settings, model, revision):
            done = old.by_prompt()
        elif stale == "refuse":
            if old.model != model:
                what = "another model"
            elif (old.method, to_jsonable(old.settings)) != (explainer.method, settings):
                what = f"other settings ({old.method} {json.dumps(to_jsonable(old.settings), sort_keys=True)})"
            else:
                what = f"another diffmem's version of {old.method} (revision {old.revision}; this diffmem's is {revision})"
            raise InputError(f"{checkpoint} holds attributions made with {what}; use another output folder or delete it")

    def current(results):
        return AttributionSet(explainer.method, settings, list(explainer.seeds()), results, model, revision)

    todo = [p for p in wanted if p not in done]
    last_save = time.monotonic()
    with tqdm(total=len(wanted), initial=len(wanted) - len(todo), desc="explaining", unit="prompt",
              disable=not progress) as bar:
        for p in todo:
            done[p] = explainer.attribute(p)
            bar.update(1)
            if checkpoint is not None and time.monotonic() - last_save >= save_every:
                current(list(done.values())).save(checkpoint)
                last_save = time.monotonic()
    result = current([done[p] for p in wanted])
    if checkpoint is not None:
        result.save(checkpoint)  # in input order, and without prompts an earlier run had that this one does not
    return result


def write_outputs(result: AttributionSet, folder: str | Path) -> list[Path]:
    """``attributions.json``, ``words.parquet`` (one row per word) and ``attributions.html``."""
    from ..core.results import write_parquet

    folder = Path(folder)
    paths = [result.save(folder / "attributions.json"), folder / "words.parquet", folder / "attributions.html"]
    write_parquet(result.to_frame(), paths[1], metadata={"method": result.method, "revision": result.revision,
                                                         "settings": result.settings, "seeds": result.seeds})
    atomic_write_text(paths[2], result.to_html())
    return paths
