import numpy as np
import pytest
import torch

from diffmem.core import denoise
from diffmem.core.errors import InputError
from diffmem.explain import AttributionResult, TokenAblation, TokenAttribution
from diffmem.explain.attribution import prompt_tokens


def test_words_merge_bpe_pieces(tiny_pipe):
    tokens, word_of, words = prompt_tokens(tiny_pipe, "A Velvet harbor, unbelievably")
    assert words[0] == "a" and "velvet" in words and "unbelievably" in words
    assert len(tokens) == len(word_of) and max(word_of) == len(words) - 1


def test_gradient_matches_finite_differences(tiny_pipe):
    """The attribution is the gradient of the first-step loss with respect to the embeddings."""
    pipe = tiny_pipe
    prompt = "a red circle"
    res = TokenAttribution(pipe, num_inference_steps=4, steps=[0]).attribute(prompt)
    with torch.no_grad():
        emb = denoise.encode_text(pipe, [prompt]).double()
        uncond = denoise.encode_text(pipe, [""]).double()
    sched = denoise.fresh_scheduler(pipe, 4)
    t = sched.timesteps[0]
    x = denoise.initial_latents(pipe, 0, 1).double()  # drawn in float32, as the attribution draws it
    pipe.unet.double()
    try:

        def loss(e):
            with torch.no_grad():
                return float((pipe.unet(x, t, encoder_hidden_states=e).sample - pipe.unet(x, t, encoder_hidden_states=uncond).sample).norm())

        pos = 2  # the token "red"
        g = np.zeros(emb.shape[-1])
        h = 1e-5
        for k in range(emb.shape[-1]):
            e1, e2 = emb.clone(), emb.clone()
            e1[0, pos, k] += h
            e2[0, pos, k] -= h
            g[k] = (loss(e1) - loss(e2)) / (2 * h)
    finally:
        pipe.unet.float()
    assert res.token_scores[pos - 1] == pytest.approx(np.linalg.norm(g), rel=1e-3)


def test_ablation_is_the_score_drop(tiny_pipe):
    from diffmem.detect import NoiseNormDetector

    res = TokenAblation(tiny_pipe, num_inference_steps=4).attribute("a red circle")
    det = NoiseNormDetector(tiny_pipe, num_inference_steps=4)
    s = det.score(["a red circle", "red circle", "a circle", "a red"]).scores
    np.testing.assert_allclose(res.word_scores, s[0] - s[1:], rtol=1e-6)


def test_result_shows_and_round_trips(tiny_pipe, tmp_path):
    res = TokenAttribution(tiny_pipe, num_inference_steps=4, steps=[0, 1], generations=2).attribute("<script>alert(1)</script> cat")
    html_fragment = res.to_html()
    assert "<script" not in html_fragment and "&lt;</span>" in html_fragment  # each word its own escaped span
    import html
    import re

    text = html.unescape(re.sub(r"<[^>]+>", "", html_fragment))
    assert text == res.prompt  # the user's own text, shaded word by word
    assert res.plot(tmp_path / "a.png").stat().st_size > 1000
    assert str(res.to_rich()) == res.prompt
    back = AttributionResult.load(res.save(tmp_path / "a.json"))
    np.testing.assert_allclose(back.word_scores, res.word_scores)
    assert back.seeds == [0, 1] and back.settings["steps"] == [0, 1]


def test_empty_prompt(tiny_pipe):
    with pytest.raises(InputError, match="empty"):
        TokenAttribution(tiny_pipe, num_inference_steps=4).attribute("  ")
