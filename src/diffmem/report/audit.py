"""``diffmem audit``: detect, explain, categorize, mitigate and scan in one resumable run.

Each stage writes its results under ``OUT/<stage>/`` and, last of all, ``OUT/<stage>/stage.json``
holding a key: a hash of the stage's settings, the model's identity, its input prompts and the keys
of the stages it reads. A re-run reuses every stage whose key matches and redoes the others, so a
run killed during mitigation redoes only the mitigation (and, inside it, only the prompt chunks not
yet saved). ``stage.json`` also holds a hash of each file the stage wrote: a stage whose files were
since damaged or removed is redone from nothing, rather than failing when its results are read.
Every input is checked before any model work starts.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.results import digest, dump_json, file_digest, folder_held, foreign_folder, reading_saved, revision_key

STAGES = ("detect", "explain", "categorize", "mitigate", "scan")
DETECT_METHODS = ("noise_norm", "seed_consistency")


@dataclass
class AuditSettings:
    model: str = "memlab"
    lora: str | list[str] | None = None  # a LoRA fused into the model (load_pipeline), at lora_scale, or several
    lora_scale: float | list[float] = 1.0  # one for every LoRA, or one each
    textual_inversion: tuple[str, ...] = ()  # embeddings added to the model: FILE or TOKEN=FILE each
    prompts: str | None = None  # None: MemLab's audit prompt set (needs a MemLab model)
    column: str | None = None
    reference: str | None = None  # non-memorized prompts for calibration; None: MemLab's reference set
    train_data: str | None = None  # a training set to scan (diffmem scan's sources); non-MemLab mitigation is measured against it
    # train_data's caption and image columns, where the scan's defaults (caption / text / prompt; image,
    # file_name, image_path, path) do not find them: a LAION table's TEXT, for one
    train_caption_column: str | None = None
    train_image_column: str | None = None
    # mitigation measures on any model: SSCD (a TorchScript file) for replication against train_data
    # instead of pixel correlation, and CLIP score (a local CLIP folder) for alignment
    sscd: str | None = None
    clip: str | None = None
    fpr: float = 0.01
    seed: int = 0
    # detection: "noise_norm" (Wen et al.) or "seed_consistency" (the first step's x0 alike across seeds).
    # The norm reaches AUC 1.000 on MemLab's planted prompts, seed consistency 0.726; on a LoRA
    # fine-tune of MemLab (benchmarks/memlab_lora_memorization.py) it is the other way round, 0.710
    # against 0.970, though at a 1%-FPR calibration neither flags more than a few of the fine-tuned
    # captions. Explanation and mitigation work on the noise norm either way
    detect_method: str = "noise_norm"
    # detection: seeded generations per prompt (None: 1 for the noise norm, averaged; 4 for seed
    # consistency, which compares them)
    generations: int | None = None
    # detection: scored sampling steps. The first five, not only the first: on MemLab the first step
    # alone reaches AUC 0.992 but TPR@1%FPR 0.89, the first five 1.000 / 1.000 (bench detect), for
    # five UNet passes per prompt and still no decode
    steps: tuple[int, ...] = (0, 1, 2, 3, 4)
    batch_size: int = 32
    grid: bool = True  # with labels: the steps x generations grid of bench detect
    max_explain: int | None = None  # flagged prompts explained, highest scores first (None: all)
    # "attribution" (gradient norms, Wen et al.) or "ablation" (score drop with each word masked). On
    # MemLab's verbatim captions the ablation ranks words by what masking them does to the image more
    # faithfully (Spearman 0.909 against 0.694, bench explain); on trigger prompts both find the trigger
    explain_method: str = "attribution"
    categorize_n: int = 8  # generations per categorized prompt
    max_categorize: int = 12  # flagged prompts categorized, highest scores first
    categorize_controls: int = 4  # unflagged prompts categorized beside them, as a control sample
    mitigate_generations: int = 4
    mitigate_iters: int = 20
    mitigate_lr: float = 0.05
    # mitigation: the loss is the norm over the first k sampling steps (1 = Wen et al.'s first-step
    # loss). Five, as detection scores: on MemLab the first step misses template layouts, so
    # minimizing it leaves them in place (bench mitigate)
    mitigate_loss_steps: int = 5
    # mitigation: optimize every position after BOS ("all", Wen et al.) or only the EOS and padding
    # outputs ("eos", every word's output kept), and start a prompt above the target from its prompt
    # or from its RNA rewrite ("rna", the numbers appended). On MemLab's 100 planted prompts (bench
    # mitigate), replication and attribute agreement from 0.978 / 0.926: "all" 0.045 / 0.841, "eos"
    # 0.072 / 0.929, "eos" from RNA 0.000 / 0.987 (that RNA alone 0.140 / 0.992; RNA with its numbers
    # at random places, as published, 0.000 / 0.453): the one that meets both bars
    mitigate_positions: str = "eos"
    mitigate_rewrite: str | None = "rna"
    max_mitigate: int | None = 16  # flagged prompts mitigated, highest scores first (None: all); ~12 s each on MemLab
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if self.detect_method not in DETECT_METHODS:
            raise InputError(f"--detect-method must be one of {', '.join(m.replace('_', '-') for m in DETECT_METHODS)}, "
                             f"got {self.detect_method!r}")
        if self.generations is None:
            self.generations = 4 if self.detect_method == "seed_consistency" else 1
        elif self.detect_method == "seed_consistency" and self.generations < 2:
            raise InputError(f"seed consistency compares generations of different seeds: --generations must be at least 2, "
                             f"got {self.generations}")
        from ..core.loading import lora_settings

        self.skip = tuple(self.skip)
        self.lora, self.lora_scale = lora_settings(self.lora, self.lora_scale)
        self.textual_inversion = tuple(str(x) for x in self.textual_inversion)
        self.steps = tuple(sorted({int(x) for x in self.steps}))
        if not self.steps or self.steps[0] < 0:
            raise InputError(f"--steps must be step indices >= 0, got {list(self.steps)}")
        unknown = set(self.skip) - set(STAGES)
        if unknown:
            raise InputError(f"unknown stage(s) to skip: {sorted(unknown)}; stages are {', '.join(STAGES)}")
        if "detect" in self.skip:
            raise InputError("detect cannot be skipped: every other stage works on its flagged prompts")
        if self.sscd is not None and self.train_data is None:
            raise InputError("--sscd measures replication against --train-data: give it too")
        for name in ("train_caption_column", "train_image_column"):
            if getattr(self, name) is not None and self.train_data is None:
                raise InputError(f"--{name.replace('_', '-')} names a column of --train-data: give it too")
        if self.column is not None and self.prompts is None:  # MemLab's own audit set would be read, the column ignored
            raise InputError("--column names the prompt column of a --prompts file: give it too")
        if not 0 < self.fpr < 1:
            raise InputError(f"--fpr must lie in (0, 1), got {self.fpr}")
        for name in ("max_explain", "max_categorize", "max_mitigate"):  # a negative limit would slice off the last prompts
            limit = getattr(self, name)
            if limit is not None and limit < 0:
                raise InputError(f"--{name.replace('_', '-')} must be 0 or more, got {limit}")
        if self.mitigate_loss_steps < 1:
            raise InputError(f"--mitigate-loss-steps must be at least 1, got {self.mitigate_loss_steps}")
        from ..explain import EXPLAINERS
        from ..mitigate.embedding import POSITIONS, REWRITES

        if self.explain_method not in EXPLAINERS:
            raise InputError(f"--explain-method must be one of {', '.join(EXPLAINERS)}, got {self.explain_method!r}")

        if self.mitigate_positions not in POSITIONS:
            raise InputError(f"--mitigate-positions must be one of {', '.join(POSITIONS)}, got {self.mitigate_positions!r}")
        if self.mitigate_rewrite is not None and self.mitigate_rewrite not in REWRITES:
            raise InputError(f"--mitigate-rewrite must be one of {', '.join(REWRITES)}, got {self.mitigate_rewrite!r}")

    def mitigation_loss_steps(self, num_inference_steps: int) -> int:
        """The mitigation loss's steps on a sampler of this many steps: fewer on a shorter one, as
        detection drops steps past the sampler."""
        return min(self.mitigate_loss_steps, num_inference_steps)


@dataclass
class AuditPrompts:
    prompts: list[str]
    labels: np.ndarray | None  # 1 = planted memorized (MemLab's set only)
    groups: list[str]
    reference: list[str]
    source: str
    reference_source: str


def memlab_audit_prompts(manifest: dict) -> AuditPrompts:
    """MemLab's audit set: its 100 planted prompts (40 verbatim captions, 60 template prompts in new
    contexts) against 200 non-memorized ones (100 training captions, 100 novel prompts); and a
    disjoint reference set for calibration (400 training captions, 100 novel prompts)."""
    from ..memlab import dataset as ds

    control, novel = ds.prompts(manifest, "control"), ds.prompts(manifest, "novel")
    order = np.random.default_rng(7).permutation(len(control))
    ctl_audit = [control[i] for i in sorted(order[:100])]
    ctl_ref = [control[i] for i in sorted(order[100:500])]
    rows = ([("verbatim", p) for p in ds.prompts(manifest, "verbatim")] + [("template", p) for p in ds.prompts(manifest, "template")]
            + [("control", p) for p in ctl_audit] + [("novel", p) for p in novel[100:200]])
    labels = np.array([1.0 if g in ("verbatim", "template") else 0.0 for g, _ in rows])
    return AuditPrompts([p for _, p in rows], labels, [g for g, _ in rows], ctl_ref + novel[:100],
                        "MemLab audit set (100 planted, 200 non-memorized)", "MemLab reference set (500 non-memorized)")


def resolve_prompts(settings: AuditSettings) -> AuditPrompts:
    """Read and check every prompt input: called before the model loads."""
    from ..core.prompts import read_prompts, warn_if_in_reference

    manifest = None
    if settings.prompts is None or settings.reference is None:
        from ..memlab.verify import load_manifest

        try:
            manifest = load_manifest(settings.model)
        except InputError:
            missing = "--prompts and --reference" if settings.prompts is None and settings.reference is None else (
                "--prompts" if settings.prompts is None else "--reference")
            raise InputError(f"{settings.model} is not a MemLab model, so there is no built-in prompt set: give {missing}") from None
    if settings.prompts is None:
        ap = memlab_audit_prompts(manifest)
    else:
        prompts = read_prompts(settings.prompts, settings.column)
        ap = AuditPrompts(prompts, None, ["given"] * len(prompts), [], str(settings.prompts), "")
    if settings.reference is not None:
        ap.reference = read_prompts(settings.reference)
        ap.reference_source = str(settings.reference)
    elif settings.prompts is not None:
        ap.reference = memlab_audit_prompts(manifest).reference
        ap.reference_source = "MemLab reference set (500 non-memorized)"
    warn_if_in_reference(ap.prompts, ap.reference, ap.reference_source)
    return ap


def check_audit_folder(out: Path) -> None:
    """OUT must be new, empty or an earlier audit's (audit.json, or a stage folder from a run killed
    before its end): the audit writes a folder per stage, report.html and audit.json there."""
    if foreign_folder(out, "audit.json") and not any((out / stage).is_dir() for stage in STAGES):
        raise InputError(f"{out} is not empty and is not an earlier audit (no audit.json, no stage folder): the audit "
                         f"writes {', '.join(s + '/' for s in STAGES)} report.html and audit.json there; "
                         "choose a new or empty folder")


def _stage_done(folder: Path, key: str) -> dict | None:
    f = folder / "stage.json"
    if not f.exists():
        return None
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError:
        return None
    return d if d.get("key") == key else None


def _stage_files(folder: Path) -> dict[str, str]:
    """Each file a stage wrote (its marker aside), by path inside the stage folder: its hash."""
    return {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "stage.json"}


def _changed_files(folder: Path, done: dict) -> list[str]:
    """The files of a finished stage that are missing or no longer hold what it wrote (none for
    stages finished before the hashes were kept)."""
    return sorted(name for name, h in done.get("files", {}).items()
                  if not (folder / name).is_file() or file_digest(folder / name) != h)


def _finish_stage(folder: Path, key: str, summary: dict, seconds: float) -> dict:
    d = {"key": key, "seconds": seconds, "summary": summary, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "files": _stage_files(folder)}
    dump_json(d, folder / "stage.json")  # written last: its presence marks the stage complete
    return d


@dataclass
class AuditResult:
    out: Path
    settings: dict
    stages: dict = field(default_factory=dict)  # name -> {"status": done/reused/skipped, "summary", "seconds", ...}

    def save(self) -> Path:
        dump_json({"settings": self.settings, "stages": self.stages}, self.out / "audit.json")
        return self.out / "audit.json"

    @classmethod
    def load(cls, out: str | Path) -> "AuditResult":
        out = Path(out)
        if not (out / "audit.json").exists():
            raise InputError(f"{out} holds no audit (audit.json)")
        with reading_saved(out, "audit (a folder with audit.json)"):
            d = json.loads((out / "audit.json").read_text())
            return cls(out, d["settings"], d["stages"])


class Audit:
    """``Audit(settings, out).run() -> AuditResult``; the stages' own results load from ``out``."""

    def __init__(self, settings: AuditSettings, out: str | Path, progress: bool = True, console=None,
                 device: str = "cpu", dtype: str = "float32"):
        from ..core.loading import check_adapters, check_pipeline_folder, looks_like_path, resolve_model
        from ..core.prompts import ensure_writable_dir

        self.settings = settings
        self.out = Path(out)
        self.progress = progress
        self.console = console
        # every check before any work: output folder, model folder, prompt files, training data
        ensure_writable_dir(self.out)
        check_audit_folder(self.out)
        resolved = Path(resolve_model(settings.model))
        if resolved.exists() or looks_like_path(settings.model):  # hub ids are checked when they load
            check_pipeline_folder(resolved)
        check_adapters(settings.lora, settings.lora_scale, settings.textual_inversion)
        self.prompts = resolve_prompts(settings)
        if settings.train_data is not None and not {"scan", "mitigate"} <= set(settings.skip):
            from ..mitigate.measures import NO_IMAGES_TO_COMPARE
            from ..scan.sources import ZeroRowsError, open_source

            try:
                open_source(settings.train_data, settings.train_caption_column, settings.train_image_column,
                            captions="scan" not in settings.skip)  # mitigation reads images alone
            except ZeroRowsError as e:
                raise (e if "scan" not in settings.skip else e.for_job(NO_IMAGES_TO_COMPARE)) from None
            except InputError as e:  # the scan's hint names its own options; the audit's are --train-...
                raise InputError(re.sub(r"--(caption|image)-column", r"--train-\1-column", str(e))) from None
        if "mitigate" not in settings.skip:
            from ..mitigate.measures import check_clip_folder, check_sscd_file

            if settings.sscd is not None:
                check_sscd_file(settings.sscd)
            if settings.clip is not None:
                check_clip_folder(settings.clip)
        # where and in what precision the model runs: not audit settings (a GPU rerun of a CPU audit
        # reuses its stages), but a half-precision model scores differently, so its dtype enters the stage keys
        self.device, self.dtype = device, dtype
        self.pipe = None
        self.manifest = None

    # -- helpers ----------------------------------------------------------------------------
    def _log(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False)

    def _load(self):
        if self.pipe is None:
            from ..core.loading import load_pipeline, sampler_defaults, weights_identity

            self.pipe = load_pipeline(self.settings.model, device=self.device, dtype=self.dtype, lora=self.settings.lora,
                                      lora_scale=self.settings.lora_scale, textual_inversion=self.settings.textual_inversion)
            # with the VAE, which decodes the generations of mitigate, categorize and scan, and the dtype
            self.identity = weights_identity(self.pipe)
            self.sampler = sampler_defaults(self.pipe)
            from ..memlab.verify import load_manifest

            try:
                self.manifest = load_manifest(self.settings.model)
            except InputError:
                self.manifest = None
        return self.pipe

    def _key(self, stage: str, settings: dict, upstream: list[str]) -> str:
        return digest({"stage": stage, "settings": settings, "model": self.identity, "sampler": self.sampler,
                        "upstream": upstream, "version": 1})

    def run(self) -> AuditResult:
        # held for the whole audit: a second one into OUT, from another process, would redo and
        # overwrite the same stages at once
        with folder_held(self.out):
            return self._run_stages()

    def _run_stages(self) -> AuditResult:
        from ..core.loading import runs_on

        s = self.settings
        result = AuditResult(self.out, {**asdict(s), "skip": list(s.skip)})
        self._load()
        result.settings["model_identity"] = self.identity
        result.settings["sampler"] = self.sampler
        result.settings["runs_on"] = runs_on(self.pipe)
        keys: dict[str, str] = {}
        todo = [st for st in STAGES if st not in s.skip and not (st == "scan" and s.train_data is None)]
        for i, stage in enumerate(STAGES, 1):
            if stage not in todo:
                why = "skipped (--skip)" if stage in s.skip else "no --train-data given"
                result.stages[stage] = {"status": "skipped", "reason": why}
                continue
            t0 = time.time()
            self._log(f"[{todo.index(stage) + 1}/{len(todo)}] {stage}")
            keys[stage], summary, status = getattr(self, f"_{stage}")(keys)
            result.stages[stage] = {"status": status, "summary": summary,
                                    "seconds": json.loads((self.out / stage / "stage.json").read_text())["seconds"]
                                    if (self.out / stage / "stage.json").exists() else time.time() - t0}
            self._log(f"      {stage}: {status}" + (f" in {time.time() - t0:.1f}s" if status == "done" else " (saved earlier with the same settings)"))
            result.save()
        result.save()
        from .html import write_report

        write_report(self.out, result)
        return result

    def _stage(self, stage: str, settings: dict, upstream: list[str], work):
        folder = self.out / stage
        key = self._key(stage, settings, upstream)
        done = _stage_done(folder, key)
        if done is not None:
            changed = _changed_files(folder, done)
            if not changed:
                return key, done["summary"], "reused"
            self._log(f"      {stage}: {', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''} changed since "
                      "the stage finished: redoing it")
            # from nothing: the stage's own work files (parts, shards, checkpoints) may be the damaged ones,
            # and a resume would read them back
            shutil.rmtree(folder)
        if (folder / "stage.json").exists():
            (folder / "stage.json").unlink()  # other settings: the old results no longer apply
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        summary = work(folder, key)
        _finish_stage(folder, key, summary, time.time() - t0)
        return key, summary, "done"

    # -- stages -----------------------------------------------------------------------------
    def _scored_steps(self) -> list[int]:
        """The noise norm's steps on this sampler: those of the settings that it has."""
        return [x for x in self.settings.steps if x < self.sampler["num_inference_steps"]]

    def _detector(self):
        from ..detect import NoiseNormDetector, SeedConsistencyDetector

        s = self.settings
        if s.detect_method == "seed_consistency":
            return SeedConsistencyDetector(self.pipe, "x0", s.generations, self.sampler["num_inference_steps"],
                                           self.sampler["guidance_scale"], seed=s.seed, batch_size=s.batch_size)
        return NoiseNormDetector(self.pipe, self.sampler["num_inference_steps"], self.sampler["guidance_scale"],
                                 steps=self._scored_steps(), generations=s.generations, seed=s.seed, batch_size=s.batch_size)

    def _detect(self, keys):
        from ..detect import NoiseNormDetector, SeedConsistencyDetector

        s, ap = self.settings, self.prompts
        # the detector's revision from 2 on (revision_key): scores of an earlier diffmem's detector are
        # redone, not reused, and audits saved before detectors had revisions keep their key; so do
        # audits by the noise norm, saved before the detector could be chosen
        detector = {"detect_method": s.detect_method, **revision_key(SeedConsistencyDetector)} \
            if s.detect_method == "seed_consistency" else revision_key(NoiseNormDetector)
        settings = {"generations": s.generations, "steps": list(s.steps), "seed": s.seed, "fpr": s.fpr, "grid": s.grid,
                    "prompts": digest(ap.prompts), "reference": digest(ap.reference),
                    "labels": None if ap.labels is None else digest(ap.labels.tolist()), **detector}

        def work(folder: Path, key: str) -> dict:
            from ..detect import Calibration

            det = self._detector()
            ref = det.score(ap.reference, progress=self.progress)
            cal = Calibration.fit(ref, fpr=s.fpr)
            cal.save(folder / "calibration.json")
            ref.save(folder / "reference.parquet")
            res = cal.apply(det.score(ap.prompts, progress=self.progress))
            res.save(folder / "detections.parquet")
            dump_json({"groups": ap.groups, "labels": None if ap.labels is None else ap.labels.tolist(),
                       "source": ap.source, "reference_source": ap.reference_source}, folder / "labels.json")
            v = res.verdicts
            summary = {"n_prompts": len(ap.prompts), "n_flagged": int(v.sum()), "threshold": cal.threshold, "fpr": s.fpr,
                       "n_reference": cal.n_reference, "source": ap.source, "reference_source": ap.reference_source,
                       "settings": res.settings, "seeds": res.seeds}
            if ap.labels is not None:
                from ..bench.detect import roc

                pos, neg = ap.labels == 1, ap.labels == 0
                r = roc(ap.labels, res.scores)
                summary.update(recall=float(v[pos].mean()), false_positive_rate=float(v[neg].mean()),
                               auc=r["auc"], tpr_at_1pct_fpr=r["tpr_at_1pct_fpr"], n_positive=int(pos.sum()),
                               n_negative=int(neg.sum()))
                dump_json({"fpr": r["fpr"], "tpr": r["tpr"]}, folder / "roc.json")
                if s.grid:
                    from ..bench.detect import LabelledPrompts, bench_detect

                    few = min(5, self.sampler["num_inference_steps"])
                    grid = bench_detect(self.pipe, LabelledPrompts(ap.prompts, ap.labels, ap.groups, ap.source),
                                        generations=(1, 4), seed=s.seed, batch_size=s.batch_size, black_box=False,
                                        progress=self.progress, rows={"first step": [0], f"first {few} steps": list(range(few))})
                    grid.save(folder / "grid")
                    summary["grid_table"] = grid.table()
            return summary

        return (*self._stage("detect", settings, [], work),)

    def detections(self):
        from ..detect.noise_norm import DetectionResult

        return DetectionResult.load(self.out / "detect" / "detections.parquet")

    def flagged(self, limit: int | None = None) -> list[str]:
        """Flagged prompts, highest score first."""
        res = self.detections()
        idx = [int(i) for i in np.argsort(-res.scores, kind="stable") if res.verdicts[i]]
        seen, out = set(), []
        for i in idx:
            if res.prompts[i] not in seen:
                seen.add(res.prompts[i])
                out.append(res.prompts[i])
        return out if limit is None else out[:limit]

    def _explain(self, keys):
        from ..explain import EXPLAINERS

        s = self.settings
        settings = {"seed": s.seed, "steps": list(s.steps), "max_explain": s.max_explain, "method": f"token_{s.explain_method}",
                    **revision_key(EXPLAINERS[s.explain_method])}

        def work(folder: Path, key: str) -> dict:
            from ..explain import explain_prompts

            # the steps detection scores: the explanation is of the score that flagged the prompt (of the
            # noise norm over those steps when seed consistency flagged it: it has no gradient to a word)
            explainer = EXPLAINERS[s.explain_method](self.pipe, self.sampler["num_inference_steps"],
                                                     self.sampler["guidance_scale"], steps=self._scored_steps(),
                                                     generations=1, seed=s.seed)
            explained = explain_prompts(explainer, self.flagged(s.max_explain), checkpoint=folder / "attributions.json",
                                        progress=self.progress, stale="restart")
            return {"n_explained": len(explained), "settings": explainer.settings, "seeds": explainer.seeds(),
                    "top_words": explained.top_words()}

        return self._stage("explain", settings, [keys["detect"]], work)

    def attributions(self) -> dict:
        from .html import load_attributions

        return load_attributions(self.out)

    def _categorize(self, keys):
        from ..categorize import MemLabExtractor, MemorizationProfiler

        s = self.settings
        settings = {"seed": s.seed, "n": s.categorize_n, "max": s.max_categorize, "controls": s.categorize_controls,
                    **revision_key(MemorizationProfiler), **revision_key(MemLabExtractor, "extractor_revision")}
        if self.manifest is None:
            folder = self.out / "categorize"
            folder.mkdir(parents=True, exist_ok=True)
            summary = {"note": "not run: the audit categorizes with MemLab's attribute reader; for other models run "
                               "`diffmem categorize --extractor clip:PATH --vocabulary FILE` on the flagged prompts"}
            key = self._key("categorize", settings, [keys["detect"]])
            _finish_stage(folder, key, summary, 0.0)
            return key, summary, "done"

        def work(folder: Path, key: str) -> dict:
            from ..categorize import TrainingTracer
            from ..memlab import dataset as ds

            flagged = self.flagged(s.max_categorize)
            res = self.detections()
            rng = np.random.default_rng(s.seed)
            unflagged = [p for p, v in zip(res.prompts, res.verdicts) if not v]
            controls = [unflagged[i] for i in sorted(rng.choice(len(unflagged), min(s.categorize_controls, len(unflagged)), replace=False))]
            prompts = flagged + [p for p in controls if p not in flagged]
            if not prompts:
                return {"n_prompts": 0, "note": "nothing flagged and no control sample"}
            tracer = TrainingTracer.from_memlab(ds.build(ds.MemLabConfig(**self.manifest["config"])))
            prof = MemorizationProfiler(self.pipe, MemLabExtractor(), n=s.categorize_n, tracer=tracer, seed=s.seed)
            pr = prof.profile(prompts, progress=self.progress, checkpoint=folder / "parts", stale="restart")
            pr.save(folder)
            for i in range(len(pr.prompts)):
                pr.plot(folder / f"prompt_{i:04d}.png", prompt_index=i)
            kinds = {}
            for r in pr.memorized():
                kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
            return {"n_prompts": len(prompts), "n_flagged": len(flagged), "n_controls": len(prompts) - len(flagged),
                    "control_prompts": [p for p in prompts if p not in flagged], "memorized_by_kind": kinds,
                    "settings": pr.settings, "seeds": pr.seeds, "extractor": pr.extractor}

        return self._stage("categorize", settings, [keys["detect"]], work)

    def profile(self):
        from ..categorize.profiler import ProfileResult

        f = self.out / "categorize" / "profile.json"
        return ProfileResult.load(self.out / "categorize") if f.exists() else None

    def _mitigate(self, keys):
        from ..mitigate import EmbeddingOptimization

        s = self.settings
        # the method's revision, as the other stages hold theirs: a stage mitigated by an earlier
        # diffmem's method is redone, not reused
        settings = {"seed": s.seed, "generations": s.mitigate_generations, "iters": s.mitigate_iters, "lr": s.mitigate_lr,
                    "loss_steps": s.mitigate_loss_steps, "positions": s.mitigate_positions, "rewrite": s.mitigate_rewrite,
                    "max": s.max_mitigate, **revision_key(EmbeddingOptimization)}
        # replication against the training data by SSCD when given, else (a model without MemLab's
        # manifest) by pixel correlation; alignment by CLIP when given. The key gains each only when
        # it applies, so MemLab audits keep theirs
        against = s.train_data if s.train_data is not None and (s.sscd is not None or self.manifest is None) else None
        if against is not None:
            settings["replication_against"] = str(against)
            if s.train_image_column is not None:  # in the key only when named: audits before it keep theirs
                settings["replication_image_column"] = s.train_image_column
            if s.sscd is not None:
                settings["sscd"] = str(s.sscd)
        if s.clip is not None:
            settings["clip"] = str(s.clip)
        # the measures' revisions, as the method's: a stage measured by an earlier diffmem's measure is redone
        from ..mitigate.measures import measure_classes

        replication_measure, alignment_measure = measure_classes(against, s.sscd, s.clip)
        settings.update(revision_key(replication_measure, "replication_revision"))
        settings.update(revision_key(alignment_measure, "alignment_revision"))

        def work(folder: Path, key: str) -> dict:
            from ..mitigate.measures import chosen_measures
            from ..mitigate.parts import mitigate_in_parts
            from ..mitigate.report import apply_measures, save_nearest_images

            prompts = self.flagged(s.max_mitigate)
            if not prompts:
                return {"n_prompts": 0, "note": "nothing flagged"}
            # The detection threshold is on the detection score (one generation), another scale than
            # the loss minimized here (its own steps and seeds): the target gets its own calibration,
            # on the same reference prompts at the same false-positive rate.
            m, cal = EmbeddingOptimization.calibrated(
                self.pipe, self.prompts.reference, fpr=s.fpr, progress=self.progress, lr=s.mitigate_lr,
                max_iters=s.mitigate_iters, generations=s.mitigate_generations, seed=s.seed,
                loss_steps=s.mitigation_loss_steps(self.sampler["num_inference_steps"]), positions=s.mitigate_positions,
                rewrite=s.mitigate_rewrite,
                num_inference_steps=self.sampler["num_inference_steps"], guidance_scale=self.sampler["guidance_scale"])
            cal.save(folder / "target_calibration.json")
            replication, alignment = chosen_measures(against, s.sscd, s.clip, image_column=s.train_image_column,
                                                     progress=self.progress)
            merged = mitigate_in_parts(m, prompts, folder / "parts", progress=self.progress, stale="restart")
            apply_measures(self.pipe, merged, replication, alignment)
            merged.save(folder)
            for i in range(len(merged.prompts)):
                _before_after_png(merged, i, folder / f"prompt_{i:04d}.png")
            save_nearest_images(merged, replication, folder)
            ms = merged.measures
            summary = {"n_prompts": len(prompts), "n_unreached": len(merged.unreached), "settings": merged.settings,
                       "seeds": merged.seeds, "target": cal.threshold}
            for what, how in merged.settings.get("measured_with", {}).items():
                summary[f"{what}_measure"] = how
            for k in ("replication_before", "replication_after", "alignment_before", "alignment_after"):
                if k in ms:  # alignment is NaN for a prompt that names no MemLab attribute
                    values = np.asarray(ms[k], float)
                    named = values[~np.isnan(values)]
                    summary[k] = float(named.mean()) if len(named) else float("nan")
            return summary

        return self._stage("mitigate", settings, [keys["detect"]], work)

    def mitigation(self):
        from ..mitigate.result import MitigationResult

        return MitigationResult.load(self.out / "mitigate") if (self.out / "mitigate" / "mitigation.json").exists() else None

    def _scan(self, keys):
        s = self.settings
        settings = {"train_data": str(s.train_data), "seed": s.seed}
        # in the key only when named: audits before the columns could be named keep theirs
        settings.update({k: v for k, v in (("caption_column", s.train_caption_column),
                                           ("image_column", s.train_image_column)) if v is not None})

        def work(folder: Path, key: str) -> dict:
            from ..scan import DatasetScanner

            scanner = DatasetScanner(s.train_data, folder / "work", seed=s.seed, progress=self.progress,
                                     caption_column=s.train_caption_column, image_column=s.train_image_column)
            res = scanner.scan()
            res.save(folder)
            links = link_scan(res, self.flagged())
            dump_json({"links": links}, folder / "links.json")
            return {"summary": res.summary.to_dict("records"), "n_triggers": len(res.info.get("triggers", [])),
                    "n_linked_prompts": sum(1 for v in links.values() if v["triggers"] or v["clusters"]),
                    "settings": res.settings}

        return self._stage("scan", settings, [keys["detect"]], work)


def link_scan(res, prompts: list[str]) -> dict:
    """For each prompt: the trigger phrases it contains, and the image clusters of training captions
    it repeats exactly (after normalisation)."""
    from ..categorize.expectations import contains_phrase
    from ..scan.features import normalize_caption

    rows = res.rows
    norm_of_row = {}
    if "caption" in rows and "image_cluster" in rows:
        for cap, cl in zip(rows["caption"], rows["image_cluster"]):
            if isinstance(cap, str) and cl >= 0:
                n = normalize_caption(cap)
                if n:
                    norm_of_row.setdefault(n, {}).setdefault(int(cl), 0)
                    norm_of_row[n][int(cl)] += 1
    sizes = {c["cluster"]: c["size"] for c in res.info.get("image_clusters", [])}
    out = {}
    for p in prompts:
        trig = [{"phrase": t["phrase"], "cluster": int(t["cluster"]), "support": int(t["support"]), "purity": float(t["purity"])}
                for t in res.info.get("triggers", []) if contains_phrase(p, t["phrase"])]
        exact = norm_of_row.get(normalize_caption(p) or "", {})
        clusters = [{"cluster": c, "captions_matching": k, "cluster_size": sizes.get(c, 0)} for c, k in sorted(exact.items())]
        out[p] = {"triggers": trig, "clusters": clusters}
    return out


def _before_after_png(res, i: int, path: Path, scale: int = 3) -> None:
    """Two rows (before, after) of the prompt's seeded generations, upscaled without smoothing."""
    from PIL import Image

    rows = [np.concatenate(list(imgs[i]), axis=1) for imgs in (res.images_before, res.images_after)]
    pad = np.ones((4, rows[0].shape[1], 3), np.float32)
    grid = np.concatenate([rows[0], pad, rows[1]], axis=0)
    im = Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8))
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    from ..core.results import atomic_path

    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
