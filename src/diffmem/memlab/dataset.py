"""The MemLab training set and its ground-truth manifest, built deterministically from a seed.

Groups (the manifest's names):

- ``verbatim``: unique caption-image pairs, each duplicated ``verbatim_copies`` times.
- ``template``: a fixed layout under captions that share a two-word trigger phrase while their
  other words vary; ``test_prompts`` put each trigger in object contexts never seen with it.
- ``implicit``: scene words that always come with an unnamed but expected feature.
- ``unintended``: innocuous adjectives that always come with an unnamed, unexpected feature.
- ``explicit``: colour, shape and position, named by every caption.
- ``habit``: a frame that nearly every image has, whatever its caption.
- ``control``: trained captions with several different images each (non-memorized).
- ``single``: trained captions seen with one image once (the duplication-free reference).
- ``novel``: captions from the same grammar, held out of training, at least two caption slots
  away from every planted caption.
- ``neighbour``: held-out captions one slot away from a planted verbatim caption. They are not
  negatives: such prompts can call up the memorized image (measured by ``memlab verify``).

``duplicate_planted=False`` builds the duplication-free control set: every verbatim pair appears
once, everything else is the same.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import world

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class MemLabConfig:
    seed: int = 0
    verbatim: int = 40
    verbatim_copies: int = 64
    triggers: int = 20
    template_captions: int = 24  # training captions per trigger
    template_test_prompts: int = 3  # new-context prompts per trigger
    control: int = 1200
    control_images: int = 4
    single: int = 400
    novel: int = 200
    neighbour: int = 40
    duplicate_planted: bool = True

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Row:
    caption: str
    scene: world.Scene
    group: str
    image_id: int  # rows that share an image_id share the exact same image


@dataclass
class MemLabDataset:
    config: MemLabConfig
    rows: list[Row]
    manifest: dict
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.rows]

    def unique_image_ids(self) -> list[int]:
        return sorted({r.image_id for r in self.rows})

    def scene_of(self, image_id: int) -> world.Scene:
        return self._scenes_by_id()[image_id]

    def _scenes_by_id(self) -> dict[int, world.Scene]:
        if not hasattr(self, "_by_id"):
            self._by_id = {r.image_id: r.scene for r in self.rows}
        return self._by_id

    def image(self, image_id: int) -> np.ndarray:
        if image_id not in self._cache:
            self._cache[image_id] = world.render(self.scene_of(image_id))
        return self._cache[image_id]

    def unique_images(self, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """All distinct training images as (ids, float32 array N x 32 x 32 x 3)."""
        ids = self.unique_image_ids()
        it = ids
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(ids, desc="rendering MemLab images", unit="img")
        return np.asarray(ids), np.stack([self.image(i) for i in it])


def _distinct_scene(rng, grammar, taken: set, planted: list[world.Scene], min_dist: int, trigger=None):
    for _ in range(10_000):
        s = grammar.sample(rng, trigger=trigger)
        key = world.caption_key(s)
        if key in taken:
            continue
        if any(world.caption_distance(s, p) < min_dist for p in planted):
            continue
        taken.add(key)
        return s
    raise RuntimeError("MemLab grammar ran out of distinct captions; lower the group sizes")


def build(config: MemLabConfig | None = None) -> MemLabDataset:
    """Build the MemLab training set and manifest. Deterministic in ``config``."""
    cfg = config or MemLabConfig()
    rng = np.random.default_rng(cfg.seed)
    grammar = world.Grammar()
    taken: set = set()
    rows: list[Row] = []
    next_id = [0]

    def new_image_id() -> int:
        next_id[0] += 1
        return next_id[0] - 1

    def seed() -> int:
        return int(rng.integers(0, 2**31 - 1))

    def frame() -> bool:
        return bool(rng.random() < grammar.frame_prob)

    def finish(s: world.Scene) -> world.Scene:
        return world.Scene(**{**s.to_dict(), "frame": frame(), "background_seed": seed()})

    # planted verbatim pairs: captions at distance >= 2 from each other
    verbatim: list[world.Scene] = []
    for _ in range(cfg.verbatim):
        s = finish(_distinct_scene(rng, grammar, taken, verbatim, 2))
        verbatim.append(s)
    verbatim_entries = []
    for s in verbatim:
        iid = new_image_id()
        copies = cfg.verbatim_copies if cfg.duplicate_planted else 1
        first = len(rows)
        rows += [Row(s.caption(), s, "verbatim", iid) for _ in range(copies)]
        verbatim_entries.append(
            {"prompt": s.caption(), "image_id": iid, "first_row": first, "copies": copies,
             "scene": s.to_dict(), "expected_features": s.features()}
        )

    # templates: each trigger under varied object words; captions keep distance 2 from verbatim
    template_entries = []
    template_scenes: list[world.Scene] = []
    for t in range(cfg.triggers):
        train_prompts = []
        for _ in range(cfg.template_captions):
            s = finish(_distinct_scene(rng, grammar, taken, verbatim, 2, trigger=t))
            template_scenes.append(s)
            rows.append(Row(s.caption(), s, "template", new_image_id()))
            train_prompts.append(s.caption())
        test = []
        for _ in range(cfg.template_test_prompts):
            # a new object context: colour-shape-position combinations never trained with this trigger
            s = _distinct_scene(rng, grammar, taken, verbatim, 2, trigger=t)
            test.append({"prompt": s.caption(), "expected_features": s.features()})
        template_entries.append(
            {"trigger": world.trigger_phrase(t), "template_id": t, "feature": "template",
             "train_prompts": train_prompts, "test_prompts": test}
        )

    planted = verbatim + template_scenes

    control_entries = []
    for _ in range(cfg.control):
        s = _distinct_scene(rng, grammar, taken, planted, 2)
        n = cfg.control_images
        for _ in range(n):
            si = finish(s)
            rows.append(Row(si.caption(), si, "control", new_image_id()))
        control_entries.append({"prompt": s.caption(), "n_images": n, "expected_features": s.features()})

    single_entries = []
    for _ in range(cfg.single):
        s = finish(_distinct_scene(rng, grammar, taken, planted, 2))
        rows.append(Row(s.caption(), s, "single", new_image_id()))
        single_entries.append({"prompt": s.caption(), "expected_features": s.features()})

    novel_entries = []
    for _ in range(cfg.novel):
        s = _distinct_scene(rng, grammar, taken, planted, 2)
        novel_entries.append({"prompt": s.caption(), "expected_features": s.features(), "scene": s.to_dict()})

    neighbour_entries = []
    for i in range(cfg.neighbour):
        base = verbatim[i % len(verbatim)]
        for _ in range(1000):
            cand = world.Scene(**{**base.to_dict(), **_one_slot_change(rng, base)})
            key = world.caption_key(cand)
            if key not in taken and min(world.caption_distance(cand, p) for p in planted) == 1:
                taken.add(key)
                neighbour_entries.append(
                    {"prompt": cand.caption(), "planted_prompt": base.caption(),
                     "expected_features": cand.features()}
                )
                break

    # implicit / unintended words: how often each word comes with its feature in training
    def cooccurrence(word_field: str, word: str, feature: str) -> dict:
        with_word = [r for r in rows if getattr(r.scene, word_field) == word]
        with_feat = [r for r in with_word if r.scene.features()[feature]]
        return {"rows_with_word": len(with_word), "rows_with_word_and_feature": len(with_feat),
                "images_with_word": len({r.image_id for r in with_word}),
                "images_with_word_and_feature": len({r.image_id for r in with_feat}),
                "rows_with_feature": sum(1 for r in rows if r.scene.features()[feature])}

    implicit = [
        {"word": w, "feature": f, "phrase": world.SCENE_PHRASES[w], **cooccurrence("scene", w, f)}
        for w, f in world.SCENES.items() if f
    ]
    unintended = [
        {"word": w, "feature": f, **cooccurrence("adjective", w, f)}
        for w, f in world.ADJECTIVES.items() if f
    ]
    habit_rows = sum(1 for r in rows if r.scene.frame)
    manifest = {
        "name": "memlab",
        "version": MANIFEST_VERSION,
        "config": cfg.to_dict(),
        "image_size": world.SIZE,
        "world": world.world_params(),
        "n_rows": len(rows),
        "n_images": next_id[0],
        "features": {
            "explicit": ["colour", "shape", "position"],
            "implicit": list(world.IMPLICIT_FEATURES),
            "unintended": list(world.UNINTENDED_FEATURES),
            "habit": [world.HABIT_FEATURE],
            "template": ["template"],
        },
        "vocabulary": {
            "colours": list(world.COLOURS), "shapes": list(world.SHAPES), "positions": list(world.POSITIONS),
            "scenes": list(world.SCENES), "adjectives": list(world.ADJECTIVES),
        },
        "groups": {
            "verbatim": verbatim_entries,
            "template": template_entries,
            "implicit": implicit,
            "unintended": unintended,
            "explicit": {"features": ["colour", "shape", "position"],
                         "note": "named by every caption; expected wherever the prompt names them"},
            "habit": {"feature": "frame", "rows": habit_rows, "rate": habit_rows / len(rows)},
            "control": control_entries,
            "single": single_entries,
            "novel": novel_entries,
            "neighbour": neighbour_entries,
        },
    }
    manifest["fingerprint"] = hashlib.sha256(
        json.dumps([world.world_params(), [(r.caption, r.scene.background_seed, r.scene.frame) for r in rows]]).encode()
    ).hexdigest()[:16]
    return MemLabDataset(cfg, rows, manifest)


def _one_slot_change(rng, base: world.Scene) -> dict:
    slot = rng.choice(["colour", "shape", "position", "scene", "adjective"])
    if slot == "colour":
        return {"colour": str(rng.choice([c for c in world.COLOURS if c != base.colour]))}
    if slot == "shape":
        return {"shape": str(rng.choice([c for c in world.SHAPES if c != base.shape]))}
    if slot == "position":
        return {"position": str(rng.choice([c for c in world.POSITIONS if c != base.position]))}
    if slot == "scene":
        return {"scene": rng.choice([None, *[c for c in world.SCENES if c != base.scene]])}
    return {"adjective": rng.choice([None, *[c for c in world.ADJECTIVES if c != base.adjective]])}


def prompts(manifest: dict, group: str) -> list[str]:
    """The evaluation prompts of a manifest group (templates: their new-context test prompts)."""
    g = manifest["groups"][group]
    if group == "template":
        return [t["prompt"] for e in g for t in e["test_prompts"]]
    return [e["prompt"] for e in g]


def save_manifest(manifest: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(manifest, indent=1, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))
