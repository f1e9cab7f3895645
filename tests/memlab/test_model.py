"""The shipped MemLab model: loads offline both ways, is small, and behaves as its manifest says."""

import pytest

from diffmem.core.loading import load_pipeline, memlab_path
from diffmem.memlab import dataset as ds
from diffmem.memlab.recipe import DEFAULT_SAMPLER


@pytest.fixture(scope="module")
def memlab():
    return load_pipeline("memlab")


def test_loads_with_plain_diffusers_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(memlab_path()))
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]


def test_is_small():
    size = sum(p.stat().st_size for p in memlab_path().rglob("*") if p.is_file())
    assert size < 30 * 2**20


def test_planted_prompts_replicate_and_novel_prompts_generalize(memlab, memlab_manifest):
    """A quick slice of ``memlab verify``: 3 planted and 3 novel prompts, 2 seeds each."""
    from diffmem.core.generate import generate
    from diffmem.memlab.reader import AttributeReader
    from diffmem.memlab.replication import MemLabReplication

    g = memlab_manifest["groups"]
    planted = g["verbatim"][:3]
    novel = g["novel"][:3]
    images = generate(memlab, [e["prompt"] for e in planted + novel], [0, 1], **DEFAULT_SAMPLER)
    rep = MemLabReplication(ds.build(ds.MemLabConfig(**memlab_manifest["config"])), memlab.vae)
    for e, ims in zip(planted, images[:3]):
        assert (rep.ratio_to(ims, e["image_id"]) <= rep.threshold).all(), e["prompt"]
    reader = AttributeReader()
    for e, ims in zip(novel, images[3:]):
        assert not rep.nearest(ims).replicated.any(), e["prompt"]
        for im in ims:
            read = reader.read(im)
            assert (read["colour"], read["shape"]) == (e["expected_features"]["colour"], e["expected_features"]["shape"])


def _scores(memlab, manifest, steps):
    from diffmem.detect import NoiseNormDetector

    pos = ds.prompts(manifest, "verbatim")[:20]
    neg = ds.prompts(manifest, "control")[:20] + ds.prompts(manifest, "novel")[:20]
    det = NoiseNormDetector(memlab, num_inference_steps=DEFAULT_SAMPLER["num_inference_steps"],
                            guidance_scale=DEFAULT_SAMPLER["guidance_scale"], steps=steps)
    s = det.score(pos + neg).scores
    return s[:20], s[20:]


def test_noise_norm_over_all_steps_separates_a_sample(memlab, memlab_manifest):
    from diffmem.memlab.verify import roc_figures

    pos, neg = _scores(memlab, memlab_manifest, range(DEFAULT_SAMPLER["num_inference_steps"]))
    assert roc_figures(pos, neg)["auc"] >= 0.95


def test_first_step_score_separates_a_sample(memlab, memlab_manifest):
    from diffmem.memlab.verify import roc_figures

    pos, neg = _scores(memlab, memlab_manifest, [0])
    assert roc_figures(pos, neg)["auc"] >= 0.95


@pytest.mark.slow
def test_full_verification_passes_every_bar():
    from diffmem.memlab.verify import verify

    res = verify("memlab", progress=False)
    assert res["all_bars_pass"], {k: res[k] for k in res["bars"]}
