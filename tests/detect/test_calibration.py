import numpy as np
import pytest
import torch

from diffmem.detect import Calibration, CalibrationMismatch, NoiseNormDetector

PROMPTS = ["a cat", "a dog", "a red circle", "a blue square"]


def test_threshold_keeps_the_false_positive_rate():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=1000)
    cal = Calibration.fit(ref, fpr=0.01)
    assert (ref > cal.threshold).mean() <= 0.01
    assert (ref > cal.threshold).mean() >= 0.009  # and not far below it
    fresh = rng.normal(size=20000)
    assert abs((fresh > cal.threshold).mean() - 0.01) < 0.005


def test_applies_to_same_model_and_settings_only(tiny_pipe, tmp_path):
    det = NoiseNormDetector(tiny_pipe, num_inference_steps=4)
    ref = det.score(PROMPTS)
    cal = Calibration.fit(ref, fpr=0.25)
    out = Calibration.load(cal.save(tmp_path / "cal.json")).apply(det.score(PROMPTS))
    assert list(out.to_frame()["verdict"]) == list(np.where(out.scores > cal.threshold, "memorized", "not memorized"))
    # other settings: refused, with the reason
    with pytest.raises(CalibrationMismatch, match="num_inference_steps"):
        cal.apply(NoiseNormDetector(tiny_pipe, num_inference_steps=5).score(PROMPTS))
    # batch size does not change scores: allowed
    cal.apply(NoiseNormDetector(tiny_pipe, num_inference_steps=4, batch_size=1).score(PROMPTS))


def test_other_model_is_refused(tiny_pipe):
    from diffmem.core.components import tiny_pipeline

    other = tiny_pipeline(seed=7)
    cal = Calibration.fit(NoiseNormDetector(tiny_pipe, num_inference_steps=4).score(PROMPTS), fpr=0.25)
    with pytest.raises(CalibrationMismatch, match="different UNet weights"):
        cal.apply(NoiseNormDetector(other, num_inference_steps=4).score(PROMPTS))


def test_a_model_with_another_text_encoder_or_attention_is_refused(tiny_pipe):
    # the same first UNet tensors (all that calibrations compared) with other attention or text-encoder
    # weights: scores differ, so the calibration must not judge them
    import copy

    base = NoiseNormDetector(tiny_pipe, num_inference_steps=4).score(PROMPTS)
    cal = Calibration.fit(base, fpr=0.25)
    for part, module in (("text encoder", "text_encoder"), ("UNet", "unet")):
        changed = type(tiny_pipe)(**{**tiny_pipe.components, module: copy.deepcopy(getattr(tiny_pipe, module))})
        with torch.no_grad():
            for name, weight in getattr(changed, module).named_parameters():
                if "attn" in name or "self_attn" in name:
                    weight.mul_(1.05)
        scores = NoiseNormDetector(changed, num_inference_steps=4).score(PROMPTS)
        assert not np.allclose(scores.scores, base.scores)
        with pytest.raises(CalibrationMismatch, match=f"different {part} weights"):
            cal.apply(scores)
        # a calibration saved before identities fingerprinted every weight is checked as it was
        old = Calibration(**{**cal.__dict__, "model": {k: v for k, v in cal.model.items() if not k.endswith("_weights")}})
        old.apply(scores)


def test_scores_from_another_sampler_are_refused(tiny_pipe, tiny_pipe_with):
    # the same weights with a swapped sampler score otherwise past the first step (and at it for
    # Euler-type samplers): a calibration taken with one does not judge the other's scores
    cal = Calibration.fit(NoiseNormDetector(tiny_pipe, num_inference_steps=4, steps=[0, 1]).score(PROMPTS), fpr=0.25)
    euler = tiny_pipe_with("EulerDiscreteScheduler")
    with pytest.raises(CalibrationMismatch, match="from the sampler EulerDiscreteScheduler, the calibration's from DDIMScheduler"):
        cal.apply(NoiseNormDetector(euler, num_inference_steps=4, steps=[0, 1]).score(PROMPTS))
    trailing = tiny_pipe_with("DDIMScheduler", timestep_spacing="trailing")
    with pytest.raises(CalibrationMismatch, match="another configuration of the sampler DDIMScheduler"):
        cal.apply(NoiseNormDetector(trailing, num_inference_steps=4, steps=[0, 1]).score(PROMPTS))
    cal.apply(NoiseNormDetector(tiny_pipe_with("DDIMScheduler"), num_inference_steps=4, steps=[0, 1]).score(PROMPTS))
    # a calibration saved before identities held the sampler applies with any
    old = Calibration(**{**cal.__dict__, "model": {k: v for k, v in cal.model.items() if not k.startswith("sampler")}})
    old.apply(NoiseNormDetector(euler, num_inference_steps=4, steps=[0, 1]).score(PROMPTS))


def test_bad_reference():
    with pytest.raises(ValueError, match="NaN"):
        Calibration.fit(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="no reference"):
        Calibration.fit(np.array([]))


def test_a_bad_calibration_file_says_what_is_wrong(tmp_path):
    import json

    from diffmem.core.errors import InputError

    good = Calibration.fit(np.linspace(0, 1, 200), fpr=0.01).save(tmp_path / "good.json")
    d = json.loads(good.read_text())
    cases = {
        "garbage": ("not JSON", "garbage"),
        "list": ("a JSON list, not an object", json.dumps([1, 2])),
        "missing": ("it lacks fpr, n_reference", json.dumps({"threshold": 0.5})),
        "nan": ("the threshold must be a finite number, got nan", json.dumps({**d, "threshold": float("nan")})),
        "text": ("the threshold must be a finite number, got 'high'", json.dumps({**d, "threshold": "high"})),
        "fpr": ("fpr must lie in", json.dumps({**d, "fpr": 5})),
    }
    for name, (says, text) in cases.items():
        f = tmp_path / f"{name}.json"
        f.write_text(text)
        with pytest.raises(InputError, match=says):
            Calibration.load(f)
    # a newer file with a field this version does not know still loads
    (tmp_path / "newer.json").write_text(json.dumps({**d, "added_later": 1}))
    assert Calibration.load(tmp_path / "newer.json") == Calibration.load(good)
