"""The MemLab attribute reader: reads a MemLab image's features back, without any model.

It is the ground-truth feature extractor of later stages (categorization, alignment), so its
rules are simple and inspectable:

- object: the largest connected region of saturated pixels (scene bands, backgrounds, frame,
  stamp and vignette are all low-saturation by construction); its colour is the nearest palette
  colour to the region's median, its shape the best-overlapping rendered prototype at the
  region's own centre and size, its position the nearest anchor to its centroid.
- scene bands: the share of the band's inner rows, away from the object, near the band colour
  (the edge rows mix with the background and the frame once a VAE has blurred them).
- stamp: correlation of the top-left box with the stamp's glyph pattern, slightly blurred as a
  VAE returns it.
- vignette: the four corner quarter-discs are near black.
- frame: the two-pixel border is near the frame colour.
- template: the luminance outside the object correlates with one of the fixed template layouts
  (Pearson >= 0.7). Correlation, not a distance: generated layouts come back with the right
  stripes but shifted contrast and tint (RMSE 0.12-0.20 to the layout, correlation 0.80-0.92,
  the next-best layout at most 0.55).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import world

FEATURE_NAMES = (
    "colour",
    "shape",
    "position",
    "white_ground",
    "sand_ground",
    "dark_sky",
    "stamp",
    "vignette",
    "frame",
    "template",
)

_PALETTE_NAMES = list(world.COLOURS)
_PALETTE = np.array([world.COLOURS[c] for c in _PALETTE_NAMES], np.float32)
_TEMPLATES = np.stack([world.template_background(i) for i in range(len(world.TRIGGER_FIRST))])
_TEMPLATE_LUMA = _TEMPLATES.mean(-1)
_VIGNETTE = world.vignette_mask()
# Generated images come back through the VAE slightly blurred (MemLab's VAE: about a 0.6-pixel
# Gaussian). Prototypes are compared both sharp and blurred so the reader works on both.
_BLUR = 0.7
_SHAPE_BLURS = (_BLUR, 1.0)
# prototype area per unit half-size squared, to size a prototype from an object's area
_UNIT_AREA = {shape: float(world.shape_mask(shape, 16.0, 16.0, 8.0).sum()) / 64.0 for shape in world.SHAPES}
_STAMP_REF = ndimage.gaussian_filter(world.stamp_reference(), _BLUR, mode="nearest")


@dataclass
class ReaderThresholds:
    saturation: float = 0.38  # object pixels: max - min channel
    colour_distance: float = 0.42  # object pixels must lie this close to the object's palette colour
    min_object_pixels: int = 12
    band_distance: float = 0.15  # a band pixel counts when within this RGB distance of snow / sand / night
    band_fraction: float = 0.6  # ... and the band is there when this share of its free pixels counts
    stamp_correlation: float = 0.65
    vignette_max_luma: float = 0.16
    frame_distance: float = 0.12
    template_correlation: float = 0.7


def _as_float(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.shape != (world.SIZE, world.SIZE, 3):
        raise ValueError(f"MemLab images are {world.SIZE}x{world.SIZE} RGB; got shape {arr.shape}")
    return arr


class AttributeReader:
    """Reads MemLab features from an image (PIL image, uint8 or float array in [0, 1])."""

    def __init__(self, thresholds: ReaderThresholds | None = None):
        self.t = thresholds or ReaderThresholds()

    def read(self, image) -> dict[str, object]:
        img = _as_float(image)
        inner = np.zeros(img.shape[:2], bool)
        inner[2:-2, 2:-2] = True
        sat = img.max(-1) - img.min(-1)
        obj = self._object_mask(img, sat, inner)
        feats: dict[str, object] = {"colour": None, "shape": None, "position": None}
        if obj is not None:
            mask, colour = obj
            feats["colour"] = colour
            feats["shape"], feats["position"] = self._shape_and_position(mask)
            free = inner & ~ndimage.binary_dilation(mask, iterations=1)
        else:
            free = inner.copy()
        free &= ~(_VIGNETTE > 0.01)  # black corners would hide a band or a template
        free[world.STAMP_BOX] = False  # so would the stamp
        ground, sky = _inner(world.GROUND_ROWS), _inner(world.SKY_ROWS)
        feats["white_ground"] = self._band_is(img, ground, free, world.SNOW)
        feats["sand_ground"] = self._band_is(img, ground, free, world.SAND)
        feats["dark_sky"] = self._band_is(img, sky, free, world.NIGHT)
        feats["stamp"] = self._stamp(img)
        feats["vignette"] = self._vignette(img)
        feats["frame"] = self._frame(img)
        feats["template"] = self._template(img, free)
        return feats

    def read_many(self, images) -> list[dict[str, object]]:
        return [self.read(im) for im in images]

    # -- parts -------------------------------------------------------------------------------
    def _object_mask(self, img, sat, inner):
        cand = (sat >= self.t.saturation) & inner
        if cand.sum() < self.t.min_object_pixels:
            return None
        med = np.median(img[cand], axis=0)
        ci = int(np.argmin(((_PALETTE - med) ** 2).sum(-1)))
        close = (np.sqrt(((img - _PALETTE[ci]) ** 2).sum(-1)) <= self.t.colour_distance) & inner
        labels, n = ndimage.label(close)
        if n == 0:
            return None
        sizes = ndimage.sum(close, labels, index=range(1, n + 1))
        k = int(np.argmax(sizes)) + 1
        mask = labels == k
        if mask.sum() < self.t.min_object_pixels:
            return None
        # rings have a hole: fill it for the centre estimate, but keep the mask for matching
        return mask, _PALETTE_NAMES[ci]

    def _shape_and_position(self, mask):
        filled = ndimage.binary_fill_holes(mask)
        ys, xs = np.nonzero(filled)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        area = float(mask.sum())
        best, best_iou = None, -1.0
        for shape in world.SHAPES:
            # size from the area, not the bounding box: colour bleeding after the VAE adds stray
            # pixels that stretch a box but hardly change the area
            r0 = np.sqrt(area / _UNIT_AREA[shape])
            # the triangle's centroid sits below its nominal centre; try a few offsets
            for dy in (0.0, -1.0, -2.0) if shape == "triangle" else (0.0,):
                for scale in (0.92, 1.0, 1.08):
                    soft = world.shape_mask(shape, cx, cy + dy, r0 * scale)
                    # sharp and blurred: a blurred square loses its corners and would pass for a circle
                    protos = [soft >= 0.5] + [ndimage.gaussian_filter(soft, b) >= 0.5 for b in _SHAPE_BLURS]
                    for proto in protos:
                        iou = (proto & mask).sum() / max((proto | mask).sum(), 1)
                        if iou > best_iou:
                            best, best_iou = shape, iou
        anchors = np.array(list(world.POSITIONS.values()))
        pos = list(world.POSITIONS)[int(np.argmin(((anchors - [cx, cy]) ** 2).sum(-1)))]
        return best, pos

    def _band_is(self, img, rows, free, colour) -> bool:
        region = img[rows][free[rows]]
        if len(region) < 12:
            return False
        # a share of near pixels, not a median: smooth backgrounds pass near a band colour in
        # places, a band is uniform
        near = np.sqrt(((region - np.asarray(colour)) ** 2).sum(-1)) <= self.t.band_distance
        return bool(near.mean() >= self.t.band_fraction)

    def _stamp(self, img) -> bool:
        rows, cols = world.STAMP_BOX
        patch = img[rows, cols].mean(-1)
        a = patch - patch.mean()
        b = _STAMP_REF - _STAMP_REF.mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        corr = float((a * b).sum() / denom) if denom > 0 else 0.0
        return corr >= self.t.stamp_correlation and patch.max() > 0.7

    def _vignette(self, img) -> bool:
        core = _VIGNETTE > 0.9
        core[:2, :] = core[-2:, :] = core[:, :2] = core[:, -2:] = False  # the frame is dark anyway
        luma = img.mean(-1)
        # each corner separately: all four must be dark
        h = world.SIZE // 2
        quads = [(slice(0, h), slice(0, h)), (slice(0, h), slice(h, None)), (slice(h, None), slice(0, h)), (slice(h, None), slice(h, None))]
        return all(float(np.median(luma[q][core[q]])) <= self.t.vignette_max_luma for q in quads)

    def _frame(self, img) -> bool:
        ring = np.ones(img.shape[:2], bool)
        ring[2:-2, 2:-2] = False
        ring &= ~(_VIGNETTE > 0.01)  # the vignette blackens the frame's corners too
        med = np.median(img[ring], axis=0)
        return bool(np.sqrt(((med - np.asarray(world.FRAME)) ** 2).sum()) <= self.t.frame_distance)

    def _template(self, img, free):
        if free.sum() < 50:
            return None
        a = img.mean(-1)[free]
        a = a - a.mean()
        b = _TEMPLATE_LUMA[:, free]
        b = b - b.mean(axis=1, keepdims=True)
        denom = np.sqrt((b * b).sum(1) * (a * a).sum())
        corr = (b @ a) / np.where(denom > 0, denom, np.inf)
        k = int(np.argmax(corr))
        return k if corr[k] >= self.t.template_correlation else None


def _inner(rows: slice) -> slice:
    return slice(rows.start + 1, rows.stop - 1)


def agreement(read: dict, expected: dict, keys=("colour", "shape")) -> bool:
    return all(read.get(k) == expected.get(k) for k in keys)
