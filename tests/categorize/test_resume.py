import numpy as np
import pytest

from diffmem.categorize import MemorizationProfiler
from diffmem.categorize.profiler import extractor_identity
from diffmem.core.errors import InputError

PROMPTS = ["a red circle", "a snow scene", "a blue square at night", "a cat", "an old map"]


class BrightnessExtractor:
    """Features from image statistics: deterministic, cheap, and different from image to image."""

    name = "brightness"

    def __init__(self, cut: float = 0.5):
        self.cut = cut

    def __call__(self, images):
        return [{"bright" if float(np.asarray(im).mean()) > self.cut else "dark", "frame"} for im in images]

    def describe(self, f):
        return f


def profiler(pipe, **kw):
    return MemorizationProfiler(pipe, kw.pop("extractor", BrightnessExtractor()), n=3, control_prompts=["x", "y", "z"],
                                num_inference_steps=2, **kw)


def counting(prof, fail_on=None):
    """Record which prompt lists are generated; raise on one to stand for a killed run."""
    calls, orig = [], prof._features

    def features(prompts, progress):
        if fail_on in prompts:
            raise KeyboardInterrupt
        calls.append(list(prompts))
        return orig(prompts, progress)

    prof._features = features
    return calls


def test_a_killed_profile_resumes_and_equals_an_uninterrupted_one(tiny_pipe, tmp_path):
    ckpt = tmp_path / "parts"
    first = profiler(tiny_pipe)
    counting(first, fail_on=PROMPTS[4])
    with pytest.raises(KeyboardInterrupt):
        first.profile(PROMPTS, checkpoint=ckpt, part_size=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["control_0000", "part_0000", "part_0001"]

    again = profiler(tiny_pipe)
    calls = counting(again)
    resumed = again.profile(PROMPTS, checkpoint=ckpt, part_size=2)
    assert calls == [PROMPTS[4:]]  # the controls and the first two parts were read back
    straight = profiler(tiny_pipe).profile(PROMPTS, checkpoint=tmp_path / "other", part_size=2)
    assert resumed.rows == straight.rows and resumed.image_features == straight.image_features
    np.testing.assert_array_equal(resumed.images, straight.images)
    # without a checkpoint (one generation batch): the same features
    plain = profiler(tiny_pipe).profile(PROMPTS)
    assert plain.image_features == straight.image_features
    # one batch against parts of two: float differences of 1e-6 may round a pixel to the next grey level
    np.testing.assert_allclose(plain.images.astype(int), straight.images.astype(int), atol=1)


def test_generations_are_kept_as_uint8_and_the_controls_images_not_at_all(tiny_pipe, tmp_path):
    # float32 copies of every generation: about 50 MB a prompt at 512 x 512 with 16 seeds, four times the
    # uint8 a PNG holds; the controls' images were saved too, though only their features are read
    from diffmem.core.generate import generate

    prof = profiler(tiny_pipe)
    res = prof.profile(PROMPTS[:2], checkpoint=tmp_path / "parts")
    assert res.images.dtype == np.uint8
    floats = generate(tiny_pipe, PROMPTS[:2], prof.seeds(), 2, prof.settings["guidance_scale"])
    np.testing.assert_array_equal(res.images, np.rint(floats * 255).astype(np.uint8))
    assert not (tmp_path / "parts" / "control_0000" / "images.npz").exists()
    assert (tmp_path / "parts" / "control_0000" / "features.json").exists()
    # a part saved before, with float32 images, reads back as the same uint8
    part = tmp_path / "parts" / "part_0000"
    np.savez_compressed(part / "images.npz", images=floats)
    again = profiler(tiny_pipe)
    calls = counting(again)
    back = again.profile(PROMPTS[:2], checkpoint=tmp_path / "parts")
    assert calls == [] and back.images.dtype == np.uint8
    np.testing.assert_array_equal(back.images, res.images)
    assert profiler(tiny_pipe).profile(PROMPTS[:1]).images.dtype == np.uint8  # without a checkpoint too


def test_only_a_new_tau_reuses_the_saved_generations(tiny_pipe, tmp_path):
    ckpt = tmp_path / "parts"
    profiler(tiny_pipe).profile(PROMPTS[:2], checkpoint=ckpt)
    other_tau = profiler(tiny_pipe, tau=0.6)
    calls = counting(other_tau)
    other_tau.profile(PROMPTS[:2], checkpoint=ckpt)
    assert calls == []
    marker = (ckpt / "part_0000" / "done.json").read_bytes()
    for changed in (profiler(tiny_pipe, seed=5), profiler(tiny_pipe, extractor=BrightnessExtractor(cut=0.3))):
        calls = counting(changed)
        with pytest.raises(InputError, match="other prompts, settings, extractor or another model"):
            changed.profile(PROMPTS[:2], checkpoint=ckpt)
        assert calls == [] and (ckpt / "part_0000" / "done.json").read_bytes() == marker
    restarted = profiler(tiny_pipe, seed=5)
    calls = counting(restarted)
    restarted.profile(PROMPTS[:2], checkpoint=ckpt, stale="restart")
    assert calls == [["x", "y", "z"], PROMPTS[:2]]


@pytest.mark.parametrize("changed", ["profiler", "extractor"])
def test_generations_of_another_revision_of_the_profiler_or_extractor_are_not_reused(tiny_pipe, tmp_path, monkeypatch,
                                                                                      changed):
    # a later diffmem whose generations or features differ for the same settings must not read back
    # an earlier one's parts: a profile would count features of two versions
    from doubles import bump_revision

    ckpt = tmp_path / "parts"
    profiler(tiny_pipe).profile(PROMPTS[:2], checkpoint=ckpt)
    marker = (ckpt / "part_0000" / "done.json").read_bytes()
    bump_revision(monkeypatch, MemorizationProfiler if changed == "profiler" else BrightnessExtractor)
    later = profiler(tiny_pipe)
    calls = counting(later)
    with pytest.raises(InputError, match="another diffmem's version of the profiler or extractor"):
        later.profile(PROMPTS[:2], checkpoint=ckpt)
    assert calls == [] and (ckpt / "part_0000" / "done.json").read_bytes() == marker
    later.profile(PROMPTS[:2], checkpoint=ckpt, stale="restart")
    assert calls == [["x", "y", "z"], PROMPTS[:2]]


def test_extractor_identity_keeps_settings_not_secrets():
    class Chatty:
        name = "chat"

        def __init__(self):
            self.model, self.vocabulary, self.api_key, self.session = "gpt-4o", {"a": "an a"}, "sk-secret", object()

    ident = extractor_identity(Chatty())
    assert ident == {"name": "chat", "model": "gpt-4o", "vocabulary": {"a": "an a"}}
