"""Per-row features computed shard by shard (the resumable pass of a scan).

Everything a check needs from a row is reduced here to a few compact columns, so the global
pass (clusters, groups, phrases) holds features, never images:

- ``caption_norm``: the caption lower-cased, NFKC-normalized, punctuation removed, spaces collapsed;
- ``caption_truncated``: the caption as CLIP sees it after its 77-token truncation (set only for
  captions that are truncated);
- ``phash``: imagehash's 64-bit DCT perceptual hash, for exact and near-exact copies;
- ``thumb``: a 32x32 RGB thumbnail (uint8, 3 KB), the built-in representation for looser copies:
  candidates come from its cosine neighbours, links from ``informative_agreement``. It needs no
  downloaded weights; a local embedding model can add its own links.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

_PUNCT = re.compile(r"[^\w\s]+", re.UNICODE)
_SPACE = re.compile(r"\s+")
THUMB = 32


def normalize_caption(text: str | None) -> str | None:
    if text is None:
        return None
    t = unicodedata.normalize("NFKC", text).lower()
    t = _PUNCT.sub(" ", t)
    return _SPACE.sub(" ", t).strip()


class TruncationKeys:
    """What CLIP's text encoder sees of each caption: its first 75 content tokens."""

    def __init__(self, tokenizer=None, max_length: int = 77):
        if tokenizer is None:
            from ..core.tokenizer import clip_tokenizer

            tokenizer = clip_tokenizer(max_length)
        self.tok = tokenizer
        self.content = max_length - 2  # BOS and EOS

    def __call__(self, captions: list[str | None]) -> list[str | None]:
        out: list[str | None] = [None] * len(captions)
        # a caption shorter than the token budget in characters cannot be truncated: every token
        # covers at least one non-space character; only the rest go through the tokenizer
        idx = [i for i, c in enumerate(captions) if c and len(c.replace(" ", "")) > self.content]
        if not idx:
            return out
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "longer than the maximum" warning is the point here
        try:
            enc = self.tok([captions[i] for i in idx], add_special_tokens=False, truncation=False)["input_ids"]
        finally:
            hf_logging.set_verbosity(level)
        for i, ids in zip(idx, enc):
            if len(ids) > self.content:
                out[i] = self.tok.decode(ids[: self.content])
        return out


def phash64(image: np.ndarray) -> int:
    """imagehash's perceptual hash as a signed 64-bit integer (for Parquet)."""
    import imagehash
    from PIL import Image

    im = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    bits = imagehash.phash(im, hash_size=8).hash.flatten()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return value - (1 << 64) if value >= 1 << 63 else value


def thumbnail(image: np.ndarray, size: int = THUMB) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray((np.clip(image[..., :3], 0, 1) * 255).round().astype(np.uint8))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BOX)
    return np.asarray(im, np.uint8)


def flat_pixels(thumbs: np.ndarray, eps: float = 0.01) -> np.ndarray:
    """(N, S*S*3) bool: pixels with no luminance change within their 3x3 neighbourhood.

    Flat regions (clipped highlights and shadows, blank studio backgrounds) agree between
    unrelated images; counting them made random MemLab images look like copies."""
    from scipy import ndimage

    luma = thumbs.astype(np.float32).mean(-1) / 255.0
    gy = np.abs(np.diff(luma, axis=1, append=luma[:, -1:]))
    gx = np.abs(np.diff(luma, axis=2, append=luma[:, :, -1:]))
    grad = ndimage.maximum_filter(np.maximum(gx, gy), size=(1, 3, 3))
    return np.repeat((grad < eps)[..., None], thumbs.shape[-1], axis=-1).reshape(len(thumbs), -1)


def informative_agreement(a: np.ndarray, b: np.ndarray, flat_a: np.ndarray, flat_b: np.ndarray,
                          tol: float = 0.02) -> np.ndarray:
    """Row-wise share of pixels equal within ``tol`` (of full scale) among pixels not flat in both.

    Two images that share a layout under a changed object agree on most pixels; two unrelated
    images agree only by chance. Rows are flattened uint8 thumbnails. Where both images are flat
    all over (blank images), their colours are all there is to compare: the share of all pixels."""
    both_flat = flat_a & flat_b
    close = _close(a, b, tol)
    informative = (~both_flat).sum(1)
    return np.where(informative > 0, (close & ~both_flat).sum(1) / np.maximum(informative, 1), close.mean(1))


def pixel_agreement(a: np.ndarray, b: np.ndarray, tol: float = 0.02) -> np.ndarray:
    """Row-wise share of all pixels equal within ``tol`` (of full scale); rows as above."""
    return _close(a, b, tol).mean(1)


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)) <= round(tol * 255)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = np.bitwise_xor(a.view(np.uint64), b.view(np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
