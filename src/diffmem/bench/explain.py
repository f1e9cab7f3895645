"""``diffmem bench explain``: do the attributions point at the words that carry memorization?

On MemLab's ground truth:

- trigger prompts (the manifest's template test prompts: a trigger phrase in a new context):
  the top-ranked word should be one of the trigger phrase's two words;
- flagged prompts (planted verbatim and trigger prompts whose first-step score passes a
  threshold calibrated at FPR 1% on non-memorized prompts): gradient attribution and ablation
  should rank the same word first;
- the outcome (flagged verbatim prompts): generate each prompt with each word masked, as the
  ablation masks it, over ``outcome_seeds`` seeds, and find the word whose masking takes the
  generations furthest from the planted training image (MemLab's replication ratio). Which method's
  top word is that word, and how well do its word scores rank the words by that effect (Spearman)?
  Verbatim captions have no planted culprit word, so this is their ground truth for "which word
  should the user change".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.results import dump_json, reading_saved
from ..explain.result import DECISIVE_LEAD


@dataclass
class ExplainBenchResult:
    trigger_rows: list[dict]  # prompt, trigger, top words by method, hit
    agreement_rows: list[dict]  # flagged prompt, top word by each method, agree
    settings: dict
    outcome_rows: list[dict] = field(default_factory=list)  # flagged verbatim prompt, masked-generation ratios

    def outcome(self) -> dict[str, dict]:
        """Per method: how often its top word is the word whose masking most breaks the replication,
        the mean Spearman correlation of its word scores with that effect, and the replication rate of
        generations with its top word masked (against the unmasked prompt's)."""
        if not self.outcome_rows:
            return {}
        out = {}
        for m in self.settings["methods"]:
            out[m] = {"top_word_is_outcome_top": float(np.mean([top_index(r, m) == top_index(r, "outcome") for r in self.outcome_rows])),
                      "spearman": float(np.nanmean([r[f"{m}_spearman"] for r in self.outcome_rows])),
                      "replication_with_top_word_masked": float(np.mean([r["replicated_masked"][top_index(r, m)]
                                                                         for r in self.outcome_rows]))}
        # baselines: a word picked at random (every word's masking, averaged) and the best word in hindsight
        out["unmasked"] = {"replication": float(np.mean([r["replicated_unmasked"] for r in self.outcome_rows])),
                           "any_word_masked": float(np.mean([np.mean(r["replicated_masked"]) for r in self.outcome_rows])),
                           "best_word_masked": float(np.mean([min(r["replicated_masked"]) for r in self.outcome_rows]))}
        return out

    @property
    def trigger_top_word_rate(self) -> dict[str, float]:
        methods = self.settings["methods"]
        return {m: float(np.mean([r[f"{m}_hit"] for r in self.trigger_rows])) for m in methods}

    @property
    def agreement_rate(self) -> float:
        return float(np.mean([r["agree"] for r in self.agreement_rows])) if self.agreement_rows else float("nan")

    def agreement_by_group(self) -> dict[str, tuple[float, int]]:
        """{group: (rate, count)}: trigger prompts have one planted culprit phrase, verbatim
        captions are memorized whole, so their top word is a near-tie among several words."""
        out = {}
        for g in sorted({r.get("group", "") for r in self.agreement_rows}):
            rows = [r["agree"] for r in self.agreement_rows if r.get("group", "") == g]
            out[g] = (float(np.mean(rows)), len(rows))
        return out

    def agreement_where_decisive(self, margin: float = DECISIVE_LEAD) -> dict[str, tuple[float, int]]:
        """{group: (rate, count)} over the flagged prompts whose top word leads its second by at least
        ``margin`` of its score under both methods: is the disagreement only a matter of near-ties?"""
        out = {}
        for g in sorted({r.get("group", "") for r in self.agreement_rows}):
            rows = [r["agree"] for r in self.agreement_rows if r.get("group", "") == g
                    and min(r.get("attribution_margin", np.nan), r.get("ablation_margin", np.nan)) >= margin]
            out[g] = (float(np.mean(rows)) if rows else float("nan"), len(rows))
        return out

    def bars(self) -> dict[str, bool]:
        return {"trigger phrase holds the top word (attribution) >= 0.9": self.trigger_top_word_rate["attribution"] >= 0.9,
                "attribution and ablation agree on flagged prompts >= 0.8": self.agreement_rate >= 0.8}

    def table(self) -> str:
        rates = self.trigger_top_word_rate
        lines = ["| measure | value |", "|---|---|",
                 f"| sampling steps scored (explainers and flagging detector) | {self.settings.get('steps', [0])} |"]
        for m, v in rates.items():
            lines.append(f"| trigger prompts whose top word is in the trigger phrase ({m}) | {v:.3f} ({len(self.trigger_rows)} prompts) |")
        lines.append(f"| flagged prompts where attribution and ablation rank the same top word | "
                     f"{self.agreement_rate:.3f} ({len(self.agreement_rows)} flagged of {self.settings['candidates']}) |")
        for g, (rate, n) in self.agreement_by_group().items():
            lines.append(f"| ... of which {g} prompts | {rate:.3f} ({n}) |")
        if self.agreement_rows and "attribution_margin" in self.agreement_rows[0]:
            for g, (rate, n) in self.agreement_where_decisive().items():
                ranks = [r["attribution_top_rank_by_ablation"] for r in self.agreement_rows if r.get("group", "") == g]
                lines.append(f"| {g}: agreement where both top words lead their second by >= {DECISIVE_LEAD:.0%} / "
                             f"the attribution's top word's mean rank by the ablation | {rate:.3f} ({n}) / {np.mean(ranks):.2f} |")
        outcome = self.outcome()
        if outcome:
            n, seeds = len(self.outcome_rows), self.settings["outcome_seeds"]
            lines.append(f"| flagged verbatim prompts generated with each word masked | {n} prompts x {seeds} seeds |")
            for m in self.settings["methods"]:
                o = outcome[m]
                lines.append(f"| {m}: top word is the word whose masking most breaks the replication | "
                             f"{o['top_word_is_outcome_top']:.3f} (Spearman with the effect {o['spearman']:.3f}) |")
                lines.append(f"| {m}: replication with its top word masked | {o['replication_with_top_word_masked']:.3f} |")
            u = outcome["unmasked"]
            lines.append(f"| replication unmasked / a word at random masked / the best word masked | "
                         f"{u['replication']:.3f} / {u['any_word_masked']:.3f} / {u['best_word_masked']:.3f} |")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Left: agreement on the top word per group, over all flagged prompts and over those where
        both top words lead clearly, against the 0.8 bar. Right (with the masked generations): the
        replication of flagged verbatim captions with no word, a random word, each method's top word
        and the best word masked."""
        from ..core.figures import subplots

        outcome = self.outcome()
        fig, axes = subplots(1, 2 if outcome else 1, figsize=(9 if outcome else 4.5, 3.6), squeeze=False)
        ax = axes[0, 0]
        groups = self.agreement_by_group()
        decisive = self.agreement_where_decisive()
        x = np.arange(len(groups))
        for k, (label, data) in enumerate([("all flagged", groups),
                                           (f"both top words lead by >= {DECISIVE_LEAD:.0%}", decisive)]):
            rates = [data[g][0] for g in groups]
            bars = ax.bar(x + (k - 0.5) * 0.38, np.nan_to_num(rates), 0.38, label=label, color=("C4", "C9")[k])
            for b, g in zip(bars, groups):
                ax.annotate(f"n={data[g][1]}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
        ax.axhline(0.8, color="k", ls="--", lw=0.8, label="bar 0.8")
        ax.set_xticks(x, [f"{g} prompts" for g in groups])
        ax.set_ylim(0, 1.12)
        ax.set_ylabel("same top word: attribution and ablation")
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
        if outcome:
            ax = axes[0, 1]
            u = outcome["unmasked"]
            names = ["nothing", "a random word", "attribution's top word", "ablation's top word", "the best word"]
            values = [u["replication"], u["any_word_masked"], outcome["attribution"]["replication_with_top_word_masked"],
                      outcome["ablation"]["replication_with_top_word_masked"], u["best_word_masked"]]
            bars = ax.barh(np.arange(len(names))[::-1], values, color=["0.5", "0.7", "C0", "C1", "C2"])
            for b, v in zip(bars, values):
                ax.annotate(f"{v:.3f}", (v, b.get_y() + b.get_height() / 2), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=7)
            ax.set_yticks(np.arange(len(names))[::-1], [f"masked: {n}" for n in names], fontsize=8)
            ax.set_xlim(0, 1.15)
            ax.set_xlabel("generations that replicate the training image")
            ax.set_title(f"{len(self.outcome_rows)} flagged verbatim captions x {self.settings['outcome_seeds']} seeds",
                         fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=130, bbox_inches="tight")
        return Path(path)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        dump_json({"trigger_top_word_rate": self.trigger_top_word_rate, "agreement_rate": self.agreement_rate,
                   "agreement_by_group": {g: {"rate": r, "n": n} for g, (r, n) in self.agreement_by_group().items()},
                   "agreement_where_decisive": {"margin": DECISIVE_LEAD, **{
                       g: {"rate": r, "n": n} for g, (r, n) in self.agreement_where_decisive().items()}},
                   "bars": self.bars(), "settings": self.settings, "trigger_rows": self.trigger_rows,
                   "agreement_rows": self.agreement_rows, "outcome": self.outcome(), "outcome_rows": self.outcome_rows,
                   "table": self.table()}, out / "bench_explain.json")
        return out / "bench_explain.json"

    @classmethod
    def load(cls, path: str | Path) -> "ExplainBenchResult":
        """From ``bench_explain.json`` (or the folder holding it); the figures are recomputed from the rows."""
        path = Path(path)
        with reading_saved(path, "explain benchmark (bench_explain.json)"):
            d = json.loads((path / "bench_explain.json" if path.is_dir() else path).read_text())
            return cls(d["trigger_rows"], d["agreement_rows"], d["settings"], d.get("outcome_rows", []))


def bench_explain(pipe, manifest: dict, generations: int = 1, max_prompts: int | None = None,
                  outcome_seeds: int = 4, progress: bool = True, checkpoint: str | Path | None = None,
                  scored_steps: Sequence[int] = (0,)) -> ExplainBenchResult:
    """``checkpoint``: a folder where the masked generations' rows (nine tenths of the run) are saved
    a few prompts at a time, so a killed run resumes after explaining the prompts again.
    ``scored_steps``: the sampling steps both explainers and the detector that flags prompts score
    (Wen et al.: the first step)."""
    from tqdm.auto import tqdm

    from ..core.loading import sampler_defaults
    from ..detect import Calibration, NoiseNormDetector
    from ..explain import TokenAblation, TokenAttribution
    from ..memlab import dataset as ds
    from . import check_max_prompts

    check_max_prompts(max_prompts)
    d = sampler_defaults(pipe)
    steps, scale = d["num_inference_steps"], d["guidance_scale"]
    scored_steps = sorted({int(k) for k in scored_steps})
    attr = TokenAttribution(pipe, steps, scale, steps=scored_steps, generations=generations)
    abl = TokenAblation(pipe, steps, scale, steps=scored_steps, generations=generations)
    methods = {"attribution": attr, "ablation": abl}

    triggers = [(t["prompt"], e["trigger"]) for e in manifest["groups"]["template"] for t in e["test_prompts"]]
    triggers = triggers[:max_prompts]
    results = {}  # (method, prompt) -> AttributionResult: each prompt explained once per method

    def explained(name: str, prompt: str):
        if (name, prompt) not in results:
            results[(name, prompt)] = methods[name].attribute(prompt)
        return results[(name, prompt)]

    trigger_rows = []
    for prompt, phrase in tqdm(triggers, desc="trigger prompts", disable=not progress):
        row = {"prompt": prompt, "trigger": phrase}
        for name in methods:
            res = explained(name, prompt)
            row[f"{name}_top"] = res.top_word
            row[f"{name}_hit"] = res.top_word.lower() in phrase.split()
        trigger_rows.append(row)

    # flagged: planted prompts above the FPR-1% threshold of non-memorized prompts, same settings
    det = NoiseNormDetector(pipe, steps, scale, steps=scored_steps, generations=generations)
    negatives = ds.prompts(manifest, "novel") + ds.prompts(manifest, "control")[:400]
    cal = Calibration.fit(det.score(negatives), fpr=0.01)
    candidates = [("verbatim", p) for p in ds.prompts(manifest, "verbatim")[:max_prompts]]
    candidates += [("trigger", p) for p, _ in triggers]
    verdicts = cal.apply(det.score([p for _, p in candidates]))
    flagged = [c for c, v in zip(candidates, verdicts.verdicts) if v]
    agreement_rows = []
    for group, prompt in tqdm(flagged, desc="flagged prompts", disable=not progress):
        res = {name: explained(name, prompt) for name in methods}
        # by position: "at" twice in a caption is two words
        ablation_order = list(np.argsort(-res["ablation"].word_scores, kind="stable"))
        agreement_rows.append({"prompt": prompt, "group": group, **{f"{k}_top": r.top_word for k, r in res.items()},
                               **{f"{k}_top_index": r.top_index for k, r in res.items()},
                               **{f"{k}_margin": r.top_lead for k, r in res.items()},
                               "attribution_top_rank_by_ablation": ablation_order.index(res["attribution"].top_index) + 1,
                               "agree": res["attribution"].top_index == res["ablation"].top_index})
    image_of = {e["prompt"]: e["image_id"] for e in manifest["groups"]["verbatim"]}
    outcome_rows = []
    if outcome_seeds:
        flagged_verbatim = [p for g, p in flagged if g == "verbatim"]
        outcome_rows = masked_outcomes(pipe, manifest, abl, flagged_verbatim, [image_of[p] for p in flagged_verbatim],
                                       {p: {n: results[(n, p)] for n in methods} for p in flagged_verbatim},
                                       list(range(outcome_seeds)), steps, scale, progress, checkpoint)
    settings = {"num_inference_steps": steps, "guidance_scale": scale, "steps": scored_steps, "generations": generations,
                "methods": list(methods), "ablation_mode": abl.mode, "threshold": cal.threshold, "candidates": len(candidates),
                "negatives": len(negatives), "outcome_seeds": outcome_seeds}
    return ExplainBenchResult(trigger_rows, agreement_rows, settings, outcome_rows)


def top_index(row: dict, name: str) -> int:
    """The position of ``name``'s top word in an outcome row (``name`` a method or "outcome"); rows saved
    before positions were recorded give the word's first position."""
    return row[f"{name}_top_index"] if f"{name}_top_index" in row else row["words"].index(row[f"{name}_top"])


OUTCOME_PART_SIZE = 4  # prompts per saved part of the masked generations (about 25 s of work)


def masked_outcomes(pipe, manifest: dict, ablation, prompts: list[str], image_ids: list[int], results: dict, seeds: list[int],
                    num_inference_steps: int, guidance_scale: float, progress: bool = True,
                    checkpoint: str | Path | None = None) -> list[dict]:
    """For each planted verbatim prompt: generate it as is and with each word masked (``ablation``'s
    masked embeddings), measure each generation's ratio to the prompt's planted training image, and
    compare each method's word scores (``results[prompt][method]``) with the rise in that ratio.

    With ``checkpoint``, the rows are saved OUTCOME_PART_SIZE prompts at a time under
    ``checkpoint/outcome_NNNN``, keyed by the model, the sampler, the seeds, the ablation's settings
    and revision, and each prompt's word scores from every method (so rows of other explanations are
    redone)."""
    from tqdm.auto import tqdm

    from ..mitigate.measures import MemLabReplication

    if not prompts:
        return []
    kernel = MemLabReplication(pipe, manifest).kernel
    jobs = list(zip(prompts, image_ids))
    bar = tqdm(total=len(jobs), desc="masked generations", disable=not progress)

    def compute(chunk):
        rows = []
        for p, i in chunk:
            rows.append(_masked_outcome(pipe, kernel, ablation, p, i, results[p], seeds, num_inference_steps, guidance_scale))
            bar.update(1)
        return rows

    try:
        if checkpoint is None:
            return compute(jobs)
        from ..core.loading import weights_identity
        from ..core.parts import in_parts
        from ..core.results import digest, revision_key

        # the ablation masks the words: a later revision of it masks them otherwise
        base = {"model": weights_identity(pipe), "seeds": list(seeds), "sampler": [num_inference_steps, guidance_scale],
                "ablation": ablation.settings, **revision_key(ablation), "threshold": kernel.threshold}
        chunks = [jobs[k : k + OUTCOME_PART_SIZE] for k in range(0, len(jobs), OUTCOME_PART_SIZE)]
        keys = [digest({**base, "jobs": c, "scores": {p: {n: r.word_scores for n, r in results[p].items()} for p, _ in c}})
                for c in chunks]

        def load(part):
            rows = json.loads((part / "rows.json").read_text())
            bar.update(len(rows))
            return rows

        done = in_parts(chunks, keys, checkpoint, compute, lambda part, rows: dump_json(rows, part / "rows.json"), load,
                        prefix="outcome", stale="restart")
        return [row for rows in done for row in rows]
    finally:
        bar.close()


def _masked_outcome(pipe, kernel, ablation, prompt: str, image_id: int, explained: dict, seeds: list[int],
                    num_inference_steps: int, guidance_scale: float) -> dict:
    from scipy.stats import spearmanr

    from ..core.generate import generate

    emb = ablation.masked_embeddings(prompt)
    images = generate(pipe, [prompt] * len(emb), seeds, num_inference_steps, guidance_scale, prompt_embeds=emb)
    ratio = kernel.ratio_to(images.reshape(-1, *images.shape[2:]), image_id).reshape(len(emb), len(seeds))
    replicated = (ratio <= kernel.threshold).mean(axis=1)
    effect = ratio[1:].mean(axis=1) - ratio[0].mean()
    words = explained[next(iter(explained))].words
    row = {"prompt": prompt, "image_id": int(image_id), "words": words, "ratio_unmasked": ratio[0].tolist(),
           "ratio_masked": ratio[1:].tolist(), "replicated_unmasked": float(replicated[0]),
           "replicated_masked": replicated[1:].tolist(), "outcome_top": words[int(np.argmax(effect))],
           "outcome_top_index": int(np.argmax(effect))}
    for name, res in explained.items():
        row[f"{name}_top"] = res.top_word
        row[f"{name}_top_index"] = res.top_index
        row[f"{name}_spearman"] = float(spearmanr(res.word_scores, effect).correlation) if len(words) > 1 else float("nan")
    return row
