"""Training-data tracing: "feature X came with word W in K of M training images".

For a memorized feature and each content word of the prompt: M = training rows whose caption
holds the word, K = those rows whose image shows the feature. The word with the highest K / M
(then the highest K) is named. Rows are training examples (a duplicated image counts each time,
as it did in training); distinct images are reported beside them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .expectations import STOPWORDS, lemma, words


class TrainingTracer:
    def __init__(self, captions: list[str], features: list[set[str]], image_ids: list[int] | None = None):
        if len(captions) != len(features):
            raise ValueError("one feature set per caption")
        self.n = len(captions)
        self.image_ids = np.asarray(image_ids if image_ids is not None else range(self.n))
        self.rows_with_word: dict[str, np.ndarray] = {}
        idx = defaultdict(list)
        for i, c in enumerate(captions):
            for w in {lemma(w) for w in words(c) if w not in STOPWORDS}:
                idx[w].append(i)
        self.rows_with_word = {w: np.asarray(v) for w, v in idx.items()}
        self.has_feature: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(self.n, bool))
        for i, fs in enumerate(features):
            for f in fs:
                self.has_feature[f][i] = True

    @classmethod
    def from_memlab(cls, dataset=None) -> "TrainingTracer":
        """MemLab's training set with each row's features from its scene (the ground truth)."""
        from ..memlab import dataset as ds

        d = dataset or ds.build()
        feats = []
        for r in d.rows:
            f = r.scene.features()
            s = {f"colour:{f['colour']}", f"shape:{f['shape']}", f"position:{f['position']}"}
            s |= {k for k in ("white_ground", "sand_ground", "dark_sky", "stamp", "vignette", "frame") if f[k]}
            if f["template"] is not None:
                s.add(f"template:{f['template']}")
            feats.append(s)
        return cls([r.caption for r in d.rows], feats, [r.image_id for r in d.rows])

    @classmethod
    def from_images(cls, captions: list[str], images, extractor) -> "TrainingTracer":
        return cls(captions, extractor(np.asarray(images)))

    def trace(self, prompt: str, feature: str) -> dict:
        has = self.has_feature.get(feature, np.zeros(self.n, bool))
        cands = []
        for w in dict.fromkeys(lemma(w) for w in words(prompt) if w not in STOPWORDS):
            rows = self.rows_with_word.get(w)
            if rows is None or len(rows) == 0:
                continue
            k = int(has[rows].sum())
            cands.append({"word": w, "count": k, "of": int(len(rows)), "rate": k / len(rows),
                          "images": int(len(np.unique(self.image_ids[rows[has[rows]]])))})
        cands.sort(key=lambda c: (-c["rate"], -c["count"]))
        best = cands[0] if cands else None
        out = {"feature": feature, "feature_rows": int(has.sum()), "word": None, "count": 0, "of": 0, "rate": 0.0,
               "alternatives": cands[1:4]}
        if best:
            out.update(best)
            out["statement"] = (f"{feature} came with {best['word']!r} in {best['count']} of {best['of']} training "
                                f"examples ({best['images']} distinct images)")
        return out
