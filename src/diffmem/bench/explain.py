"""``diffmem bench explain``: do the attributions point at the words that carry memorization?

On MemLab's ground truth:

- trigger prompts (the manifest's template test prompts: a trigger phrase in a new context):
  the top-ranked word should be one of the trigger phrase's two words;
- flagged prompts (planted verbatim and trigger prompts whose first-step score passes a
  threshold calibrated at FPR 1% on non-memorized prompts): gradient attribution and ablation
  should rank the same word first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.results import dump_json


@dataclass
class ExplainBenchResult:
    trigger_rows: list[dict]  # prompt, trigger, top words by method, hit
    agreement_rows: list[dict]  # flagged prompt, top word by each method, agree
    settings: dict

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

    def bars(self) -> dict[str, bool]:
        return {"trigger phrase holds the top word (attribution) >= 0.9": self.trigger_top_word_rate["attribution"] >= 0.9,
                "attribution and ablation agree on flagged prompts >= 0.8": self.agreement_rate >= 0.8}

    def table(self) -> str:
        rates = self.trigger_top_word_rate
        lines = ["| measure | value |", "|---|---|"]
        for m, v in rates.items():
            lines.append(f"| trigger prompts whose top word is in the trigger phrase ({m}) | {v:.3f} ({len(self.trigger_rows)} prompts) |")
        lines.append(f"| flagged prompts where attribution and ablation rank the same top word | "
                     f"{self.agreement_rate:.3f} ({len(self.agreement_rows)} flagged of {self.settings['candidates']}) |")
        for g, (rate, n) in self.agreement_by_group().items():
            lines.append(f"| ... of which {g} prompts | {rate:.3f} ({n}) |")
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        dump_json({"trigger_top_word_rate": self.trigger_top_word_rate, "agreement_rate": self.agreement_rate,
                   "agreement_by_group": {g: {"rate": r, "n": n} for g, (r, n) in self.agreement_by_group().items()},
                   "bars": self.bars(), "settings": self.settings, "trigger_rows": self.trigger_rows,
                   "agreement_rows": self.agreement_rows, "table": self.table()}, out / "bench_explain.json")
        return out / "bench_explain.json"


def bench_explain(pipe, manifest: dict, generations: int = 1, max_prompts: int | None = None,
                  progress: bool = True) -> ExplainBenchResult:
    from tqdm.auto import tqdm

    from ..core.loading import sampler_defaults
    from ..detect import Calibration, NoiseNormDetector
    from ..explain import TokenAblation, TokenAttribution
    from ..memlab import dataset as ds

    d = sampler_defaults(pipe)
    steps, scale = d["num_inference_steps"], d["guidance_scale"]
    attr = TokenAttribution(pipe, steps, scale, steps=(0,), generations=generations)
    abl = TokenAblation(pipe, steps, scale, steps=(0,), generations=generations)
    methods = {"attribution": attr, "ablation": abl}

    triggers = [(t["prompt"], e["trigger"]) for e in manifest["groups"]["template"] for t in e["test_prompts"]]
    triggers = triggers[: max_prompts or None]
    trigger_rows, top = [], {}
    for prompt, phrase in tqdm(triggers, desc="trigger prompts", disable=not progress):
        row = {"prompt": prompt, "trigger": phrase}
        for name, m in methods.items():
            res = m.attribute(prompt)
            top[(name, prompt)] = res.top_word
            row[f"{name}_top"] = res.top_word
            row[f"{name}_hit"] = res.top_word.lower() in phrase.split()
        trigger_rows.append(row)

    # flagged: planted prompts above the FPR-1% threshold of non-memorized prompts, same settings
    det = NoiseNormDetector(pipe, steps, scale, steps=[0], generations=generations)
    negatives = ds.prompts(manifest, "novel") + ds.prompts(manifest, "control")[:400]
    cal = Calibration.fit(det.score(negatives), fpr=0.01)
    candidates = [("verbatim", p) for p in ds.prompts(manifest, "verbatim")[: max_prompts or None]]
    candidates += [("trigger", p) for p, _ in triggers]
    verdicts = cal.apply(det.score([p for _, p in candidates]))
    flagged = [c for c, v in zip(candidates, verdicts.verdicts) if v]
    agreement_rows = []
    for group, prompt in tqdm(flagged, desc="flagged prompts", disable=not progress):
        tops = {name: top.get((name, prompt)) or m.attribute(prompt).top_word for name, m in methods.items()}
        agreement_rows.append({"prompt": prompt, "group": group, **{f"{k}_top": v for k, v in tops.items()},
                               "agree": tops["attribution"] == tops["ablation"]})
    settings = {"num_inference_steps": steps, "guidance_scale": scale, "steps": [0], "generations": generations,
                "methods": list(methods), "ablation_mode": abl.mode, "threshold": cal.threshold, "candidates": len(candidates),
                "negatives": len(negatives)}
    return ExplainBenchResult(trigger_rows, agreement_rows, settings)
