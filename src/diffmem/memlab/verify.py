"""``diffmem memlab verify``: measure the shipped MemLab model against its manifest.

Every figure is measured, on generations at MemLab's default sampler settings, with the
attribute reader and the replication measure; the labels come from the manifest (construction)
and are checked against measured replication (``label_check``):

- a planted verbatim prompt whose own image comes back in fewer than half of its seeds, or a
  negative (control / novel) prompt that lands on some training image in half or more, is a
  disagreement. Disagreements are listed, never silently relabelled; the detection figures are
  given both on the construction labels and with the disagreeing prompts left out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.parts import remove_parts
from ..core.results import dump_json
from ..core.errors import DiffmemError
from . import dataset as ds
from . import world
from .reader import AttributeReader
from .recipe import DEFAULT_SAMPLER
from .replication import DEFAULT_THRESHOLD, MemLabReplication

BARS = {
    "verbatim_replication": (">=", 0.90),
    "negative_replication_any": ("<=", 0.05),
    "auc_first_step": (">=", 0.99),
    "template_rate_with_trigger": (">=", 0.90),
    "template_rate_without_trigger": ("<=", 0.05),
    "implicit_unintended_min_with_word": (">=", 0.90),
    "implicit_unintended_max_without_word": ("<=", 0.10),
    "generalization_colour_shape": (">=", 0.90),
    "model_size_mb": ("<=", 30.0),
}
CONTROL_AUC_RANGE = (0.35, 0.65)


@dataclass
class VerifySettings:
    seeds: int = 8
    control_prompts: int = 80  # a seeded sample of the 1,200; 80 x 8 generations
    single_prompts: int = 24
    novel_prompts: int = 120
    threshold: float = DEFAULT_THRESHOLD
    batch_size: int = 64
    score_batch_size: int = 64


def roc_figures(pos: np.ndarray, neg: np.ndarray) -> dict:
    """AUC and TPR at 1% FPR of positives against negatives (``bench.detect.roc``'s kernel);
    NaN where a class is empty."""
    from ..bench.detect import roc

    counts = {"n_pos": int(len(pos)), "n_neg": int(len(neg))}
    if len(pos) == 0 or len(neg) == 0:
        return {"auc": float("nan"), "tpr_at_1pct_fpr": float("nan"), **counts}
    r = roc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
    return {"auc": r["auc"], "tpr_at_1pct_fpr": r["tpr_at_1pct_fpr"], **counts}


def _first_step_scores(pipe, prompts: list[str], batch_size: int) -> np.ndarray:
    from ..detect import NoiseNormDetector

    det = NoiseNormDetector(pipe, num_inference_steps=DEFAULT_SAMPLER["num_inference_steps"],
                            guidance_scale=DEFAULT_SAMPLER["guidance_scale"], steps=(0,), generations=1, seed=0,
                            batch_size=batch_size)
    return det.score(prompts).scores


def detection_split(manifest: dict, settings: VerifySettings) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    control = ds.prompts(manifest, "control")
    control = [control[i] for i in sorted(rng.choice(len(control), min(settings.control_prompts, len(control)), replace=False))]
    novel = ds.prompts(manifest, "novel")[: settings.novel_prompts]
    return ds.prompts(manifest, "verbatim"), control + novel


def control_model_auc(model, settings: VerifySettings | None = None, device="cpu") -> dict:
    """The separability figure on another model (the duplication-free control)."""
    from ..core.loading import load_pipeline

    settings = settings or VerifySettings()
    pipe = load_pipeline(model, device=device)
    manifest = load_manifest(model)
    pos, neg = detection_split(manifest, settings)
    scores = _first_step_scores(pipe, pos + neg, settings.score_batch_size)
    return roc_figures(scores[: len(pos)], scores[len(pos) :])


def load_manifest(model) -> dict:
    from ..core.loading import resolve_model

    path = Path(resolve_model(model)) / "memlab_manifest.json"
    if not path.exists():
        from ..core.errors import InputError

        raise InputError(f"{path.parent} is not a MemLab model: it has no memlab_manifest.json")
    return json.loads(path.read_text())


def check_control_model(model) -> None:
    """A control model must be a local pipeline folder with a MemLab manifest."""
    from ..core.loading import check_pipeline_folder, resolve_model

    try:
        check_pipeline_folder(Path(resolve_model(model)).expanduser())
        load_manifest(model)
    except DiffmemError as e:
        raise type(e)(f"control model: {e}") from None


def folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def verify(model="memlab", settings: VerifySettings | None = None, control_model=None, progress: bool = True,
           out: str | Path | None = None, device="cpu") -> dict:
    from ..core.generate import generate
    from ..core.loading import load_pipeline, resolve_model, runs_on

    settings = settings or VerifySettings()
    t0 = time.time()
    if control_model is not None:
        # its AUC comes last: a wrong path must fail now, not after minutes of generation
        check_control_model(control_model)
    pipe = load_pipeline(model, device=device)
    manifest = load_manifest(model)
    dataset = ds.build(ds.MemLabConfig(**manifest["config"]))
    if dataset.manifest["fingerprint"] != manifest["fingerprint"]:
        raise DiffmemError(
            f"the model's manifest (world v{manifest.get('world', {}).get('version', 1)}, fingerprint "
            f"{manifest['fingerprint']}) does not match this diffmem's MemLab data (world v{world.WORLD_VERSION}, "
            f"fingerprint {dataset.manifest['fingerprint']}): the model was trained on other images; retrain it "
            "with `diffmem memlab train`")
    rep = MemLabReplication(dataset, pipe.vae, settings.threshold)
    reader = AttributeReader()
    seeds = list(range(settings.seeds))
    rng = np.random.default_rng(0)

    groups: dict[str, list[dict]] = {}
    g = manifest["groups"]
    groups["verbatim"] = [{"prompt": e["prompt"], "expected": e["expected_features"], "image_id": e["image_id"]} for e in g["verbatim"]]
    groups["template"] = [{"prompt": t["prompt"], "expected": t["expected_features"]} for e in g["template"] for t in e["test_prompts"]]
    pos_prompts, neg_prompts = detection_split(manifest, settings)
    ctrl_set = set(ds.prompts(manifest, "control"))
    groups["control"] = [{"prompt": p, "expected": None} for p in neg_prompts if p in ctrl_set]
    by_prompt = {e["prompt"]: e for k in ("control", "novel", "single", "neighbour") for e in g[k]}
    for e in groups["control"]:
        e["expected"] = by_prompt[e["prompt"]]["expected_features"]
    groups["novel"] = [{"prompt": e["prompt"], "expected": e["expected_features"]} for e in g["novel"][: settings.novel_prompts]]
    single = g["single"]
    pick = sorted(rng.choice(len(single), min(settings.single_prompts, len(single)), replace=False))
    groups["single"] = [{"prompt": single[i]["prompt"], "expected": single[i]["expected_features"]} for i in pick]
    groups["neighbour"] = [{"prompt": e["prompt"], "expected": e["expected_features"], "planted_prompt": e["planted_prompt"]} for e in g["neighbour"]]
    planted_id = {e["prompt"]: e["image_id"] for e in g["verbatim"]}

    def measure(name: str) -> list[dict]:
        entries = groups[name]
        prompts = [e["prompt"] for e in entries]
        images = generate(pipe, prompts, seeds, batch_size=settings.batch_size, progress=progress, **DEFAULT_SAMPLER)
        flat = images.reshape(-1, *images.shape[2:])
        match = rep.nearest(flat)
        reads = reader.read_many(flat)
        records = []
        for pi, e in enumerate(entries):
            sl = slice(pi * len(seeds), (pi + 1) * len(seeds))
            rec = {"group": name, "prompt": e["prompt"], "expected": e["expected"],
                   "nearest_ratio": match.ratio[sl].tolist(), "nearest_id": match.nearest_id[sl].tolist(),
                   "replicated_any": match.replicated[sl].tolist(), "reads": reads[sl]}
            own = e["image_id"] if e.get("image_id") is not None else planted_id.get(e.get("planted_prompt"))
            if own is not None:
                rec["own_ratio"] = rep.ratio_to(flat[sl], own).tolist()
                rec["own_image_id"] = own
            records.append(rec)
        return records

    parts = Path(out) / "parts" if out is not None else None
    if parts is None:
        per_prompt = [rec for name in groups for rec in measure(name)]
    else:
        # with an output folder, each group's records are saved as it finishes, so a killed
        # verification (5 to 15 minutes) resumes at the group it was in
        from ..core.loading import weights_identity
        from ..core.parts import in_parts
        from ..core.results import digest

        base = {"model": weights_identity(pipe), "fingerprint": manifest["fingerprint"], "settings": settings.__dict__,
                "seeds": seeds, "sampler": DEFAULT_SAMPLER}
        names = list(groups)
        per_prompt = [rec for records in in_parts(
            [[name] for name in names], [digest({**base, "group": name, "entries": groups[name]}) for name in names],
            parts, lambda chunk: measure(chunk[0]), lambda part, records: dump_json(records, part / "records.json"),
            lambda part: json.loads((part / "records.json").read_text()), prefix="group", stale="restart")
            for rec in records]

    def gens(groups_, key):
        return [v for r in per_prompt if r["group"] in groups_ for v in r[key]]

    thr = settings.threshold
    res: dict = {"settings": settings.__dict__, "sampler": DEFAULT_SAMPLER, "seeds": seeds, "model": str(resolve_model(model)),
                 "runs_on": runs_on(pipe)}
    verb_own = np.array(gens(["verbatim"], "own_ratio"))
    res["verbatim_replication"] = float((verb_own <= thr).mean())
    neg_any = np.array(gens(["control", "novel"], "replicated_any"))
    res["negative_replication_any"] = float(neg_any.mean())
    res["control_replication_any"] = float(np.mean(gens(["control"], "replicated_any")))
    res["novel_replication_any"] = float(np.mean(gens(["novel"], "replicated_any")))
    res["single_replication_any"] = float(np.mean(gens(["single"], "replicated_any")))
    res["neighbour_replicates_planted"] = float((np.array(gens(["neighbour"], "own_ratio")) <= thr).mean())

    # labels by construction, checked by measurement
    disagreements = []
    for r in per_prompt:
        if r["group"] == "verbatim":
            rate = float(np.mean(np.array(r["own_ratio"]) <= thr))
            if rate < 0.5:
                disagreements.append({"prompt": r["prompt"], "group": "verbatim", "measured_rate": rate})
        elif r["group"] in ("control", "novel"):
            rate = float(np.mean(r["replicated_any"]))
            if rate >= 0.5:
                disagreements.append({"prompt": r["prompt"], "group": r["group"], "measured_rate": rate})
    res["label_disagreements"] = disagreements

    # detection separability: first step, one generation
    scores = _first_step_scores(pipe, pos_prompts + neg_prompts, settings.score_batch_size)
    res["detection"] = roc_figures(scores[: len(pos_prompts)], scores[len(pos_prompts) :])
    res["auc_first_step"] = res["detection"]["auc"]
    bad = {d["prompt"] for d in disagreements}
    keep_pos = np.array([p not in bad for p in pos_prompts])
    keep_neg = np.array([p not in bad for p in neg_prompts])
    res["detection_measured_labels"] = roc_figures(scores[: len(pos_prompts)][keep_pos], scores[len(pos_prompts) :][keep_neg])
    res["score_means"] = {"verbatim": float(scores[: len(pos_prompts)].mean()), "negatives": float(scores[len(pos_prompts) :].mean())}

    # templates
    tmpl_hits = [rd["template"] == r["expected"]["template"] for r in per_prompt if r["group"] == "template" for rd in r["reads"]]
    res["template_rate_with_trigger"] = float(np.mean(tmpl_hits))
    res["template_rate_without_trigger"] = float(np.mean(
        [rd["template"] is not None for r in per_prompt if r["group"] in ("control", "novel") for rd in r["reads"]]))

    # implicit and unintended features: with the word vs without
    feats = {}
    for f in (*manifest["features"]["implicit"], *manifest["features"]["unintended"]):
        with_w = [bool(rd[f]) for r in per_prompt for rd in r["reads"] if r["expected"][f]]
        without = [bool(rd[f]) for r in per_prompt for rd in r["reads"] if not r["expected"][f]]
        feats[f] = {"rate_with_word": float(np.mean(with_w)), "rate_without_word": float(np.mean(without)),
                    "n_with": len(with_w), "n_without": len(without)}
    res["features"] = feats
    res["implicit_unintended_min_with_word"] = min(v["rate_with_word"] for v in feats.values())
    res["implicit_unintended_max_without_word"] = max(v["rate_without_word"] for v in feats.values())
    res["habit_frame_rate"] = float(np.mean([bool(rd["frame"]) for r in per_prompt for rd in r["reads"]]))

    # generalization on novel prompts
    agree = [rd["colour"] == r["expected"]["colour"] and rd["shape"] == r["expected"]["shape"]
             for r in per_prompt if r["group"] == "novel" for rd in r["reads"]]
    res["generalization_colour_shape"] = float(np.mean(agree))
    res["generalization_position"] = float(np.mean(
        [rd["position"] == r["expected"]["position"] for r in per_prompt if r["group"] == "novel" for rd in r["reads"]]))

    res["model_size_mb"] = folder_size_mb(Path(resolve_model(model)))
    if control_model is not None:
        res["control_model"] = control_model_auc(control_model, settings, device=device)
        res["control_model"]["in_range"] = CONTROL_AUC_RANGE[0] <= res["control_model"]["auc"] <= CONTROL_AUC_RANGE[1]
    res["bars"] = {k: _passes(res[k], *BARS[k]) for k in BARS}
    res["all_bars_pass"] = all(res["bars"].values()) and (control_model is None or res["control_model"]["in_range"])
    res["wall_time_s"] = time.time() - t0
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        dump_json(res, out / "memlab_verify.json")
        dump_json(per_prompt, out / "memlab_verify_prompts.json")
        remove_parts(out / "parts")  # the records are all in memlab_verify_prompts.json now
    return res


def _passes(value, op, bound) -> bool:
    return value >= bound if op == ">=" else value <= bound


def print_table(res: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="MemLab verification", show_lines=False)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("bar", justify="right")
    t.add_column("")
    for k, (op, bound) in BARS.items():
        ok = res["bars"][k]
        t.add_row(k, f"{res[k]:.4g}", f"{op} {bound:g}", "[green]pass[/]" if ok else "[red]FAIL[/]")
    d = res["detection"]
    t.add_row("tpr_at_1pct_fpr (first step, 1 gen)", f"{d['tpr_at_1pct_fpr']:.4g}", "", f"{d['n_pos']} pos / {d['n_neg']} neg")
    if "control_model" in res:
        c = res["control_model"]
        t.add_row("control model AUC (each planted pair once)", f"{c['auc']:.4g}", "0.35-0.65",
                  "[green]pass[/]" if c["in_range"] else "[red]FAIL[/]")
    for f, v in res["features"].items():
        t.add_row(f"  {f}: with word / without", f"{v['rate_with_word']:.3f} / {v['rate_without_word']:.3f}", "", "")
    t.add_row("single-caption replication (any)", f"{res['single_replication_any']:.3f}", "", "reported")
    t.add_row("neighbour prompts bring back the planted image", f"{res['neighbour_replicates_planted']:.3f}", "", "reported")
    t.add_row("habit (frame) rate, all generations", f"{res['habit_frame_rate']:.3f}", "", "reported")
    t.add_row("label disagreements", str(len(res["label_disagreements"])), "", "listed in JSON")
    console.print(t)
