"""``diffmem memlab sample``: a grid of generations for planted and novel prompts, each checked
against the manifest (the quick look at MemLab; ``memlab verify`` measures it in full)."""

from __future__ import annotations

import time
from pathlib import Path


from ..core.results import dump_json
from . import dataset as ds
from .reader import AttributeReader
from .recipe import DEFAULT_SAMPLER
from .replication import MemLabReplication


def sample_grid(model="memlab", out: str | Path = "memlab-sample", seeds: int = 4, per_group: int = 3,
                device="cpu") -> dict:
    from ..core.generate import generate
    from ..core.loading import load_pipeline, runs_on
    from .verify import load_manifest

    t0 = time.time()
    pipe = load_pipeline(model, device=device)
    manifest = load_manifest(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # once the model loads: a bad model or device writes nothing
    g = manifest["groups"]
    rows = [("verbatim", e["prompt"], e["expected_features"], e["image_id"]) for e in g["verbatim"][:per_group]]
    rows += [("template", t["prompt"], t["expected_features"], None) for e in g["template"][:per_group] for t in e["test_prompts"][:1]]
    rows += [("novel", e["prompt"], e["expected_features"], None) for e in g["novel"][:per_group]]
    seed_list = list(range(seeds))
    images = generate(pipe, [r[1] for r in rows], seed_list, **DEFAULT_SAMPLER)
    dataset = ds.build(ds.MemLabConfig(**manifest["config"]))
    rep = MemLabReplication(dataset, pipe.vae)
    reader = AttributeReader()
    checks = []
    for (group, prompt, exp, image_id), ims in zip(rows, images):
        match = rep.nearest(ims)
        for si, im in enumerate(ims):
            rd = reader.read(im)
            if group == "verbatim":
                ok = bool(rep.ratio_to(im[None], image_id)[0] <= rep.threshold)
                what = "replicates its planted training image"
            elif group == "template":
                ok = rd["template"] == exp["template"]
                what = "shows its trigger's template layout"
            else:
                ok = rd["colour"] == exp["colour"] and rd["shape"] == exp["shape"] and not match.replicated[si]
                what = "shows the named colour and shape and copies no training image"
            checks.append({"group": group, "prompt": prompt, "seed": seed_list[si], "expected": what, "ok": ok,
                           "read": rd, "nearest_ratio": float(match.ratio[si])})
    _draw(images, rows, checks, out / "memlab_sample.png")
    summary_rows = []
    for group in ("verbatim", "template", "novel"):
        c = [x["ok"] for x in checks if x["group"] == group]
        summary_rows.append(f"{group:9s} {sum(c)}/{len(c)} images as expected")
    res = {"checks": checks, "sampler": DEFAULT_SAMPLER, "seeds": seed_list, "runs_on": runs_on(pipe), "wall_time_s": time.time() - t0,
           "summary": "MemLab sample (grid: " + str(out / "memlab_sample.png") + ")\n" + "\n".join(summary_rows)}
    dump_json(res, out / "memlab_sample.json")
    return res


def _draw(images, rows, checks, path):
    from ..core.figures import subplots

    n, s = images.shape[:2]
    fig, axes = subplots(n, s, figsize=(1.3 * s + 3.2, 1.3 * n), squeeze=False)
    for i in range(n):
        for j in range(s):
            ax = axes[i, j]
            ax.imshow(images[i, j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ok = checks[i * s + j]["ok"]
            for sp in ax.spines.values():
                sp.set_color("#2a2" if ok else "#d22")
                sp.set_linewidth(2.5)
            if j == 0:
                ax.set_ylabel(f"{rows[i][0]}", fontsize=7)
        axes[i, -1].text(1.08, 0.5, rows[i][1], transform=axes[i, -1].transAxes, fontsize=7, va="center")
    for j in range(s):
        axes[0, j].set_title(f"seed {j}", fontsize=7)
    fig.suptitle("MemLab generations (green: as the manifest expects, red: not)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the captions right of the grid are not clipped
