"""The CLIP paths (CLIPScore, CLIP zero-shot features) on a tiny random CLIP saved locally: wiring,
shapes, batching and errors. Real CLIP weights cannot be downloaded here."""

import numpy as np
import pytest
import torch

from diffmem.core.errors import InputError


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)


def test_clip_score_equals_the_model_own_similarity(tiny_clip_dir):
    from transformers import CLIPModel

    from diffmem.mitigate.measures import CLIPScore

    score = CLIPScore(tiny_clip_dir)
    imgs, prompts = _images(3), ["a red circle", "a photo of a dog", "snow"]
    ours = score(imgs, prompts)
    assert ours.shape == (3,) and np.all(np.abs(ours) <= 1 + 1e-6)
    # the same numbers from the model's own forward: logits_per_image / logit_scale, on the diagonal
    x = torch.nn.functional.interpolate(torch.tensor(imgs).permute(0, 3, 1, 2).float() / 255, size=(32, 32),
                                        mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = score.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=(x - mean) / std, **tok)
    ref = (out.logits_per_image / model.logit_scale.exp()).diagonal().detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_clip_zero_shot_features_batch_and_margin(tiny_clip_dir):
    from diffmem.categorize.extractors import CLIPZeroShotExtractor

    vocab = {"stamp": "a small square stamp in the corner", "frame": "a thin border", "snow": "white snow on the ground"}
    imgs = _images(5, seed=1)
    one = CLIPZeroShotExtractor(str(tiny_clip_dir), vocab, batch_size=1)(imgs)
    many = CLIPZeroShotExtractor(str(tiny_clip_dir), vocab, batch_size=4)(imgs)
    assert len(one) == 5 and one == many  # batching does not change what is read
    assert all(f <= set(vocab) for f in one)
    assert CLIPZeroShotExtractor(str(tiny_clip_dir), vocab, margin=2.0)(imgs) == [set()] * 5  # p - 0.5 <= 0.5 < 1


def test_clip_bad_paths_and_vocabulary(tmp_path, tiny_clip_dir):
    from diffmem.categorize.extractors import CLIPZeroShotExtractor
    from diffmem.mitigate.measures import CLIPScore

    with pytest.raises(InputError, match="not found or incomplete"):
        CLIPScore(tmp_path / "nowhere")
    with pytest.raises(InputError, match="non-empty"):
        CLIPZeroShotExtractor(str(tiny_clip_dir), {})


def test_clip_weights_only_as_pickle_are_refused_not_unpickled(tmp_path, tiny_clip_dir):
    """A folder with config.json and pytorch_model.bin but no model.safetensors: transformers' OSError
    reached the user as a traceback; it is a one-line input error, and the pickle is never loaded."""
    import shutil

    from diffmem.mitigate.measures import CLIPScore

    folder = tmp_path / "clip-bin"
    shutil.copytree(tiny_clip_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="not a transformers CLIP model with safetensors weights"):
        CLIPScore(folder)


def test_clip_score_needs_one_prompt_per_image(tiny_clip_dir):
    from diffmem.mitigate.measures import CLIPScore

    score = CLIPScore(tiny_clip_dir)
    with pytest.raises(InputError, match="3 image\\(s\\) and 2 prompt"):
        score(_images(3), ["a", "b"])
    assert score(_images(1)[0], "a red circle").shape == (1,)
