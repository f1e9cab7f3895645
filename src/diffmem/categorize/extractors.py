"""Feature extractors behind one interface: ``extractor(images) -> list[set[str]]``.

A feature is a short string: ``"colour:red"`` for a categorical reading, ``"stamp"`` for a
present/absent one. ``describe(feature)`` gives the words a prompt would use to name it, which is
what explicit-matching and sentence-embedding expectations compare against.

- ``MemLabExtractor``: MemLab's attribute reader (the ground truth, used for the bars).
- ``CLIPZeroShotExtractor``: a local transformers CLIP; a feature is present when its prompt
  ("a photo with {description}") beats its negation by ``margin`` in CLIP's softmax.
- ``ChatExtractor``: an OpenAI-compatible chat endpoint (base URL + key from the environment),
  asked one yes/no question per candidate feature, as the paper used GPT-4.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ..core.errors import InputError


class FeatureExtractor(Protocol):
    name: str
    # optional: ``revision`` (an int, 1 when absent), bumped when the features change for the same
    # settings so that parts saved with the earlier features are not read back

    def __call__(self, images) -> list[set[str]]: ...

    def describe(self, feature: str) -> str: ...

    def features(self) -> set[str]:
        """Every feature it can report: an expectation map naming another is refused, as it could
        never match. Optional: an extractor without it is not checked."""
        ...


# -- MemLab ----------------------------------------------------------------------------------
MEMLAB_DESCRIPTIONS = {
    "white_ground": "white ground",
    "sand_ground": "sand-coloured ground",
    "dark_sky": "a dark sky",
    "stamp": "a text label in the corner",
    "vignette": "black corners",
    "frame": "a dark frame around the image",
}


class MemLabExtractor:
    name = "memlab_reader"
    # bumped when the extractor gives other features for the same settings: saved parts of an earlier
    # diffmem's version are then refused or redone, never joined to this one's (core.results.revision_key)
    revision = 1

    def __init__(self):
        from ..memlab.reader import AttributeReader

        self.reader = AttributeReader()

    def __call__(self, images) -> list[set[str]]:
        out = []
        for r in self.reader.read_many(images):
            feats = {f"{k}:{r[k]}" for k in ("colour", "shape", "position") if r[k] is not None}
            feats |= {k for k in MEMLAB_DESCRIPTIONS if r[k]}
            if r["template"] is not None:
                feats.add(f"template:{r['template']}")
            out.append(feats)
        return out

    def describe(self, feature: str) -> str:
        if ":" in feature:
            kind, value = feature.split(":", 1)
            if kind == "template":
                return "a striped layout"  # neutral: the trigger phrase must not make it "named"
            return value
        return MEMLAB_DESCRIPTIONS.get(feature, feature.replace("_", " "))

    def features(self) -> set[str]:
        from ..memlab import world

        return ({f"colour:{c}" for c in world.COLOURS} | {f"shape:{s}" for s in world.SHAPES}
                | {f"position:{p}" for p in world.POSITIONS} | set(MEMLAB_DESCRIPTIONS)
                | {f"template:{i}" for i in range(len(world.TRIGGER_FIRST))})


class _VocabularyFeatures:
    """For extractors that test each feature of a vocabulary {feature: description}."""

    vocabulary: dict[str, str]
    revision = 1  # as MemLabExtractor's; a subclass whose features change sets its own

    @staticmethod
    def _checked(vocabulary, extractor: str) -> dict[str, str]:
        """The vocabulary, refused when empty or when a name or description is not text: a missing
        description would be asked about as "None"."""
        if not vocabulary:
            raise InputError(f"{extractor} needs a non-empty feature vocabulary")
        if not isinstance(vocabulary, dict):
            raise InputError(f"{extractor}'s vocabulary is a mapping {{feature: description}}, got {type(vocabulary).__name__}")
        for feature, description in vocabulary.items():
            if not (isinstance(feature, str) and feature.strip() and isinstance(description, str) and description.strip()):
                raise InputError(f"{extractor}'s vocabulary needs a feature name and a description, both text, in "
                                 f"every entry; got {feature!r}: {description!r}")
        return dict(vocabulary)

    def describe(self, feature: str) -> str:
        return self.vocabulary.get(feature, feature)

    def features(self) -> set[str]:
        return set(self.vocabulary)


# -- CLIP zero-shot --------------------------------------------------------------------------
class CLIPZeroShotExtractor(_VocabularyFeatures):
    """Candidate features from a vocabulary {feature: description}, read by a local CLIP."""

    name = "clip_zero_shot"

    def __init__(self, path: str, vocabulary: dict[str, str], margin: float = 0.0, batch_size: int = 16):
        vocabulary = self._checked(vocabulary, "CLIP zero-shot")
        from ..mitigate.measures import CLIPScore

        self.path = str(path)  # identifies the extractor in saved work
        self.clip = CLIPScore(path)
        self.vocabulary = dict(vocabulary)
        self.margin = margin
        self.batch_size = batch_size

    def __call__(self, images) -> list[set[str]]:
        import torch

        feats = list(self.vocabulary)
        pos = [f"a photo with {self.vocabulary[f]}" for f in feats]
        neg = [f"a photo without {self.vocabulary[f]}" for f in feats]
        images = np.asarray(images)
        out: list[set[str]] = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            # (B, F) similarities for the feature prompts and their negations
            sp = np.stack([self.clip(chunk, [p] * len(chunk)) for p in pos], axis=1)
            sn = np.stack([self.clip(chunk, [n] * len(chunk)) for n in neg], axis=1)
            scale = float(self.clip.model.logit_scale.detach().exp()) if hasattr(self.clip.model, "logit_scale") else 100.0
            prob = torch.softmax(torch.tensor(np.stack([sp, sn], -1) * scale), dim=-1)[..., 0].numpy()
            for row in prob:
                out.append({f for f, p in zip(feats, row) if p - 0.5 > self.margin / 2})
        return out


# -- a local vision-language model through transformers -------------------------------------
class VLMExtractor(_VocabularyFeatures):
    """Asks a local vision-language model (a transformers image-text-to-text folder such as LLaVA,
    loaded with AutoProcessor / AutoModelForImageTextToText from safetensors) yes/no per candidate
    feature, as the authors' follow-up work did with LLaVA. A feature is present when the model's
    next-token logit for "yes" beats the one for "no" after the question; images are batched per
    question. ``prompt_template`` is the model's own chat format around ``{question}`` and its
    image token (LLaVA 1.5's by default)."""

    name = "vlm"
    QUESTION = "Does this image show {description}? Answer only yes or no."

    def __init__(self, path: str | Path, vocabulary: dict[str, str], batch_size: int = 8,
                 prompt_template: str = "USER: <image>\n{question} ASSISTANT:"):
        vocabulary = self._checked(vocabulary, "the VLM extractor")
        from ..core.loading import check_model_folder, model_folder_errors

        path = check_model_folder(path, "vision-language model")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.path = str(path)  # identifies the extractor in saved work
        with model_folder_errors(path, "a transformers image-text-to-text model with its processor"):
            self.processor = AutoProcessor.from_pretrained(path)
            self.model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True).eval()
        tok = self.processor.tokenizer
        # the first token of each spelling: "yes" / " Yes" tokenize differently across vocabularies
        first = lambda words: sorted({tok.encode(w, add_special_tokens=False)[0] for w in words})  # noqa: E731
        self.yes_ids, self.no_ids = first(["yes", "Yes", " yes", " Yes"]), first(["no", "No", " no", " No"])
        if set(self.yes_ids) & set(self.no_ids):
            raise InputError(f"{path}: the tokenizer does not tell 'yes' from 'no' by their first token")
        self.vocabulary = dict(vocabulary)
        self.batch_size = batch_size
        self.prompt_template = prompt_template

    def answers(self, images, question: str) -> np.ndarray:
        """(B,) yes-minus-no logit margin for each image."""
        import torch
        from PIL import Image

        text = self.prompt_template.format(question=question)
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [Image.fromarray(_uint8(im)) for im in images[i : i + self.batch_size]]
            inputs = self.processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)
            with torch.inference_mode():
                logits = self.model(**inputs).logits
            # every row holds the same text, so the last position is each row's next token
            last = logits[:, -1].float()
            out.append((last[:, self.yes_ids].max(dim=1).values - last[:, self.no_ids].max(dim=1).values).numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def __call__(self, images) -> list[set[str]]:
        images = list(images)
        feats = list(self.vocabulary)
        margins = np.stack([self.answers(images, self.QUESTION.format(description=self.vocabulary[f])) for f in feats], axis=1)
        return [{f for f, m in zip(feats, row) if m > 0} for row in margins]


def _uint8(image) -> np.ndarray:
    arr = np.asarray(image)
    return arr if arr.dtype == np.uint8 else (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


# -- an OpenAI-compatible chat endpoint ------------------------------------------------------
class ChatExtractor(_VocabularyFeatures):
    """Asks an OpenAI-compatible ``/chat/completions`` endpoint yes/no per candidate feature.

    The base URL and key come from the environment (``DIFFMEM_CHAT_BASE_URL``,
    ``DIFFMEM_CHAT_API_KEY``, or OPENAI_BASE_URL / OPENAI_API_KEY); images are sent inline as PNG
    data URLs. Nothing is sent anywhere unless this extractor is built.
    """

    name = "chat"
    QUESTION = "Does this image show {description}? Answer only yes or no."

    def __init__(self, vocabulary: dict[str, str], model: str = "gpt-4o", base_url: str | None = None,
                 api_key: str | None = None, timeout: float = 60.0):
        self.vocabulary = self._checked(vocabulary, "the chat extractor")
        self.model = model
        self.base_url = (base_url or os.environ.get("DIFFMEM_CHAT_BASE_URL") or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
        self.api_key = api_key or os.environ.get("DIFFMEM_CHAT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not self.base_url:
            raise InputError("no chat endpoint: set DIFFMEM_CHAT_BASE_URL (or OPENAI_BASE_URL)")
        if not self.api_key:
            raise InputError("no API key: set DIFFMEM_CHAT_API_KEY (or OPENAI_API_KEY)")
        self.timeout = timeout

    @staticmethod
    def _data_url(image) -> str:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(_uint8(image)).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def _ask(self, image_url: str, question: str) -> bool:
        import urllib.error
        import urllib.request

        body = {"model": self.model, "temperature": 0, "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image_url}}]}]}
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise InputError(f"chat endpoint {self.base_url} answered HTTP {e.code}: {e.read()[:200]!r}") from None
        except (urllib.error.URLError, TimeoutError) as e:
            raise InputError(f"chat endpoint {self.base_url} unreachable: {e}") from None
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"chat endpoint {self.base_url} gave an unexpected reply: {str(reply)[:200]}") from None
        return text.strip().lower().startswith("yes")

    def __call__(self, images) -> list[set[str]]:
        out = []
        for im in images:
            url = self._data_url(im)
            out.append({f for f, d in self.vocabulary.items() if self._ask(url, self.QUESTION.format(description=d))})
        return out


def features_of(extractor, images: Sequence) -> list[set[str]]:
    return extractor(np.asarray(images))
