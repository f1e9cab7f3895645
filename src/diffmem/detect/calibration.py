"""Calibration: a decision threshold from prompts known to be non-memorized.

The threshold is the (1 - fpr) quantile of the reference scores (the "higher" empirical
quantile), so at most ``fpr`` of the reference prompts score above it. A calibration records the
model's identity and the detector's settings; applying it to scores from another model or other
settings is an error, never a silent mismatch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.loading import model_name
from ..core.results import dump_json
from .noise_norm import DetectionResult

# settings that do not change a score: they may differ between calibration and use
_NEUTRAL_SETTINGS = {"batch_size"}


class CalibrationMismatch(InputError):
    pass


@dataclass
class Calibration:
    threshold: float
    fpr: float
    n_reference: int
    method: str
    settings: dict
    model: dict
    reference_quantiles: dict

    @classmethod
    def fit(cls, reference: DetectionResult | np.ndarray, fpr: float = 0.01, method: str | None = None,
            settings: dict | None = None, model: dict | None = None) -> "Calibration":
        if not 0 < fpr < 1:
            raise InputError(f"fpr must lie in (0, 1), got {fpr}")
        if isinstance(reference, DetectionResult):
            scores = np.asarray(reference.scores, float)
            method, settings, model = reference.method, reference.settings, reference.model
        else:
            scores = np.asarray(reference, float)
        if scores.size == 0:
            raise InputError("no reference scores to calibrate on")
        if not np.isfinite(scores).all():
            raise InputError("reference scores contain NaN or inf")
        if scores.size < 1 / fpr:
            import warnings

            warnings.warn(f"{scores.size} reference prompts cannot resolve a false-positive rate of {fpr}: "
                          f"the threshold is the maximum reference score", stacklevel=2)
        thr = float(np.quantile(scores, 1 - fpr, method="higher"))
        q = {str(k): float(np.quantile(scores, k)) for k in (0.5, 0.9, 0.99)}
        return cls(thr, fpr, int(scores.size), method or "unknown", dict(settings or {}), dict(model or {}), q)

    def check(self, result: DetectionResult) -> None:
        problems = []
        if result.method != self.method:
            problems.append(f"method {result.method!r} vs calibrated {self.method!r}")
        a = {k: v for k, v in result.settings.items() if k not in _NEUTRAL_SETTINGS}
        b = {k: v for k, v in self.settings.items() if k not in _NEUTRAL_SETTINGS}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                problems.append(f"setting {k}={a.get(k)!r} vs calibrated {b.get(k)!r}")
        if (wrong := self.model_mismatch(result.model)) is not None:
            problems.append(wrong)
        if problems:
            raise CalibrationMismatch("calibration does not apply to these scores: " + "; ".join(problems))

    def model_mismatch(self, model: dict) -> str | None:
        """Why scores from ``model`` (a model_identity dict) do not fit this calibration, or None."""
        # every calibration holds unet_hash (the UNet's first tensors); those saved since diffmem
        # fingerprinted all of the UNet's and the text encoder's weights hold those too
        for key, part in (("unet_hash", "UNet"), ("unet_weights", "UNet"), ("text_encoder_weights", "text encoder")):
            if self.model.get(key) and model.get(key) != self.model[key]:
                return (f"model {model_name(model)} is not the calibrated model "
                        f"{model_name(self.model)} (different {part} weights)")
        # calibrations saved before identities held the sampler apply with any
        if self.model.get("sampler") and model.get("sampler") != self.model["sampler"]:
            return f"these scores come from the sampler {model.get('sampler')}, the calibration's from {self.model['sampler']}"
        if self.model.get("sampler_config") and model.get("sampler_config") != self.model["sampler_config"]:
            return (f"these scores come from another configuration of the sampler {model.get('sampler')} "
                    "(its timestep spacing, schedule or order) than the calibration's")
        return None

    def apply(self, result: DetectionResult) -> DetectionResult:
        self.check(result)
        return replace(result, threshold=self.threshold, calibration={"fpr": self.fpr, "n_reference": self.n_reference,
                                                                      "threshold": self.threshold})

    def save(self, path: str | Path) -> Path:
        dump_json(asdict(self), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.exists():
            raise InputError(f"calibration file not found: {path}")
        not_one = f"{path} is not a diffmem calibration file"
        how = "(`diffmem detect --calibrate-with REFERENCE --out r.parquet` writes r.calibration.json)"
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{not_one}: not JSON ({e}) {how}") from None
        if not isinstance(d, dict):
            raise InputError(f"{not_one}: it holds a JSON {type(d).__name__}, not an object {how}")
        names = [f.name for f in fields(cls)]
        if missing := [n for n in names if n not in d]:
            raise InputError(f"{not_one}: it lacks {', '.join(missing)} {how}")
        # a hand-edited or corrupted threshold would flag everything or nothing without a word
        if not isinstance(d["threshold"], (int, float)) or not np.isfinite(d["threshold"]):
            raise InputError(f"{path}: the threshold must be a finite number, got {d['threshold']!r}")
        if not isinstance(d["fpr"], (int, float)) or not 0 < d["fpr"] < 1:
            raise InputError(f"{path}: fpr must lie in (0, 1), got {d['fpr']!r}")
        return cls(**{n: d[n] for n in names})
