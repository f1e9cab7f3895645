"""``diffmem bench mitigate``: replication against alignment for each mitigation method and
setting, on MemLab's planted prompts (Wen et al.'s trade-off figure, on our model).

Replication of a generation, by planted group: a verbatim prompt's generation replicates when it
lands within MemLab's replication ratio of its own planted image; a template prompt's when the
attribute reader finds its trigger's layout. Alignment: the share of the prompt's named colour,
shape and position the reader finds. The embedding method's target is calibrated from the
non-memorized (control + novel) prompts' loss over the same seeds (first step, or the first five
steps for the 5-step loss), at FPR 1% (and at the median for one first-step row).
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.results import digest, dump_json, reading_saved, revision_key


@dataclass
class MitigateBenchResult:
    rows: list[dict]
    settings: dict

    def table(self) -> str:
        groups = [g for g in ("verbatim", "template") if all(f"replication_{g}" in r for r in self.rows)]
        per_group = "".join(f" {g} repl. / align. |" for g in groups)
        lines = [f"| method | setting | replication | alignment |{per_group} prompts untouched | target unreached | s/prompt |",
                 "|---|---|---|---|" + "---|" * len(groups) + "---|---|---|"]
        for r in self.rows:
            cells = "".join(f" {r[f'replication_{g}']:.3f} / {r[f'alignment_{g}']:.3f} |" for g in groups)
            lines.append(f"| {r['method']} | {r['setting']} | {r['replication']:.3f} | {r['alignment']:.3f} |{cells} "
                         f"{r.get('untouched', '')} | {r.get('unreached', '')} | {r['seconds_per_prompt']:.2f} |")
        return "\n".join(lines)

    def save(self, out: str | Path) -> dict:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        dump_json({"rows": self.rows, "settings": self.settings, "table": self.table()}, out / "bench_mitigate.json")
        self.plot(out / "bench_mitigate.png")
        return {"json": out / "bench_mitigate.json", "png": out / "bench_mitigate.png"}

    @classmethod
    def load(cls, path: str | Path) -> "MitigateBenchResult":
        """From ``bench_mitigate.json`` (or the folder holding it): to re-draw or re-tabulate a saved run."""
        path = Path(path)
        with reading_saved(path, "mitigate benchmark (bench_mitigate.json)"):
            d = json.loads((path / "bench_mitigate.json" if path.is_dir() else path).read_text())
            return cls(d["rows"], d["settings"])

    def plot(self, path) -> None:
        from ..core.figures import subplots

        fig, ax = subplots(figsize=(6.5, 4.5))
        labelled = []
        for method in dict.fromkeys(r["method"] for r in self.rows):
            rs = [r for r in self.rows if r["method"] == method]
            (line,) = ax.plot([r["replication"] for r in rs], [r["alignment"] for r in rs], "o-", label=method, ms=4)
            labelled += [((r["replication"], r["alignment"]), r["setting"], line.get_color()) for r in rs]
        ax.set_xlim(-0.05, 1.05)
        ax.set_xlabel("replication rate (lower is better)")
        ax.set_ylabel("alignment with the prompt (higher is better)")
        ax.set_title(f"MemLab planted prompts, seeds {self.settings['seeds']}", fontsize=8)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.tight_layout()
        _label_points(ax, labelled)
        fig.savefig(path, dpi=130, bbox_inches="tight")


# offsets (points) tried in turn for a point's label: right, then left, then further above or below
_LABEL_OFFSETS = [(4, 2, "left"), (4, -8, "left"), (-4, 2, "right"), (-4, -8, "right"),
                  (4, 9, "left"), (4, -15, "left"), (-4, 9, "right"), (-4, -15, "right")]


def _label_points(ax, labelled) -> None:
    """Each point's label at the first offset where it overlaps no label placed before it and stays
    inside the axes (the methods' settings crowd a few corners of the trade-off plot); if none is
    free, the first offset."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marker = 3 * ax.figure.dpi / 72  # a marker's half-width in pixels: labels keep off every point too
    placed = [Bbox.from_extents(x - marker, y - marker, x + marker, y + marker)
              for x, y in (ax.transData.transform(xy) for xy, _, _ in labelled)]

    def annotate(xy, text, colour, dx, dy, ha):
        label = ax.annotate(text, xy, fontsize=5, xytext=(dx, dy), textcoords="offset points", ha=ha, color=colour)
        return label, label.get_window_extent(renderer)

    for xy, text, colour in labelled:
        for offset in _LABEL_OFFSETS:
            label, box = annotate(xy, text, colour, *offset)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in placed):
                break
            label.remove()
        else:  # nowhere free: the first offset, overlapping
            label, box = annotate(xy, text, colour, *_LABEL_OFFSETS[0])
        placed.append(box)


UNMITIGATED = ("none", "unmitigated")


class SavedRows:
    """Finished benchmark rows, one JSON file each under ``folder`` (None: nothing saved), read back
    only when saved under the same key (the bench's settings and the row's name)."""

    def __init__(self, folder: str | Path | None, settings: dict):
        self.folder = None if folder is None else Path(folder)
        self.key = digest(settings)

    def path(self, name: tuple[str, str]) -> Path:
        slug = re.sub(r"[^a-z0-9]+", "-", f"{name[0]} {name[1]}".lower()).strip("-")
        return self.folder / f"{slug}-{digest(list(name))[:6]}.json"  # the hash: two names never share a file

    def load(self, name: tuple[str, str], targets: dict) -> dict | None:
        """The saved row (the targets it used added to ``targets``), or None."""
        if self.folder is None:
            return None
        try:
            saved = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None  # never saved, or cut short by a kill: recomputed
        if not isinstance(saved, dict) or saved.get("key") != self.key or saved.get("name") != list(name):
            return None
        targets.update(saved.get("calibrations", {}))
        return saved["row"]

    def save(self, name: tuple[str, str], row: dict, targets: dict | None = None) -> None:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            dump_json({"key": self.key, "name": list(name), "row": row,
                       "calibrations": targets or {}}, self.path(name))


def _replication(images, entries, kernel, reader) -> np.ndarray:
    """(P,) share of each prompt's generations that replicate its planted content."""
    out = []
    for e, ims in zip(entries, images):
        if e["group"] == "verbatim":
            out.append(float((kernel.ratio_to(ims, e["image_id"]) <= kernel.threshold).mean()))
        else:
            out.append(float(np.mean([reader.read(im)["template"] == e["template_id"] for im in ims])))
    return np.array(out)


def check_only(only: str | None) -> None:
    """``only`` picks rows by a part of their "method, setting"; blank, it is in every row's name and
    would quietly run the whole hour-long benchmark (an empty shell variable, say)."""
    if only is not None and not only.strip(" ,"):
        raise InputError(f"only must name part of a row's \"method, setting\" (such as 'rta' or 'eos'), got {only!r}")


def bench_mitigate(pipe, manifest: dict, generations: int = 4, methods: dict | None = None, progress: bool = True,
                   max_prompts: int | None = None, only: str | None = None,
                   max_reference: int | None = None, rows_dir: str | Path | None = None,
                   redo: bool = False) -> MitigateBenchResult:
    """``only``: run just the rows whose "method, setting" contains this text (the unmitigated row
    always comes first), to add one setting without re-running every other. ``max_reference``:
    calibrate the targets on at most this many non-memorized prompts, evenly spread (a quick run).

    ``rows_dir``: each finished row is saved there (one JSON file a row, keyed by the model, the
    prompts, the seeds, the reference prompts, the sampler and the methods' revisions), so a killed
    run redoes only the rows it had not finished, and a run with ``only`` lists, beside the rows it
    ran, every other row already saved there under the same key (in the usual order). Rows saved
    under another key are recomputed and overwritten (the benchmark owns the folder); ``redo``
    recomputes the selected rows even when saved (after a change to the benchmark's own code, or to
    a method's not yet counted in its revision)."""
    from ..core.generate import generate
    from ..core.loading import sampler_defaults, weights_identity
    from ..detect import Calibration, NoiseNormDetector
    from ..memlab import dataset as ds
    from ..memlab.reader import AttributeReader
    from ..memlab.replication import MemLabReplication
    from ..mitigate import BASELINES, EmbeddingOptimization
    from ..mitigate import measures
    from . import check_max_prompts
    from .detect import memlab_labelled

    check_max_prompts(max_prompts)
    check_only(only)
    d = sampler_defaults(pipe)
    entries = [{"prompt": e["prompt"], "group": "verbatim", "image_id": e["image_id"]} for e in manifest["groups"]["verbatim"]]
    entries += [{"prompt": t["prompt"], "group": "template", "template_id": e["template_id"]}
                for e in manifest["groups"]["template"] for t in e["test_prompts"]]
    if max_prompts is not None and max_prompts < len(entries):  # both groups, evenly spread
        idx = np.linspace(0, len(entries) - 1, max_prompts).round().astype(int)
        entries = [entries[i] for i in idx]
    prompts = [e["prompt"] for e in entries]
    kw = dict(generations=generations, seed=0, num_inference_steps=d["num_inference_steps"], guidance_scale=d["guidance_scale"])

    # the rows' targets, each computed the first time a row asks for it (``only`` may need none)
    labelled = memlab_labelled(manifest)
    reference = [p for p, y in zip(labelled.prompts, labelled.labels) if y == 0]
    if max_reference is not None and max_reference < len(reference):
        reference = [reference[i] for i in np.linspace(0, len(reference) - 1, max_reference).round().astype(int)]
    calibrations: dict = {}
    used_targets: set = set()  # the calibrations the current row asked for

    @functools.cache
    def first_step_scores():
        return NoiseNormDetector(pipe, d["num_inference_steps"], d["guidance_scale"], generations=generations).score(reference)

    def calibration(name: str):
        used_targets.add(name)
        if name not in calibrations:
            if name == "calibration_threshold":
                calibrations[name] = Calibration.fit(first_step_scores(), fpr=0.01)
            elif name == "median_threshold":
                # Wen et al. set the target near the top of non-memorized prompts' loss; on MemLab
                # that leaves template layouts in place, so the median non-memorized loss is measured too
                calibrations[name] = Calibration.fit(first_step_scores(), fpr=0.5)
            else:
                # the loss over the first 5 steps (EmbeddingOptimization(loss_steps=5)): the first step
                # misses template layouts, the first five see them (detection AUC 1.000), so its target does too
                det5 = NoiseNormDetector(pipe, d["num_inference_steps"], d["guidance_scale"], steps=range(5),
                                         generations=generations)
                calibrations[name] = Calibration.fit(det5.score(reference), fpr=0.01)
        return calibrations[name]

    def five_step(max_iters: int, positions: str = "all", rewrite: str | None = None):
        return EmbeddingOptimization.from_calibration(pipe, calibration("calibration_threshold_5_steps"), lr=0.05,
                                                      source="calibration of the 5-step loss at FPR 0.01",
                                                      max_iters=max_iters, loss_steps=5, positions=positions,
                                                      rewrite=rewrite, **kw)

    methods = methods or {
        ("embedding", "target FPR 0.01, lr 0.05, 10 iters"): lambda: EmbeddingOptimization(
            pipe, calibration("calibration_threshold").threshold, lr=0.05, max_iters=10, target_source="calibration FPR 0.01", **kw),
        ("embedding", "target median, lr 0.05, 20 iters"): lambda: EmbeddingOptimization(
            pipe, calibration("median_threshold").threshold, lr=0.05, max_iters=20, target_source="calibration FPR 0.5", **kw),
        ("embedding, 5-step loss", "target FPR 0.01, lr 0.05, 20 iters"): lambda: five_step(20),
        # the same, optimizing only the EOS and padding outputs: every word's output kept
        ("embedding, 5-step loss, EOS positions", "target FPR 0.01, lr 0.05, 20 iters"): lambda: five_step(20, "eos"),
        ("embedding, 5-step loss, EOS positions", "target FPR 0.01, lr 0.05, 40 iters"): lambda: five_step(40, "eos"),
        # prompts above the target start from their RNA rewrite: the rewrite alone keeps the named
        # features but leaves some replication, the optimization removes what is left
        ("embedding, 5-step loss, EOS positions, from RNA", "target FPR 0.01, lr 0.05, 20 iters"):
            lambda: five_step(20, "eos", "rna"),
        # the papers' baselines put their words at random places; "random places" in the names keeps
        # rows saved before diffmem did so (appending them) from being read back as these
        ("rta", "4 tokens, random places"): lambda: BASELINES["rta"](pipe, n_tokens=4, **kw),
        ("rta", "10 tokens, random places"): lambda: BASELINES["rta"](pipe, n_tokens=10, **kw),
        ("rna", "4 numbers, random places"): lambda: BASELINES["rna"](pipe, n_numbers=4, **kw),
        # the rewrite the audit's optimization starts from, alone
        ("rna, appended", "4 numbers"): lambda: BASELINES["rna"](pipe, n_numbers=4, placement="end", **kw),
        ("gni", "sigma 0.1"): lambda: BASELINES["gni"](pipe, sigma=0.1, **kw),
        ("gni", "sigma 0.5"): lambda: BASELINES["gni"](pipe, sigma=0.5, **kw),
        ("word_repetition", "2 repeats, random places"): lambda: BASELINES["word_repetition"](pipe, n_repeats=2, **kw),
    }
    every_row = list(methods)
    if only is not None:
        methods = {k: v for k, v in methods.items() if only in f"{k[0]}, {k[1]}"}
        if not methods:
            raise InputError(f"no benchmark row matches {only!r}")
    # the methods' revisions too: rows of a method whose output changed since they were saved are redone;
    # and the measures', from their revision 2 on
    revisions = {m.method: m.revision for m in (EmbeddingOptimization, *BASELINES.values())}
    saved_rows = SavedRows(rows_dir, {"model": weights_identity(pipe), "prompts": prompts, "reference": reference,
                                      "generations": generations, "revisions": revisions, **d,
                                      **revision_key(measures.MemLabReplication, "replication_revision"),
                                      **revision_key(measures.MemLabAlignment, "alignment_revision")})
    kernel = MemLabReplication(ds.build(ds.MemLabConfig(**manifest["config"])), pipe.vae)
    reader, align = AttributeReader(), measures.MemLabAlignment()
    groups = np.array([e["group"] for e in entries])

    def measured(images) -> dict:
        """Replication and alignment over all prompts and per planted group."""
        rep = _replication(images, entries, kernel, reader)
        flat = images.reshape(-1, *images.shape[2:])
        al = np.nanmean(align(flat, [p for p in prompts for _ in range(generations)]).reshape(len(prompts), -1), axis=1)
        out = {"replication": float(rep.mean()), "alignment": float(np.nanmean(al))}
        for g in dict.fromkeys(groups):
            out[f"replication_{g}"] = float(rep[groups == g].mean())
            out[f"alignment_{g}"] = float(np.nanmean(al[groups == g]))
        return out

    def unmitigated(images) -> dict:
        row = {"method": "none", "setting": "unmitigated", **measured(images), "seconds_per_prompt": 0.0}
        saved_rows.save(UNMITIGATED, row)
        return row

    found: dict = {}  # (method, setting) -> row
    read_targets: dict = {}  # the targets of the rows read back (their calibrations are not recomputed)
    reused = []
    for key in every_row:  # saved rows: the selected ones are not re-run, the others are listed with ``only``
        if key in methods and redo:
            continue
        row = saved_rows.load(key, read_targets)
        if row is not None:
            found[key] = row
            reused.append(f"{key[0]}, {key[1]}")
    before = None if redo else saved_rows.load(UNMITIGATED, read_targets)
    for key, make in methods.items():
        if key in found:
            continue
        used_targets.clear()
        t0 = time.time()
        mitigator = make()
        res = mitigator.mitigate(prompts, progress=progress)
        dt = (time.time() - t0) / len(prompts)
        if res.images_after.shape[1] != generations:  # measured per seed: other counts would be misread
            raise InputError(f"{key[0]}, {key[1]}: the method generates {res.images_after.shape[1]} image(s) per prompt, "
                             f"the benchmark {generations}; build it with generations={generations}")
        if before is None:
            before = unmitigated(res.images_before)
        row = {"method": key[0], "setting": key[1], **measured(res.images_after), "seconds_per_prompt": dt}
        if key[0].startswith("embedding"):
            changed = [mitigator.changes(t, n, mitigator.settings) for t, n in zip(res.trajectories, res.iterations)]
            row.update(untouched=len(changed) - sum(changed), unreached=len(res.unreached),
                       target=mitigator.settings["target"])
        # with the targets it used: a later run that reads it back does not compute them
        saved_rows.save(key, row, {name: calibrations[name].threshold for name in used_targets})
        found[key] = row
    if before is None:  # every row was read back but the unmitigated one was deleted
        before = unmitigated(generate(pipe, prompts, list(range(generations)), d["num_inference_steps"],
                                      d["guidance_scale"], progress=progress))
    rows = [before] + [found[k] for k in every_row if k in found]
    return MitigateBenchResult(rows, {"seeds": list(range(generations)), "prompts": len(prompts),
                                      **({"reused_rows": reused} if reused else {}),
                                      "reference_prompts": len(reference),
                                      **read_targets, **{name: c.threshold for name, c in calibrations.items()},
                                      "verbatim": sum(e["group"] == "verbatim" for e in entries),
                                      "template": sum(e["group"] == "template" for e in entries), **d})
