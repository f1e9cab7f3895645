"""Measure a mitigation result (replication and alignment, before and after) and write its files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import InputError
from .result import MitigationResult


def measure(pipe, res: MitigationResult) -> dict:
    """Replication and alignment before and after, for MemLab models. A generation replicates when
    it reproduces planted content: a training image (MemLab's replication measure) or a planted
    template layout (the attribute reader), since template prompts in new contexts bring back the
    layout, never a whole training image. Other models need their training images and, for real
    data, SSCD and CLIP weights: use ``diffmem.mitigate.measures`` from Python; here only the loss
    figures are kept."""
    from ..memlab.reader import AttributeReader
    from . import measures as M

    if not (Path(str(pipe.name_or_path)) / "memlab_manifest.json").exists():
        return {}
    rep = M.MemLabReplication(pipe)
    align = M.MemLabAlignment()
    reader = AttributeReader()
    out = {}
    p, s = res.images_before.shape[:2]
    prompts_flat = [pr for pr in res.prompts for _ in range(s)]
    for when, imgs in (("before", res.images_before), ("after", res.images_after)):
        flat = imgs.reshape(p * s, *imgs.shape[2:])
        layout = np.array([reader.read(im)["template"] is not None for im in flat])
        r = (np.asarray(rep(flat)["replicated"], bool) | layout).reshape(p, s)
        a = align(flat, prompts_flat).reshape(p, s)
        out[f"replication_{when}"] = r.mean(axis=1).tolist()
        out[f"alignment_{when}"] = _mean_of_named(a).tolist()
    return out


MEASURE_BATCH = 32  # generations measured at once: CLIP and SSCD activations stay small


def measure_with(res: MitigationResult, replication=None, alignment=None) -> dict:
    """Replication and alignment before and after, per prompt, with measures the caller chose: any
    model's generations against its training images (``SSCDReplication`` or ``PixelReplication``)
    and against the original prompt (``CLIPScore``, or ``MemLabAlignment``).

    Per prompt: ``replication_*`` the share of its generations at or above the measure's threshold,
    ``similarity_*`` their mean similarity to the nearest training image, ``nearest_*`` the training
    row nearest to its most similar generation and ``nearest_location_*`` where that row's image is
    (a path or ``shard.tar:key``; None where the data names none); ``alignment_*`` the mean alignment."""
    if res.images_before is None:
        raise InputError("this mitigation result holds no images to measure (it was run without generating them)")
    p, s = res.images_before.shape[:2]
    prompts_flat = [pr for pr in res.prompts for _ in range(s)]
    out = {}
    for when, imgs in (("before", res.images_before), ("after", res.images_after)):
        flat = imgs.reshape(p * s, *imgs.shape[2:])
        chunks = range(0, len(flat), MEASURE_BATCH)
        if replication is not None:
            found = [replication(flat[i : i + MEASURE_BATCH]) for i in chunks]
            sim = np.concatenate([f["similarity"] for f in found]).reshape(p, s)
            near = np.concatenate([f["nearest"] for f in found]).reshape(p, s)
            copied = np.concatenate([f["replicated"] for f in found]).astype(bool).reshape(p, s)
            out[f"replication_{when}"] = copied.mean(axis=1).tolist()
            out[f"similarity_{when}"] = sim.mean(axis=1).tolist()
            out[f"nearest_{when}"] = near[np.arange(p), sim.argmax(axis=1)].tolist()
            if all("location" in f for f in found):  # a measure of the caller's own may not say where
                where = np.array([loc for f in found for loc in f["location"]], dtype=object).reshape(p, s)
                out[f"nearest_location_{when}"] = where[np.arange(p), sim.argmax(axis=1)].tolist()
        if alignment is not None:
            a = np.concatenate([alignment(flat[i : i + MEASURE_BATCH], prompts_flat[i : i + MEASURE_BATCH]) for i in chunks])
            out[f"alignment_{when}"] = _mean_of_named(np.asarray(a, float).reshape(p, s)).tolist()
    return out


NEAREST_PNG = "nearest_{:04d}.png"  # per prompt: the training image its generations came nearest before mitigation
NEAREST_SIDE = 256  # a full-size photo would swell the report that embeds it


def save_nearest_images(res: MitigationResult, replication, folder: str | Path) -> list[Path]:
    """Per prompt, the training image nearest to its most similar generation before mitigation (the
    one it copies, when it replicates), read again from the training data and saved as
    ``NEAREST_PNG`` in ``folder``, its longer side at most ``NEAREST_SIDE``. Nothing for a measure
    without training images (MemLab's, or one of the caller's own). Those an earlier run left in
    ``folder`` are removed: they would be taken for this run's."""
    from PIL import Image

    from ..core.results import atomic_path

    folder = Path(folder)
    train = getattr(replication, "train", None)
    rows = res.measures.get("nearest_before", []) if train is not None else []
    paths = [folder / NEAREST_PNG.format(i) for i in range(len(rows))]
    for stale in set(folder.glob(NEAREST_PNG.replace("{:04d}", "*"))) - set(paths):
        stale.unlink()
    for row, path in zip(rows, paths):
        im = Image.fromarray((np.clip(train.image(row), 0, 1) * 255).round().astype(np.uint8))
        im.thumbnail((NEAREST_SIDE, NEAREST_SIDE))
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            im.save(tmp, format="PNG")
    return paths


def apply_measures(pipe, res: MitigationResult, replication=None, alignment=None) -> MitigationResult:
    """``res`` measured: with the chosen measures (see ``measure_with``), and with MemLab's own
    (``measure``) for whichever was not chosen on a MemLab model; the chosen ones are named in
    ``res.settings["measured_with"]``. Run on a joined result, so saved parts never mix two runs' measures."""
    if replication is None or alignment is None:
        res.measures.update(measure(pipe, res))
    if replication is not None or alignment is not None:
        res.measures.update(measure_with(res, replication, alignment))
        said = {"replication": replication, "alignment": alignment}
        res.settings = {**res.settings, "measured_with": {k: m.describe() for k, m in said.items() if m is not None}}
    return res


def _mean_of_named(alignment: np.ndarray) -> np.ndarray:
    """Per prompt, the mean over generations; NaN (without numpy's empty-slice warning) for a prompt
    that names no MemLab attribute, whose alignment has nothing to measure."""
    named = ~np.isnan(alignment)
    total = np.where(named, alignment, 0.0).sum(axis=1)
    count = named.sum(axis=1)
    return np.divide(total, count, out=np.full(len(alignment), np.nan), where=count > 0)


def alignment_text(before, after) -> str:
    """Alignment before -> after over the prompts that name MemLab attributes, saying how many do."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    named = ~np.isnan(before)
    if not named.any():
        return "alignment not measured (no prompt names a MemLab attribute)"
    text = f"alignment {before[named].mean():.3f} -> {after[named].mean():.3f}"
    return text if named.all() else f"{text} (over the {named.sum()} of {len(before)} prompts that name MemLab attributes)"


def save_outputs(res: MitigationResult, out: str | Path) -> str:
    """The result, the before / after grid, the loss trajectories and a CSV in ``out``; a summary."""
    out = Path(out)
    res.save(out)
    res.plot_grid(out / "before_after.png")
    if any(len(t) for t in res.trajectories):
        res.plot_trajectories(out / "loss_trajectories.png")
    res.to_frame().to_csv(out / "mitigation.csv", index=False)
    lines = [f"{res.method}: {len(res.prompts)} prompts, seeds {res.seeds} -> {out}"]
    if res.unreached:
        lines.append(f"target not reached within {res.settings.get('max_iters')} iterations for {len(res.unreached)} prompt(s): "
                     + "; ".join(repr(p) for p in res.unreached[:5]))
    if res.truncated is not None and res.truncated.any():
        lines.append(f"{int(res.truncated.sum())} prompt(s) longer than the model reads, mitigated on their first tokens: "
                     "column truncated")
    if res.mitigated_truncated is not None:
        # what falls past the cut changes nothing the model reads: added words at random places, or
        # the prompt's own tail when its additions were put before the cut
        cut = [q for p, q, t in zip(res.prompts, res.mitigated_prompts, res.mitigated_truncated) if t and q != p]
        if cut:
            lines.append(f"{len(cut)} rewrite(s) longer than the model reads: words past the cut, added or the "
                         "prompt's own, are not read (column mitigated_truncated)")
    m = res.measures
    said = []
    if "replication_before" in m:
        said.append(f"replication {np.mean(m['replication_before']):.3f} -> {np.mean(m['replication_after']):.3f}")
    if "alignment_before" in m:
        said.append(alignment_text(m["alignment_before"], m["alignment_after"]))
    if said:
        lines.append("; ".join(said))
    for what, how in res.settings.get("measured_with", {}).items():
        lines.append(f"{what}: {how}")
    return "\n".join(lines)
