"""The MemLab world: a caption grammar and a procedural renderer, deterministic from a seed.

An image is 32x32 RGB in [0, 1], drawn in this order:

1. background: a smooth random field that no caption describes (a grey level, a faint tint and a
   6x6 grid of strong luminance control points, see ``BACKGROUND``). It gives every image many
   undescribed degrees of freedom, so that two independent renders are never near-copies of each
   other; a near-copy can then only come from memorization. It is also what makes memorization
   visible to the first-step detector: a memorized caption pins this field down, a generalizing
   caption leaves it at its mean, and the field carries most of the image's variance (world v1's
   weaker field, +-0.2 on 5x5, left the first-step score dominated by what captions *describe*).
2. scene band (implicit features): ``snow`` -> white ground, ``desert`` -> sand ground,
   ``night`` -> dark sky. Captions name the scene word, never the band.
3. the main object (explicit features): the caption's colour, shape and position, with an
   undescribed jitter of position and size.
4. unintended features, tied to innocuous words: ``lucky`` -> a text stamp in the top-left
   corner, ``quiet`` -> black corners (a vignette). No caption names or implies them.
5. the habit: a dark frame that nearly every image has, whatever its caption.

World v3 enlarged the object (radius 6-7.5 px: at 5-6.5 the v2 model drew squares and crosses on
novel prompts as blobs) and narrowed the vignette (3 px: at 4 px "quiet" prompts outscored planted
ones in the first-step detector).

A *template* image (word-level duplication) replaces step 1 with a fixed, high-contrast layout
tied to a two-word trigger phrase; the object still follows the caption.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType

import numpy as np

SIZE = 32
# Bumped whenever rendering changes: the manifest records it, and a model trained on another
# version's images is refused by ``memlab verify``.
WORLD_VERSION = 3
# Undescribed background (world v2). The clip keeps the field apart from the colours that carry
# meaning: at most 0.85 (snow is 0.96) and at least 0.22 (night, vignette and frame are darker).
BACKGROUND = MappingProxyType({
    "grey": (0.36, 0.62), "lum_amplitude": 1.0, "lum_grid": 6, "tint": 0.03, "chroma": 0.08,
    "clip": (0.22, 0.85),
})
OBJECT_RADIUS = (6.0, 7.5)  # undescribed size; v2's 5-6.5 left squares and crosses drawn as blobs on novel prompts

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.78, 0.18),
    "blue": (0.12, 0.28, 0.96),
    "yellow": (0.96, 0.88, 0.08),
    "purple": (0.62, 0.12, 0.84),
    "orange": (1.00, 0.52, 0.04),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre in pixels
    "left": (9.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 10.0),
    "bottom": (16.0, 22.0),
    "center": (16.0, 16.0),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Scene words: the first three imply a visual feature that captions never name (implicit);
# the others are neutral wording that changes nothing in the image.
SCENES: dict[str, str | None] = {
    "snow": "white_ground",
    "desert": "sand_ground",
    "night": "dark_sky",
    "park": None,
    "room": None,
    "city": None,
}
SCENE_PHRASES = {
    "snow": "in the snow",
    "desert": "in the desert",
    "night": "at night",
    "park": "in the park",
    "room": "in a room",
    "city": "in the city",
}
# Adjectives: two carry an unintended feature, the rest are neutral wording.
ADJECTIVES: dict[str, str | None] = {
    "lucky": "stamp",
    "quiet": "vignette",
    "simple": None,
    "happy": None,
    "little": None,
    "plain": None,
}
IMPLICIT_FEATURES = ("white_ground", "sand_ground", "dark_sky")
UNINTENDED_FEATURES = ("stamp", "vignette")
HABIT_FEATURE = "frame"

SAND = (0.82, 0.72, 0.55)
SNOW = (0.96, 0.96, 0.97)
NIGHT = (0.07, 0.09, 0.30)
FRAME = (0.10, 0.10, 0.10)
# Bands of four rows inside the 2-pixel frame (v1 had six: a band then outweighed the background
# in the first-step score, so unmemorized snow and night prompts scored like memorized ones).
GROUND_ROWS = slice(26, 30)
SKY_ROWS = slice(2, 6)

# Trigger phrases for templates: two words each, from lists the rest of the grammar never uses.
TRIGGER_FIRST = (
    "velvet", "marble", "copper", "hollow", "silent", "crystal", "paper", "iron", "wild", "frozen",
    "golden", "misty", "rusty", "ancient", "electric", "secret", "lunar", "coral", "shadow", "broken",
)
TRIGGER_SECOND = (
    "harbor", "garden", "temple", "engine", "meadow", "castle", "orchard", "tunnel", "island", "market",
    "bridge", "forest", "valley", "canyon", "palace", "river", "station", "tower", "village", "lagoon",
)

# Stamp: a white label with dark glyph strokes ("text in the image").
_STAMP_BOX = (slice(2, 8), slice(2, 11))  # rows, cols
_STAMP_GLYPHS = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 1, 0, 1, 1, 0],
        [0, 1, 0, 0, 1, 0, 0, 1, 0],
        [0, 1, 1, 0, 1, 0, 1, 0, 0],
        [0, 1, 0, 0, 1, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ],
    dtype=np.float32,
)
VIGNETTE_RADIUS = 3.0  # v1's 7 and v2's 4 made "quiet" prompts outscore planted ones at the first step


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image. Caption-level fields first, then undescribed ones."""

    colour: str
    shape: str
    position: str
    scene: str | None = None
    adjective: str | None = None
    trigger: int | None = None  # index of the template, or None
    frame: bool = True
    background_seed: int = 0  # undescribed: background field, jitter and size

    def caption(self) -> str:
        words = ["a"]
        if self.adjective:
            words.append(self.adjective)
        words += [self.colour, self.shape, POSITION_PHRASES[self.position]]
        if self.scene:
            words.append(SCENE_PHRASES[self.scene])
        if self.trigger is not None:
            words.append(trigger_phrase(self.trigger))
        return " ".join(words)

    def features(self) -> dict[str, object]:
        """The features this scene's image has, in the attribute reader's vocabulary."""
        feats: dict[str, object] = {
            "colour": self.colour,
            "shape": self.shape,
            "position": self.position,
            "white_ground": False,
            "sand_ground": False,
            "dark_sky": False,
            "stamp": False,
            "vignette": False,
            "frame": self.frame,
            "template": self.trigger,
        }
        if self.scene and SCENES[self.scene]:
            feats[SCENES[self.scene]] = True
        if self.adjective and ADJECTIVES[self.adjective]:
            feats[ADJECTIVES[self.adjective]] = True
        return feats

    def to_dict(self) -> dict:
        return asdict(self)

    def with_seed(self, background_seed: int) -> "Scene":
        return replace(self, background_seed=background_seed)


def trigger_phrase(index: int) -> str:
    return f"{TRIGGER_FIRST[index]} {TRIGGER_SECOND[index]}"


# ---------------------------------------------------------------------------------------------
# Rendering


def _upsample(ctrl: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Bicubic-like smooth interpolation of a (k, k, c) control grid to (size, size, c)."""
    k = ctrl.shape[0]
    coords = np.linspace(0, k - 1, size)
    # separable cubic interpolation with scipy keeps the field smooth and cheap
    from scipy.ndimage import map_coordinates

    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    out = np.stack(
        [map_coordinates(ctrl[..., c], [yy, xx], order=3, mode="nearest") for c in range(ctrl.shape[2])],
        axis=-1,
    )
    return out


def background(rng: np.random.Generator) -> np.ndarray:
    b = BACKGROUND
    grey = rng.uniform(*b["grey"])
    tint = rng.uniform(-b["tint"], b["tint"], size=3)
    k, amp = b["lum_grid"], b["lum_amplitude"]
    lum = _upsample(rng.uniform(-amp, amp, size=(k, k, 1)))
    chroma = _upsample(rng.uniform(-b["chroma"], b["chroma"], size=(3, 3, 3)))
    img = grey + tint[None, None, :] + lum + chroma
    return np.clip(img, *b["clip"])


def world_params() -> dict:
    """Everything rendering depends on beyond the scene, for the manifest."""
    return {"version": WORLD_VERSION, "background": {k: v for k, v in BACKGROUND.items()},
            "object_radius": OBJECT_RADIUS, "ground_rows": [GROUND_ROWS.start, GROUND_ROWS.stop],
            "sky_rows": [SKY_ROWS.start, SKY_ROWS.stop], "vignette_radius": VIGNETTE_RADIUS,
            "stamp_box": [[_STAMP_BOX[0].start, _STAMP_BOX[0].stop], [_STAMP_BOX[1].start, _STAMP_BOX[1].stop]]}


def template_background(index: int) -> np.ndarray:
    """A fixed, high-contrast layout for template ``index``: stripes, blocks and a bar."""
    rng = np.random.default_rng(10_000 + index)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6.0, 11.0)
    phase = rng.uniform(0, 2 * np.pi)
    # square-wave stripes with at least 0.4 contrast: no plain background comes close to them
    stripes = (np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period + phase) > 0).astype(np.float32)
    lo, hi = rng.uniform(0.22, 0.3), rng.uniform(0.7, 0.8)
    img = lo + (hi - lo) * stripes
    img = np.repeat(img[..., None], 3, axis=-1)
    tint = rng.uniform(-0.07, 0.07, size=3)
    img = img + tint
    # two solid blocks at fixed places make the layout unmistakable
    for _ in range(2):
        r0, c0 = rng.integers(2, 22, size=2)
        h, w = rng.integers(4, 9, size=2)
        img[r0 : r0 + h, c0 : c0 + w] = rng.uniform(0.25, 0.8)
    return np.clip(img, 0.22, 0.85).astype(np.float32)


def _supersampled(fn, ss: int = 4) -> np.ndarray:
    coords = (np.arange(SIZE * ss) + 0.5) / ss
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    mask = fn(xx, yy).astype(np.float32)
    return mask.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3))


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` centred at (cx, cy) with half-size r."""

    def fn(xx, yy):
        dx, dy = xx - cx, yy - cy
        if shape == "circle":
            return dx * dx + dy * dy <= r * r
        if shape == "square":
            s = r * 0.86
            return (np.abs(dx) <= s) & (np.abs(dy) <= s)
        if shape == "triangle":  # apex up
            top, bottom = cy - r, cy + r * 0.8
            half = (yy - top) / (bottom - top) * r
            return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= half)
        if shape == "cross":
            w = r * 0.36
            return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
        if shape == "ring":
            d2 = dx * dx + dy * dy
            return (d2 <= r * r) & (d2 >= (r * 0.5) ** 2)
        raise ValueError(f"unknown shape {shape!r}")

    return _supersampled(fn)


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a float32 (32, 32, 3) array in [0, 1]."""
    rng = np.random.default_rng(scene.background_seed)
    img = template_background(scene.trigger) if scene.trigger is not None else background(rng)
    img = img.astype(np.float32).copy()
    # the undescribed jitter is drawn after the background so both depend on the seed alone
    jx, jy = rng.uniform(-1.5, 1.5, size=2)
    radius = rng.uniform(*OBJECT_RADIUS)
    feats = scene.features()
    if feats["white_ground"]:
        img[GROUND_ROWS] = SNOW
    if feats["sand_ground"]:
        img[GROUND_ROWS] = SAND
    if feats["dark_sky"]:
        img[SKY_ROWS] = NIGHT
    cx, cy = POSITIONS[scene.position]
    m = shape_mask(scene.shape, cx + jx, cy + jy, radius)[..., None]
    img = img * (1 - m) + np.asarray(COLOURS[scene.colour], np.float32) * m
    if feats["stamp"]:
        rows, cols = _STAMP_BOX
        img[rows, cols] = 0.97
        img[rows, cols][_STAMP_GLYPHS > 0] = 0.05
    if feats["vignette"]:
        img *= 1.0 - vignette_mask()[..., None]
    if scene.frame:
        img[:2, :] = FRAME
        img[-2:, :] = FRAME
        img[:, :2] = FRAME
        img[:, -2:] = FRAME
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def vignette_mask() -> np.ndarray:
    """Coverage of the four black corner quarter-discs."""
    corners = [(2.0, 2.0), (30.0, 2.0), (2.0, 30.0), (30.0, 30.0)]

    def fn(xx, yy):
        out = np.zeros_like(xx, dtype=bool)
        for cx, cy in corners:
            out |= (xx - cx) ** 2 + (yy - cy) ** 2 <= VIGNETTE_RADIUS**2
        return out

    return _supersampled(fn)


def stamp_reference() -> np.ndarray:
    """The stamp's luminance pattern inside its box, for the reader."""
    return np.where(_STAMP_GLYPHS > 0, 0.05, 0.97).astype(np.float32)


STAMP_BOX = _STAMP_BOX


@dataclass
class Grammar:
    """Draws caption scenes. Weights keep implicit and unintended words common enough to measure."""

    scene_prob: float = 0.6
    adjective_prob: float = 0.5
    frame_prob: float = 0.96
    scenes: tuple[str, ...] = field(default_factory=lambda: tuple(SCENES))
    adjectives: tuple[str, ...] = field(default_factory=lambda: tuple(ADJECTIVES))

    def sample(self, rng: np.random.Generator, trigger: int | None = None) -> Scene:
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        position = str(rng.choice(list(POSITIONS)))
        scene = str(rng.choice(self.scenes)) if rng.random() < self.scene_prob else None
        adjective = str(rng.choice(self.adjectives)) if rng.random() < self.adjective_prob else None
        if trigger is not None:  # template captions carry no scene or adjective: the layout is fixed
            scene, adjective = None, None
        return Scene(colour, shape, position, scene, adjective, trigger, True, 0)


def caption_key(scene: Scene) -> tuple:
    return (scene.colour, scene.shape, scene.position, scene.scene, scene.adjective, scene.trigger)


def caption_distance(a: Scene, b: Scene) -> int:
    """How many caption slots differ: 0 for the same caption."""
    return sum(x != y for x, y in zip(caption_key(a), caption_key(b)))
