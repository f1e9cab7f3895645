"""``diffmem bench categorize``: the three kinds of memorization against MemLab's manifest.

Prompts are the manifest's held-out novel prompts (never trained, so every feature the model
shows for them is generalized or memorized from other captions' words). For each prompt the
planted ground truth is:

- explicit: its named colour, shape and position;
- implicit: the unnamed feature its scene word always came with in training (snow -> white ground);
- unintended: the unnamed feature its adjective always came with (lucky -> stamp);
- nothing else: the frame habit, other templates, other colours are not planted for the prompt.

The profiler runs once (generation is the cost); the implicit / unintended decision is then
made separately by each expectation route (a user's expectation map, the sentence-embedding
route, training-caption co-occurrence), so the routes are compared on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.results import dump_json


def planted_kinds(expected: dict) -> dict[str, str]:
    """{feature: kind} a MemLab prompt should show, in the MemLab extractor's feature names."""
    from ..memlab import world

    out = {f"{k}:{expected[k]}": "explicit" for k in ("colour", "shape", "position")}
    out.update({f: "implicit" for f in world.IMPLICIT_FEATURES if expected.get(f)})
    out.update({f: "unintended" for f in world.UNINTENDED_FEATURES if expected.get(f)})
    return out


def memlab_expectation_map():
    """What a user would write for MemLab's scene words: the natural pairs, nothing about stamps."""
    from ..categorize import ExpectationMap
    from ..memlab import world

    return ExpectationMap({w: [f] for w, f in world.SCENES.items() if f})


def kind_scores(truth: list[dict[str, str]], predicted: list[dict[str, str]]) -> dict:
    """Per-kind precision and recall of the assigned kind, memorized recall and the false-flag rate.

    ``truth[i]`` / ``predicted[i]``: {feature: kind} planted / called memorized for prompt i.
    """
    from ..categorize.profiler import KINDS

    out = {}
    for kind in KINDS:
        tp = sum(1 for t, p in zip(truth, predicted) for f, k in p.items() if k == kind and t.get(f) == kind)
        n_pred = sum(1 for p in predicted for k in p.values() if k == kind)
        n_true = sum(1 for t in truth for k in t.values() if k == kind)
        out[kind] = {"precision": tp / n_pred if n_pred else float("nan"), "recall": tp / n_true if n_true else float("nan"),
                     "predicted": n_pred, "planted": n_true}
    found = sum(1 for t, p in zip(truth, predicted) for f in t if f in p)
    out["memorized_recall"] = found / max(sum(len(t) for t in truth), 1)
    out["false_flag_rate"] = float(np.mean([any(f not in t for f in p) for t, p in zip(truth, predicted)]))
    return out


@dataclass
class CategorizeBenchResult:
    routes: dict  # route -> kind_scores(...) and the embedding accuracy
    habit_flagged_rate: float
    tracing: list[dict]
    seconds_per_prompt: float
    settings: dict

    def bars(self) -> dict[str, bool]:
        def ok(route):
            s = self.routes[route]
            return all(s[k]["precision"] >= 0.95 and s[k]["recall"] >= 0.95 for k in ("explicit", "implicit", "unintended")) \
                and s["memorized_recall"] >= 0.95 and s["false_flag_rate"] <= 0.05
        out = {f"classification ({r})": ok(r) for r in self.routes}
        if "sentence_embedding" in self.routes:
            out["embedding route accuracy >= 0.9"] = self.routes["sentence_embedding"]["pair_accuracy"] >= 0.9
        out["tracing counts equal the manifest's"] = all(t["matches_manifest"] for t in self.tracing) and all(
            t["profile_rows_matching"] == t["profile_rows_traced"] for t in self.tracing)
        out["habit not called memorized"] = self.habit_flagged_rate == 0.0
        return out

    def table(self) -> str:
        from ..categorize.profiler import speed_text

        lines = ["| route | explicit P/R | implicit P/R | unintended P/R | memorized recall | false-flag rate |",
                 "|---|---|---|---|---|---|"]
        for r, s in self.routes.items():
            pr = " | ".join(f"{s[k]['precision']:.3f} / {s[k]['recall']:.3f}" for k in ("explicit", "implicit", "unintended"))
            lines.append(f"| {r} | {pr} | {s['memorized_recall']:.3f} | {s['false_flag_rate']:.3f} |")
        lines.append("")
        lines.append(f"habit (frame) called memorized for {self.habit_flagged_rate:.1%} of prompts; "
                     f"{speed_text(self.seconds_per_prompt)} at N = {self.settings['n']}")
        if self.tracing:
            t0 = self.tracing[0]
            lines.append(f"traces attached to memorized planted implicit / unintended features: "
                         f"{t0['profile_rows_matching']} of {t0['profile_rows_traced']} name the manifest's word and count")
        for t in self.tracing:
            lines.append(f"- {t['statement']} (manifest: {t['manifest_count']}) {'ok' if t['matches_manifest'] else 'MISMATCH'}")
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        dump_json({"routes": self.routes, "habit_flagged_rate": self.habit_flagged_rate, "tracing": self.tracing,
                   "seconds_per_prompt": self.seconds_per_prompt, "settings": self.settings, "bars": self.bars(),
                   "table": self.table()}, out / "bench_categorize.json")
        return out / "bench_categorize.json"


def bench_categorize(pipe, manifest: dict, n: int = 16, max_prompts: int | None = None, embedding=None,
                     progress: bool = True, profile_out: str | Path | None = None,
                     checkpoint: str | Path | None = None) -> CategorizeBenchResult:
    """``embedding``: a SentenceEmbeddingExpectation (default: the bundled MiniLM when installed).
    ``checkpoint``: a folder the benchmark owns, where the generations and their features are saved
    8 prompts at a time (as ``diffmem categorize`` saves them), so a killed run resumes; parts made
    with other settings are redone."""
    from ..categorize import CaptionCooccurrence, MemLabExtractor, MemorizationProfiler, TrainingTracer
    from ..memlab import dataset as ds
    from . import check_max_prompts

    check_max_prompts(max_prompts)
    entries = manifest["groups"]["novel"][:max_prompts]
    prompts = [e["prompt"] for e in entries]
    truth = [planted_kinds(e["expected_features"]) for e in entries]
    data = ds.build(ds.MemLabConfig(**manifest["config"]))
    tracer = TrainingTracer.from_memlab(data)
    prof = MemorizationProfiler(pipe, MemLabExtractor(), n=n, tracer=tracer)
    result = prof.profile(prompts, progress=progress, keep_images=profile_out is not None, checkpoint=checkpoint,
                          stale="restart")
    if profile_out is not None:
        result.save(profile_out)

    routes: dict[str, list] = {"expectation_map": [memlab_expectation_map()],
                               "caption_cooccurrence": [CaptionCooccurrence(data.captions)]}
    if embedding is None:
        from ..categorize import SentenceEmbeddingExpectation

        try:
            embedding = SentenceEmbeddingExpectation.minilm()
        except Exception as e:  # noqa: BLE001 - the route is optional; say why it is missing
            print(f"sentence-embedding route skipped: {e}")
    if embedding is not None:
        routes["sentence_embedding"] = [embedding]

    memorized_rows = result.memorized()
    scores = {}
    for name, sources in routes.items():
        prof.expectations = sources
        predicted = [dict() for _ in prompts]
        index = {p: i for i, p in enumerate(prompts)}
        for r in memorized_rows:
            predicted[index[r["prompt"]]][r["feature"]] = prof.classify(r["prompt"], r["feature"])[0]
        scores[name] = kind_scores(truth, predicted)
        if name == "sentence_embedding":
            # the route's own decision on every planted implicit / unintended pair, memorized or not
            pairs = [(p, f, k) for p, t in zip(prompts, truth) for f, k in t.items() if k != "explicit"]
            desc = prof.extractor.describe
            right = [bool(embedding.implies(p, f, desc(f))) == (k == "implicit") for p, f, k in pairs]
            scores[name]["pair_accuracy"] = float(np.mean(right)) if right else float("nan")

    habit = float(np.mean([any(r["feature"] == "frame" for r in result.memorized(p)) for p in prompts]))
    tracing = []
    for g in ("implicit", "unintended"):
        for e in manifest["groups"][g]:
            prompt = f"a {e['word']}" if g == "unintended" else e["phrase"]
            t = tracer.trace(prompt, e["feature"])
            tracing.append({**t, "kind": g, "manifest_word": e["word"], "manifest_count": e["rows_with_word_and_feature"],
                            "matches_manifest": t["word"] == e["word"] and t["count"] == e["rows_with_word_and_feature"]})
    # the same check end to end: the trace the profiler attached to each memorized planted feature
    counts = {e["feature"]: (e["word"], e["rows_with_word_and_feature"])
              for g in ("implicit", "unintended") for e in manifest["groups"][g]}
    attached = [(r["trace"] or {}).get("word") == counts[r["feature"]][0] and (r["trace"] or {}).get("count") == counts[r["feature"]][1]
                for r in memorized_rows if r["feature"] in counts and truth[prompts.index(r["prompt"])].get(r["feature"])]
    for t in tracing:
        t["profile_rows_traced"] = len(attached)
        t["profile_rows_matching"] = int(sum(attached))
    settings = {**result.settings, "prompts": len(prompts), "group": "novel"}
    return CategorizeBenchResult(scores, habit, tracing, result.seconds_per_prompt, settings)
