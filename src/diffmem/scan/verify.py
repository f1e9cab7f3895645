"""Verify trigger phrases against the model: do they bring back their cluster's image in new captions?

For each trigger phrase found by the scan:

1. **new contexts.** The phrase's own captions define what a compatible caption looks like. A new
   context takes one of them and swaps one word (outside the phrase) for the word another of
   them has at the same place, keeping only captions that occur nowhere in the training set: new
   combinations in the same grammar (in MemLab: a new colour, shape or position).
2. **generations** from the phrase in those contexts, and, as the baseline, from the same contexts
   with the phrase replaced by a random phrase of the same length taken from captions outside
   the cluster.
3. **replication**: the generated image, minus the dataset's mean thumbnail, correlates with the
   cluster's median image (what its members share: the template), minus the same mean, at
   ``threshold`` or more. Subtracting the mean keeps what every image shares (a frame, a border)
   from counting as a copy.

The trigger's replication rate is the share of its generations that replicate; the baseline's
is the same for the random phrases.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.results import dump_json, read_parquet, reading_saved, write_parquet


@dataclass
class VerifySettings:
    contexts: int = 8
    seeds: tuple[int, ...] = (0, 1)
    threshold: float = 0.4  # MemLab: trigger generations 0.45-0.90, random-phrase ones at most 0.33
    seed: int = 0
    num_inference_steps: int | None = None  # None: the model's own defaults
    guidance_scale: float | None = None

    def __post_init__(self):
        if not -1 <= self.threshold <= 1:  # a correlation; NaN fails this too
            raise InputError(f"threshold is a correlation and must lie in [-1, 1], got {self.threshold}")
        if self.contexts < 1 or not self.seeds:
            raise InputError(f"give at least one context and one seed, got {self.contexts} and {list(self.seeds)}")
        if self.guidance_scale is not None:
            from ..core.denoise import check_guidance_scale  # here: denoise imports torch and diffusers (seconds)

            check_guidance_scale(self.guidance_scale)


@dataclass
class TriggerVerification:
    settings: dict
    table: "object"  # one row per trigger: phrase, cluster, contexts, replication_rate, baseline_rate
    generations: "object"  # one row per generation: phrase, kind, prompt, seed, correlation, replicated
    summary: dict = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        write_parquet(self.generations, folder / "trigger_generations.parquet", {"settings": self.settings})
        dump_json({"settings": self.settings, "summary": self.summary, "triggers": self.table.to_dict("records")},
                  folder / "trigger_verification.json")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "TriggerVerification":
        import pandas as pd

        folder = Path(folder)
        with reading_saved(folder, "trigger verification (a scan folder with trigger_verification.json)"):
            meta = json.loads((folder / "trigger_verification.json").read_text())
            gens, _ = read_parquet(folder / "trigger_generations.parquet")
            return cls(meta["settings"], pd.DataFrame(meta["triggers"]), gens, meta["summary"])

    def plot(self, path: str | Path, images: np.ndarray | None = None) -> Path:
        from ..core.figures import subplots

        t = self.table.sort_values("replication_rate")
        fig, ax = subplots(figsize=(7, 0.28 * len(t) + 1.2))
        y = np.arange(len(t))
        ax.barh(y - 0.2, t["replication_rate"], 0.4, label="trigger phrase in new captions")
        ax.barh(y + 0.2, t["baseline_rate"], 0.4, label="random phrase, same captions")
        ax.set_yticks(y, t["phrase"], fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of generations that replicate the cluster's image")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return Path(path)


def _phrase_at(words: list[str], phrase: list[str]) -> int:
    for i in range(len(words) - len(phrase) + 1):
        if words[i:i + len(phrase)] == phrase:
            return i
    return -1


def new_contexts(phrase: str, captions: list[str], known: set[str], n: int, rng) -> list[tuple[list[str], int]]:
    """Up to ``n`` (context words, phrase position) pairs whose caption is not in ``known``."""
    ph = phrase.split()
    ctx = []
    for c in captions:
        w = c.split()
        i = _phrase_at(w, ph)
        if i >= 0:
            ctx.append((w[:i] + w[i + len(ph):], i))
    out, seen = [], set()
    for _ in range(50 * n):
        if len(out) >= n or len(ctx) < 2:
            break
        a, b = rng.choice(len(ctx), 2, replace=False)
        (wa, ia), (wb, _) = ctx[a], ctx[b]
        if len(wa) != len(wb) or not wa:
            continue
        j = int(rng.integers(len(wa)))
        if wa[j] == wb[j]:
            continue
        words = wa[:j] + [wb[j]] + wa[j + 1:]
        caption = " ".join(words[:ia] + ph + words[ia:])
        if caption in known or caption in seen:
            continue
        seen.add(caption)
        out.append((words, ia))
    return out


def _centred_corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    d = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else 0.0


PART_SIZE = 16  # captions per saved part: the unit a killed verification redoes


def _generated_thumbnails(pipe, prompts: list[str], seeds: list[int], sampler: dict, checkpoint: str | Path | None,
                          progress: bool) -> np.ndarray:
    """(P, S, T, T, 3) uint8 thumbnails of each caption's generations, PART_SIZE captions at a time:
    only thumbnails are kept (full images of a real model for thousands of captions would not fit),
    and with ``checkpoint`` each part is saved there, so that a killed run redoes at most one part.
    The folder is diffmem's own: parts of another model, sampler or seeds are redone."""
    from tqdm.auto import tqdm

    from ..core.generate import generate
    from ..core.loading import weights_identity
    from ..core.parts import in_parts
    from ..core.results import digest
    from .features import thumbnail

    chunks = [prompts[i : i + PART_SIZE] for i in range(0, len(prompts), PART_SIZE)]
    base = {"model": weights_identity(pipe), "sampler": sampler, "seeds": list(seeds)}
    bar = tqdm(total=len(prompts) * len(seeds), desc="verifying triggers", unit="img", disable=not progress)

    def compute(chunk):
        images = generate(pipe, chunk, seeds, **sampler)
        return np.stack([[thumbnail(im) for im in per_prompt] for per_prompt in images])

    def save(part: Path, thumbs) -> None:
        np.savez_compressed(part / "thumbnails.npz", thumbnails=thumbs)

    def load(part: Path):
        with np.load(part / "thumbnails.npz", allow_pickle=False) as z:
            return z["thumbnails"]

    if checkpoint is None:
        parts = map(compute, chunks)
    else:
        parts = in_parts(chunks, [digest({**base, "prompts": c}) for c in chunks], checkpoint, compute, save, load,
                         prefix="verify", stale="restart")
    out = []
    for thumbs in parts:
        out.append(thumbs)
        bar.update(thumbs.shape[0] * thumbs.shape[1])
    bar.close()
    return np.concatenate(out)


def verify_triggers(pipe, result, cluster_images: dict[int, np.ndarray], mean_image: np.ndarray,
                    settings: VerifySettings | None = None, phrases: list[str] | None = None,
                    progress: bool = True, checkpoint: str | Path | None = None) -> TriggerVerification:
    """``result``: a ``ScanResult``; ``cluster_images``: cluster id -> median thumbnail (uint8 or float);
    ``mean_image``: the dataset's mean thumbnail (both as ``ScanResult.save`` writes them).
    ``checkpoint``: a folder where the generations' thumbnails are saved in parts as they are made,
    so that a killed run resumes (see ``_generated_thumbnails``)."""
    import pandas as pd

    from ..core.loading import sampler_defaults
    from .features import normalize_caption

    s = settings or VerifySettings()
    trig = result.triggers
    if trig.empty:
        raise InputError("the scan found no trigger phrases: nothing to verify")
    if phrases is not None:
        trig = trig[trig["phrase"].isin(phrases)]
        if trig.empty:
            raise InputError(f"none of {phrases} is a trigger phrase of this scan")
    sampler = sampler_defaults(pipe)
    if s.num_inference_steps is not None:
        sampler["num_inference_steps"] = s.num_inference_steps
    if s.guidance_scale is not None:
        sampler["guidance_scale"] = s.guidance_scale
    rng = np.random.default_rng(s.seed)
    rows = result.rows
    norm = [normalize_caption(c) if isinstance(c, str) else "" for c in rows["caption"]]
    known = set(norm)
    clusters = rows["image_cluster"].to_numpy()
    trigger_words = {w for p in trig["phrase"] for w in p.split()}
    outside_pool = [c.split() for c, k in zip(norm, clusters) if c and not (set(c.split()) & trigger_words)]

    prompts, meta = [], []
    for rec in trig.to_dict("records"):
        members = [c for c, k in zip(norm, clusters) if k == rec["cluster"] and c]
        contexts = new_contexts(rec["phrase"], members, known, s.contexts, rng)
        n_words = len(rec["phrase"].split())
        for words, at in contexts:
            prompts.append(" ".join(words[:at] + rec["phrase"].split() + words[at:]))
            meta.append((rec["phrase"], rec["cluster"], "trigger"))
            for _ in range(100):  # a random phrase of the same length from outside the cluster
                src = outside_pool[int(rng.integers(len(outside_pool)))] if outside_pool else []
                if len(src) >= n_words:
                    k = int(rng.integers(len(src) - n_words + 1))
                    rand = src[k:k + n_words]
                    break
            else:
                continue
            prompts.append(" ".join(words[:at] + rand + words[at:]))
            meta.append((rec["phrase"], rec["cluster"], "random phrase"))
    if not prompts:
        raise InputError("no new context could be built for any trigger phrase (its captions are too few or too alike)")
    thumbs = _generated_thumbnails(pipe, prompts, list(s.seeds), sampler, checkpoint, progress)
    mean = mean_image.astype(np.float32) / (255.0 if mean_image.dtype == np.uint8 else 1.0)
    records = []
    for p, (phrase, cluster, kind), per_prompt in zip(prompts, meta, thumbs):
        ref = cluster_images[int(cluster)].astype(np.float32)
        ref = ref / (255.0 if cluster_images[int(cluster)].dtype == np.uint8 else 1.0) - mean
        for seed, thumb in zip(s.seeds, per_prompt):
            g = thumb.astype(np.float32) / 255.0 - mean
            corr = _centred_corr(g, ref)
            records.append({"phrase": phrase, "cluster": int(cluster), "kind": kind, "prompt": p, "seed": int(seed),
                            "correlation": corr, "replicated": corr >= s.threshold})
    gens = pd.DataFrame(records)
    rate = gens.groupby(["phrase", "kind"])["replicated"].mean().unstack("kind")
    n_ctx = gens[gens["kind"] == "trigger"].groupby("phrase")["prompt"].nunique()
    table = pd.DataFrame({
        "phrase": rate.index,
        "cluster": [int(trig.set_index("phrase").loc[p, "cluster"]) for p in rate.index],
        "contexts": [int(n_ctx.get(p, 0)) for p in rate.index],
        "replication_rate": rate.get("trigger", pd.Series(np.nan, index=rate.index)).to_numpy(),
        "baseline_rate": rate.get("random phrase", pd.Series(np.nan, index=rate.index)).to_numpy(),
    }).reset_index(drop=True)
    summary = {
        "triggers": int(len(table)),
        "generations": int(len(gens)),
        "replication_rate": float(gens.loc[gens["kind"] == "trigger", "replicated"].mean()),
        "baseline_rate": float(gens.loc[gens["kind"] == "random phrase", "replicated"].mean()),
        "sampler": sampler,
    }
    return TriggerVerification({**asdict(s), "seeds": list(s.seeds)}, table, gens, summary)
