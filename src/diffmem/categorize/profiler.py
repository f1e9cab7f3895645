"""The three kinds of memorization (Naseh, Roh, Houmansadr): consistent features across seeds,
classified as explicit intended, implicit intended or unintended.

``MemorizationProfiler(pipe, extractor, ...).profile(prompts) -> ProfileResult``

1. N seeded generations per prompt (default 16; generation batched across seeds and prompts).
2. Features per image from the extractor; each feature's frequency over the N seeds.
3. Lift against a control: the same feature's frequency over control prompts generated with the
   same seeds. Some seeds favour some features whatever the prompt, and a model-wide habit is
   frequent for every prompt; neither is memorization of the prompt.
4. A feature is memorized for a prompt when frequency >= tau (default 0.8) and
   lift >= lift_bound (default 2: at least twice as frequent as under unrelated prompts; the
   control frequency is floored at one generation's share so lift stays finite).
5. Each memorized feature is explicit when the prompt names it (lexical match on lemmas, plus
   synonyms), implicit when an expectation source says the prompt implies it, else unintended.
   The evidence for each decision is kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import InputError
from ..core.results import dump_json, reading_saved, revision_key, write_parquet
from .expectations import contains_phrase

KINDS = ("explicit", "implicit", "unintended")
PART_SIZE = 8  # prompts per saved part of a checkpointed profile: the unit a killed run redoes


def speed_text(seconds_per_prompt: float) -> str:
    """How fast a profile ran, in words: NaN when every prompt was read back from saved parts."""
    if seconds_per_prompt != seconds_per_prompt:
        return "time not measured (every prompt was read back from saved parts)"
    return f"{seconds_per_prompt:.2f} s per prompt generated"


@dataclass
class ProfileResult:
    prompts: list[str]
    seeds: list[int]
    rows: list[dict]  # one per (prompt, feature seen): frequency, lift, memorized, kind, evidence, trace
    settings: dict
    extractor: str
    control_prompts: list[str]
    seconds_per_prompt: float  # per prompt generated in the run (not read back from saved parts); NaN if none
    images: np.ndarray | None = None  # (P, N, H, W, 3) uint8 (float in [0, 1] from files saved before 2026-12-05)
    image_features: list[list[list[str]]] = field(default_factory=list)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def memorized(self, prompt: str | None = None) -> list[dict]:
        return [r for r in self.rows if r["memorized"] and (prompt is None or r["prompt"] == prompt)]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"prompts": self.prompts, "seeds": self.seeds, "settings": self.settings, "extractor": self.extractor,
                "control_prompts": self.control_prompts, "seconds_per_prompt": self.seconds_per_prompt,
                "image_features": self.image_features}
        dump_json({**meta, "rows": self.rows}, folder / "profile.json")
        frame = self.to_frame()
        if len(frame):
            frame["trace"] = frame["trace"].map(json.dumps) if "trace" in frame else None
            write_parquet(frame, folder / "profile.parquet", meta)
        if self.images is not None:
            np.savez_compressed(folder / "profile_images.npz", images=self.images)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ProfileResult":
        folder = Path(folder)
        with reading_saved(folder, "categorization (a folder with profile.json)"):
            d = json.loads((folder / "profile.json").read_text())
            images = None
            if (folder / "profile_images.npz").exists():
                with np.load(folder / "profile_images.npz", allow_pickle=False) as z:
                    images = z["images"]
            return cls(d["prompts"], d["seeds"], d["rows"], d["settings"], d["extractor"], d["control_prompts"],
                       d["seconds_per_prompt"], images, d["image_features"])

    def plot(self, path: str | Path, prompt_index: int = 0, max_images: int = 16) -> Path:
        """The N images of one prompt, each captioned with the memorized features it shows."""
        from ..core.figures import subplots

        if self.images is None:
            raise InputError("this profile holds no images")
        prompt = self.prompts[prompt_index]
        mem = {r["feature"]: r["kind"] for r in self.memorized(prompt)}
        colours = {"explicit": "#2a7", "implicit": "#27c", "unintended": "#d33"}
        imgs = self.images[prompt_index][:max_images]
        cols = min(8, len(imgs))
        rows = int(np.ceil(len(imgs) / cols))
        fig, axes = subplots(rows, cols, figsize=(1.35 * cols, 1.55 * rows + 0.9), squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k >= len(imgs):
                continue
            ax.imshow(imgs[k], interpolation="nearest")
            shown = [f for f in self.image_features[prompt_index][k] if f in mem]
            unintended = [f for f in shown if mem[f] == "unintended"]
            ax.set_title(f"seed {self.seeds[k]}" + ("\n" + ", ".join(unintended) if unintended else ""),
                         fontsize=5, color=colours["unintended"] if unintended else "black")
        legend = "   ".join(f"{f} ({k})" for f, k in sorted(mem.items(), key=lambda x: KINDS.index(x[1])))
        fig.suptitle(f"{prompt}\nmemorized: {legend or 'none'}", fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=130)
        return Path(path)


def check_expectations(extractor, expectations: Sequence) -> None:
    """Refuse expectation maps that name features the extractor never reports (see ExpectationMap.check_features)."""
    for source in expectations:
        if hasattr(source, "check_features") and hasattr(extractor, "features"):
            source.check_features(extractor.features(), extractor.name)


class MemorizationProfiler:
    # bumped when the generations behind saved features change for the same settings (the extractor
    # has its own): parts of an earlier diffmem's version are then refused or redone, never joined
    revision = 1

    def __init__(self, pipe, extractor, n: int = 16, tau: float = 0.8, lift_bound: float = 2.0,
                 control_prompts: Sequence[str] | None = None, expectations: Sequence = (),
                 synonyms: dict[str, list[str]] | None = None, tracer=None, seed: int = 0,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, batch_size: int = 64):
        from ..core.loading import sampler_defaults

        if n < 2:
            raise InputError("a feature is memorized when consistent across seeds: n must be at least 2")
        if not 0 < tau <= 1:
            raise InputError(f"tau must lie in (0, 1], got {tau}")
        d = sampler_defaults(pipe)
        self.pipe, self.extractor = pipe, extractor
        self.expectations = list(expectations)
        check_expectations(extractor, self.expectations)  # before anything is generated
        self.synonyms = {k: list(v) for k, v in (synonyms or {}).items()}
        self.tracer = tracer
        self.control_prompts = list(control_prompts) if control_prompts else _default_controls(pipe)
        self.settings = {"n": n, "tau": tau, "lift_bound": lift_bound, "seed": seed,
                         "num_inference_steps": num_inference_steps or d["num_inference_steps"],
                         "guidance_scale": guidance_scale if guidance_scale is not None else d["guidance_scale"],
                         "batch_size": batch_size, "expectations": [e.name for e in self.expectations]}

    def seeds(self) -> list[int]:
        return [self.settings["seed"] + i for i in range(self.settings["n"])]

    def _features(self, prompts: list[str], progress: bool) -> tuple[np.ndarray, list[list[set[str]]]]:
        from ..core.generate import generate

        s = self.settings
        imgs = generate(self.pipe, prompts, self.seeds(), s["num_inference_steps"], s["guidance_scale"], s["batch_size"], progress)
        flat = self.extractor(imgs.reshape(-1, *imgs.shape[2:]))
        n = len(self.seeds())
        return imgs, [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _identity(self) -> dict:
        """What saved features must have been made with: the generation settings, the model and the
        extractor (not tau or the lift bound, which only read the features)."""
        from ..core.loading import weights_identity

        s = self.settings
        return {"generation": {k: s[k] for k in ("n", "seed", "num_inference_steps", "guidance_scale", "batch_size")},
                "model": weights_identity(self.pipe), "extractor": extractor_identity(self.extractor),
                **revision_key(self)}

    def _features_in_parts(self, prompts: list[str], folder: Path, prefix: str, part_size: int, stale: str,
                           progress: bool, images: bool = True) -> tuple[np.ndarray | None, list[list[set[str]]], int]:
        """``_features``, ``part_size`` prompts at a time, each part's features (and, with ``images``,
        its images as uint8) saved in ``folder/{prefix}_NNNN`` so that a killed run redoes at most one
        part. Also returns how many prompts were generated now (not read back). Images are kept only
        to be shown: the features are taken from the float generations first."""
        from ..core.images import to_uint8
        from ..core.parts import in_parts
        from ..core.results import digest

        base = self._identity()
        chunks = [prompts[i : i + part_size] for i in range(0, len(prompts), part_size)]
        generated = [0]

        def compute(chunk):
            generated[0] += len(chunk)
            imgs, feats = self._features(chunk, progress)
            return (to_uint8(imgs) if images else None), feats

        def save(part: Path, result) -> None:
            imgs, feats = result
            if imgs is not None:
                np.savez_compressed(part / "images.npz", images=imgs)
            dump_json([[sorted(img) for img in per_prompt] for per_prompt in feats], part / "features.json")

        def load(part: Path):
            imgs = None
            if images:  # the prompts' parts always hold them, the controls' never
                with np.load(part / "images.npz", allow_pickle=False) as z:
                    imgs = to_uint8(z["images"])  # parts saved before 2026-12-05 hold float32
            return imgs, [[set(img) for img in per_prompt] for per_prompt in json.loads((part / "features.json").read_text())]

        done = list(in_parts(chunks, [digest({**base, "prompts": c}) for c in chunks], folder,
                             compute, save, load, prefix=prefix, stale=stale,
                             what="generations of other prompts, settings, extractor or another model, or of another "
                                  "diffmem's version of the profiler or extractor"))
        kept = np.concatenate([imgs for imgs, _ in done]) if images else None
        return kept, [f for _, feats in done for f in feats], generated[0]

    def control_frequencies(self, progress: bool = False, checkpoint: str | Path | None = None,
                            stale: str = "refuse") -> dict[str, float]:
        if not hasattr(self, "_control"):
            if checkpoint is None:
                _, feats = self._features(self.control_prompts, progress)
            else:
                # the controls' images are never shown: only their features are saved
                _, feats, _ = self._features_in_parts(self.control_prompts, Path(checkpoint), "control", PART_SIZE,
                                                      stale, progress, images=False)
            total = sum(len(f) for f in feats)
            counts: dict[str, int] = {}
            for per_prompt in feats:
                for img in per_prompt:
                    for f in img:
                        counts[f] = counts.get(f, 0) + 1
            self._control = ({f: c / total for f, c in counts.items()}, total)
        return self._control[0]

    def classify(self, prompt: str, feature: str) -> tuple[str, str]:
        desc = self.extractor.describe(feature)
        for term in [desc, *self.synonyms.get(feature, [])]:
            if contains_phrase(prompt, term):
                return "explicit", f"the prompt names {term!r}"
        for source in self.expectations:
            ev = source.implies(prompt, feature, desc)
            if ev:
                return "implicit", ev
        return "unintended", "neither named nor implied by any expectation source" + (
            "" if self.expectations else " (no expectation source given)")

    def profile(self, prompts: Sequence[str], progress: bool = False, keep_images: bool = True,
                checkpoint: str | Path | None = None, part_size: int = PART_SIZE, stale: str = "refuse") -> ProfileResult:
        """With ``checkpoint`` (a folder), the generations and their features are saved there in parts
        of ``part_size`` prompts (the controls too), and a killed run resumes. Parts made with other
        generation settings, another model or extractor are refused (``stale="refuse"``) or redone
        (``"restart"``, for callers that own the folder, as the audit does); changing only tau or the
        lift bound reuses them."""
        from ..core.images import to_uint8
        from ..detect.noise_norm import check_prompts

        prompts = check_prompts(prompts)
        if stale not in ("refuse", "restart"):
            raise InputError(f"stale must be 'refuse' or 'restart', got {stale!r}")
        if part_size < 1:
            raise InputError(f"part_size must be at least 1, got {part_size}")
        s = self.settings
        control = self.control_frequencies(progress, checkpoint, stale)
        floor = 1.0 / self._control[1]
        t0 = time.time()
        if checkpoint is None:
            images, feats = self._features(prompts, progress)
            images = to_uint8(images) if keep_images else None
            generated = len(prompts)
        else:
            images, feats, generated = self._features_in_parts(prompts, Path(checkpoint), "part", part_size, stale,
                                                               progress)
            images = images if keep_images else None
        # per prompt generated in this run: parts read back would make it look faster; NaN if none was
        seconds = (time.time() - t0) / generated if generated else float("nan")
        rows = []
        for p, per_image in zip(prompts, feats):
            counts: dict[str, int] = {}
            for img in per_image:
                for f in img:
                    counts[f] = counts.get(f, 0) + 1
            for f, c in sorted(counts.items()):
                freq = c / len(per_image)
                cf = control.get(f, 0.0)
                lift = freq / max(cf, floor)
                memorized = freq >= s["tau"] and lift >= s["lift_bound"]
                row = {"prompt": p, "feature": f, "description": self.extractor.describe(f), "frequency": freq,
                       "control_frequency": cf, "lift": lift, "memorized": memorized, "kind": None, "evidence": None,
                       "trace": None}
                if memorized:
                    row["kind"], row["evidence"] = self.classify(p, f)
                    if self.tracer is not None:
                        row["trace"] = self.tracer.trace(p, f)
                elif freq >= s["tau"]:
                    row["evidence"] = f"frequent ({freq:.2f}) but as frequent under control prompts (lift {lift:.2f})"
                rows.append(row)
        return ProfileResult(prompts, self.seeds(), rows, dict(s), self.extractor.name, self.control_prompts, seconds,
                             images, [[sorted(img) for img in pi] for pi in feats])


def extractor_identity(extractor) -> dict:
    """The extractor's kind and plain settings (model path, vocabulary, margin, ...): not its loaded
    weights, and never an API key."""
    plain = (str, int, float, bool, type(None), dict, list, tuple)
    return {"name": extractor.name, **revision_key(extractor),
            **{k: v for k, v in sorted(vars(extractor).items()) if isinstance(v, plain) and "key" not in k.lower()}}


def _default_controls(pipe, k: int = 24) -> list[str]:
    """MemLab models: a seeded sample of the manifest's novel prompts. Others must give controls."""
    p = Path(str(getattr(pipe, "name_or_path", ""))) / "memlab_manifest.json"
    if not p.exists():
        raise InputError("give control_prompts: unrelated prompts whose feature frequencies are the lift baseline")
    manifest = json.loads(p.read_text())
    novel = [e["prompt"] for e in manifest["groups"]["novel"]]
    rng = np.random.default_rng(1)
    return [novel[i] for i in sorted(rng.choice(len(novel), min(k, len(novel)), replace=False))]
