"""``diffmem bench detect``: the field's evaluation protocol on labelled prompt sets.

Memorized prompts are positives. AUC and TPR@1%FPR come from scikit-learn's ``roc_curve``, with
TPR@1%FPR the TPR at the largest FPR below 0.01. The settings grid (scored steps x generations)
is computed from one run: the detector records every step and generation, and each cell averages
its subset, so the grid costs no more than its largest cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.prompts import read_prompts
from ..core.results import dump_json


@dataclass
class LabelledPrompts:
    prompts: list[str]
    labels: np.ndarray  # 1 = memorized
    groups: list[str]
    source: str
    # other splits of the same prompts reported beside the main one, {name: row indices}
    subsets: dict[str, np.ndarray] = field(default_factory=dict)
    main: np.ndarray | None = None  # rows of the main split; None = all rows

    def __post_init__(self):
        # here, not after scoring: an ROC needs both classes, and scoring a large set takes hours
        main = np.asarray(self.labels)[self.main_rows()]
        if not ((main == 1).any() and (main == 0).any()):
            where = " in its main split" if self.main is not None else ""
            raise InputError(f"the labelled set {self.source} needs both memorized and non-memorized prompts{where}; "
                             f"it has {int((main == 1).sum())} memorized and {int((main == 0).sum())} non-memorized")

    def main_rows(self) -> np.ndarray:
        return np.arange(len(self.prompts)) if self.main is None else np.asarray(self.main)


def memlab_feature_words(manifest: dict) -> set[str]:
    """Caption words that call up a planted implicit or unintended feature ("lucky" -> stamp)."""
    return {f["word"] for kind in ("implicit", "unintended") for f in manifest["groups"].get(kind, [])}


def memlab_labelled(manifest: dict, max_control: int | None = 400, feature_word_negatives: bool = False) -> LabelledPrompts:
    """MemLab: planted verbatim prompts and new-context template prompts against control and novel
    prompts (a seeded sample of ``max_control`` of the 1,200 control captions, all 200 novel ones).

    A control or novel caption that names a planted implicit or unintended feature word ("a lucky
    red circle" -> the planted stamp) is not a non-memorized prompt: the model reproduces that
    memorized feature for it, and the detector rightly scores it high. Such captions are left out
    of the main split's negatives (group ``control+feature`` / ``novel+feature``) and reported in a
    second split with every control and novel caption; ``feature_word_negatives=True`` makes that
    second split the main one.
    """
    from ..memlab import dataset as ds

    pos = [("verbatim", p) for p in ds.prompts(manifest, "verbatim")] + [("template", p) for p in ds.prompts(manifest, "template")]
    control = ds.prompts(manifest, "control")
    if max_control is not None and len(control) > max_control:
        rng = np.random.default_rng(0)
        control = [control[i] for i in sorted(rng.choice(len(control), max_control, replace=False))]
    words = memlab_feature_words(manifest)
    neg = [(g + "+feature" if words & set(p.split()) else g, p)
           for g, ps in (("control", control), ("novel", ds.prompts(manifest, "novel"))) for p in ps]
    rows = pos + neg
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    everything = np.arange(len(rows))
    clean = np.array([i for i, (g, _) in enumerate(rows) if not g.endswith("+feature")])
    n_feature = len(rows) - len(clean)
    if not n_feature:
        return LabelledPrompts([p for _, p in rows], labels, [g for g, _ in rows], "memlab")
    if feature_word_negatives:
        main, other = everything, ("negatives naming no planted feature word", clean)
    else:
        main, other = clean, (f"all control and novel prompts, {n_feature} naming a planted feature word", everything)
    return LabelledPrompts([p for _, p in rows], labels, [g for g, _ in rows], "memlab", {other[0]: other[1]}, main)


def labelled_from_files(data: str | None = None, positives: str | None = None, negatives: str | None = None,
                        label_column: str = "label", column: str | None = None) -> LabelledPrompts:
    """A csv with a label column (1/0, true/false, memorized/...), or one file per class
    (.txt, or .jsonl such as Webster's ``caption``/``index``/``url`` list)."""
    if data:
        import csv

        path = Path(data)
        if path.suffix.lower() != ".csv":
            raise InputError("--data takes a .csv with a label column; give one file per class with --positives/--negatives")
        read_prompts(path, column)  # same checks as every prompt file
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or label_column not in rows[0]:
            raise InputError(f"{path} has no label column {label_column!r}")
        col = column or next(c for c in ("prompt", "caption", "text") if c in rows[0])
        labels = np.array([_parse_label(r[label_column], path, i + 2) for i, r in enumerate(rows)], float)
        return LabelledPrompts([r[col] for r in rows], labels, ["csv"] * len(rows), str(path))
    if not (positives and negatives):
        raise InputError("give --data FILE.csv, or both --positives and --negatives (or use the built-in memlab set)")
    pos, neg = read_prompts(positives, column), read_prompts(negatives, column)
    return LabelledPrompts(pos + neg, np.r_[np.ones(len(pos)), np.zeros(len(neg))],
                           ["positive"] * len(pos) + ["negative"] * len(neg), f"{positives} | {negatives}")


def _parse_label(v: str, path, line) -> int:
    t = str(v).strip().lower()
    if t in ("1", "true", "yes", "memorized", "mem", "vm", "tm", "positive"):
        return 1
    if t in ("0", "false", "no", "non-memorized", "nonmemorized", "not memorized", "negative", "none"):
        return 0
    raise InputError(f"{path} line {line}: label {v!r} is not 1/0, true/false or memorized/non-memorized")


def roc(labels: np.ndarray, scores: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise InputError("the labelled set needs both memorized and non-memorized prompts")
    fpr, tpr, thr = roc_curve(labels, scores)
    below = fpr < 0.01
    return {"auc": float(roc_auc_score(labels, scores)), "tpr_at_1pct_fpr": float(tpr[below].max()) if below.any() else 0.0,
            "fpr": fpr.tolist(), "tpr": tpr.tolist()}


@dataclass
class DetectBenchResult:
    source: str
    grid: list[dict]  # {"steps": label, "generations": n, "auc", "tpr_at_1pct_fpr", ...}
    settings: dict
    seeds: list[int]
    model: dict
    extra_rows: list[dict] = field(default_factory=list)  # other detectors, same table
    subset_grids: dict[str, list[dict]] = field(default_factory=dict)  # the grid on other splits
    subset_sizes: dict[str, list[int]] = field(default_factory=dict)  # {name: [n_pos, n_neg]}
    subset_extra_rows: dict[str, list[dict]] = field(default_factory=dict)  # other detectors on other splits
    hardest_negatives: list[dict] = field(default_factory=list)  # top first-step scores among negatives

    def table(self) -> str:
        step_labels = list(dict.fromkeys(r["steps"] for r in self.grid))
        gens = sorted({r["generations"] for r in self.grid})
        lines = ["| steps \\ generations | " + " | ".join(f"n={g}: AUC / TPR@1%FPR" for g in gens) + " |",
                 "|---|" + "---|" * len(gens)]
        if self.subset_grids:  # say which split the first block is
            lines.append(f"| *main split: {self.n_pos} vs {self.n_neg}* |" + " |" * len(gens))
        for sl in step_labels:
            cells = []
            for g in gens:
                r = next(r for r in self.grid if r["steps"] == sl and r["generations"] == g)
                cells.append(f"{r['auc']:.3f} / {r['tpr_at_1pct_fpr']:.3f}")
            lines.append(f"| noise norm, {sl} | " + " | ".join(cells) + " |")
        for r in self.extra_rows:
            lines.append(f"| {r['name']} | " + f"{r['auc']:.3f} / {r['tpr_at_1pct_fpr']:.3f} (n={r['generations']})" + " |")
        for name, grid in self.subset_grids.items():
            npos, nneg = self.subset_sizes[name]
            lines.append(f"| *{name}: {npos} vs {nneg}* |" + " |" * len(gens))
            for sl in step_labels:
                cells = [next(f"{r['auc']:.3f} / {r['tpr_at_1pct_fpr']:.3f}" for r in grid if r["steps"] == sl and r["generations"] == g)
                         for g in gens]
                lines.append(f"| noise norm, {sl} | " + " | ".join(cells) + " |")
            for r in self.subset_extra_rows.get(name, []):
                lines.append(f"| {r['name']} | " + f"{r['auc']:.3f} / {r['tpr_at_1pct_fpr']:.3f} (n={r['generations']})" + " |")
        return "\n".join(lines)

    def save(self, out: str | Path) -> dict:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        slim = lambda rows: [{k: v for k, v in r.items() if k not in ("fpr", "tpr")} for r in rows]  # noqa: E731
        dump_json({"source": self.source, "grid": slim(self.grid), "other_detectors": slim(self.extra_rows),
                   "settings": self.settings, "seeds": self.seeds, "model": self.model, "table": self.table(),
                   "n_pos": self.n_pos, "n_neg": self.n_neg,
                   "subsets": {k: {"n_pos": self.subset_sizes[k][0], "n_neg": self.subset_sizes[k][1], "grid": slim(v),
                                   "other_detectors": slim(self.subset_extra_rows.get(k, []))}
                               for k, v in self.subset_grids.items()},
                   "hardest_negatives": self.hardest_negatives,
                   "roc_curves": {f"{r['steps']} n={r['generations']}": {"fpr": r["fpr"], "tpr": r["tpr"]} for r in self.grid}},
                  out / "bench_detect.json")
        self.plot(out / "bench_detect_roc.png")
        return {"json": out / "bench_detect.json", "png": out / "bench_detect_roc.png"}

    def plot(self, path) -> None:
        from ..core.figures import subplots

        fig, ax = subplots(figsize=(5.2, 4.6))
        for r in self.grid + self.extra_rows:
            name = r.get("name") or f"noise norm, {r['steps']}, n={r['generations']}"
            ax.plot(r["fpr"], r["tpr"], label=f"{name} (AUC {r['auc']:.3f})", lw=1.3)
        ax.axvline(0.01, color="grey", ls=":", lw=1)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_xlabel("false-positive rate (log scale above 0.01)")
        ax.set_ylabel("true-positive rate")
        s = self.settings
        # a fine-tune is named (by its files, not the model's path: a title line holds little): its ROC is not the base model's
        from ..core.loading import adapters_named

        adapted = f"\n{adapters}" if (adapters := adapters_named(self.model).strip()) else ""
        ax.set_title(f"{self.source}: {int(self.n_pos)} memorized vs {int(self.n_neg)} not\n"
                     f"{s['num_inference_steps']} steps, guidance {s['guidance_scale']}, seeds {self.seeds}{adapted}", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    n_pos: int = 0
    n_neg: int = 0


def step_sets(num_inference_steps: int) -> dict[str, list[int]]:
    """The published table's rows: first step, first 10 steps (or a fifth), all steps."""
    few = min(10, max(2, num_inference_steps // 5))
    return {"first step": [0], f"first {few} steps": list(range(few)), f"all {num_inference_steps} steps": list(range(num_inference_steps))}


PART_SIZE = 256  # prompts per saved part of a checkpointed benchmark: the unit a killed run redoes


def _values(detector, prompts: list[str], checkpoint: str | Path | None, name: str, progress: bool) -> np.ndarray:
    """``detector.score(prompts).values``; with ``checkpoint``, PART_SIZE prompts at a time, each part
    saved under ``checkpoint/{name}_NNNN`` (keyed like ``diffmem detect``'s chunks), so that a killed
    benchmark redoes at most one part of each detector. The benchmark owns the folder: parts of
    other settings are redone."""
    if checkpoint is None:
        return detector.score(prompts, progress=progress).values
    from ..core.parts import in_parts
    from ..core.results import digest
    from ..detect.run import run_identity

    base = run_identity(detector, None)
    chunks = [prompts[i : i + PART_SIZE] for i in range(0, len(prompts), PART_SIZE)]
    done = in_parts(chunks, [digest({**base, "prompts": c}) for c in chunks], checkpoint,
                    lambda chunk: detector.score(chunk, progress=progress).values,
                    lambda part, values: np.save(part / "values.npy", values),
                    lambda part: np.load(part / "values.npy", allow_pickle=False), prefix=name, stale="restart")
    return np.concatenate(list(done))


def bench_detect(pipe, data: LabelledPrompts, generations=(1, 4), num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, batch_size: int = 64, black_box: bool = True,
                 black_box_modes: tuple[str, ...] = ("x0", "images"),
                 progress: bool = True, rows: dict[str, list[int]] | None = None,
                 checkpoint: str | Path | None = None) -> DetectBenchResult:
    """``rows``: the grid's rows, {label: step indices}; default the published table's rows.
    ``checkpoint``: a folder where the scores are saved in parts as they are computed, so a killed
    run resumes (see ``_values``)."""
    from ..core.loading import model_identity, sampler_defaults
    from ..detect.noise_norm import NoiseNormDetector
    from ..detect.seed_consistency import SeedConsistencyDetector

    d = sampler_defaults(pipe)
    nsteps = num_inference_steps or d["num_inference_steps"]
    gscale = guidance_scale if guidance_scale is not None else d["guidance_scale"]
    sets = rows if rows is not None else step_sets(nsteps)
    all_steps = sorted({s for v in sets.values() for s in v})
    det = NoiseNormDetector(pipe, nsteps, gscale, steps=all_steps, generations=max(generations), seed=seed, batch_size=batch_size)
    values = _values(det, data.prompts, checkpoint, "noise_norm", progress)

    def scores(steps, g, rows_idx=slice(None)):
        # mean over the first g generations and the given steps
        idx = [all_steps.index(s) for s in steps]
        return values[rows_idx][:, :g, :][:, :, idx].mean(axis=(1, 2))

    def grid_on(rows_idx):
        return [{"steps": label, "generations": g, **roc(data.labels[rows_idx], scores(steps, g, rows_idx))}
                for label, steps in sets.items() for g in generations]

    main = data.main_rows()
    grid = grid_on(main)
    extra, bb_scores = [], {}
    if black_box:
        # x0 after one step is the cheap view; full images are the truly black-box one. On a
        # zero-terminal-SNR model the one-step x0 of every prompt is close to the data mean
        # (seeds agree at about 0.98 for all prompts), so only the images mode separates there.
        names = {"x0": "seed consistency (black box, x0 after 1 step)", "images": "seed consistency (black box, full images)"}
        for mode in black_box_modes:
            bb = SeedConsistencyDetector(pipe, mode=mode, generations=4, num_inference_steps=nsteps, guidance_scale=gscale,
                                         seed=seed, batch_size=batch_size)
            # a prompt's score is the mean of its values, as SeedConsistencyDetector.score takes it
            bb_scores[names[mode]] = _values(bb, data.prompts, checkpoint, f"seed_consistency_{mode}", False).mean(axis=(1, 2))
            extra.append({"name": names[mode], "generations": 4, **roc(data.labels[main], bb_scores[names[mode]][main])})
    out = DetectBenchResult(data.source, grid, det.settings.to_dict(), det.settings.seeds(), model_identity(pipe), extra)
    out.n_pos, out.n_neg = int(data.labels[main].sum()), int((1 - data.labels[main]).sum())
    for name, idx in data.subsets.items():
        idx = np.asarray(idx)
        out.subset_grids[name] = grid_on(idx)
        out.subset_extra_rows[name] = [{"name": n, "generations": 4, **roc(data.labels[idx], s[idx])} for n, s in bb_scores.items()]
        out.subset_sizes[name] = [int(data.labels[idx].sum()), int((1 - data.labels[idx]).sum())]
    first = scores(next(iter(sets.values())), 1)
    # over every negative, in or out of the main split: this list is where to look for why
    neg = np.flatnonzero(data.labels == 0)
    out.hardest_negatives = [{"prompt": data.prompts[i], "group": data.groups[i], "score": float(first[i])}
                             for i in neg[np.argsort(-first[neg])][:20]]
    return out
