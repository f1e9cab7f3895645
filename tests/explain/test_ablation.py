import numpy as np
import pytest
import torch

from diffmem.core import denoise
from diffmem.detect import NoiseNormDetector
from diffmem.explain import TokenAblation


def test_ablation_is_the_score_drop(tiny_pipe):
    res = TokenAblation(tiny_pipe, num_inference_steps=4, mode="remove").attribute("a red circle")
    det = NoiseNormDetector(tiny_pipe, num_inference_steps=4)
    s = det.score(["a red circle", "red circle", "a circle", "a red"]).scores
    np.testing.assert_allclose(res.word_scores, s[0] - s[1:], rtol=1e-6)
    assert res.settings["mode"] == "remove"


def test_masked_ablation_zeroes_one_words_token_embeddings(tiny_pipe):
    prompt = "a red circle"
    ablation = TokenAblation(tiny_pipe, num_inference_steps=4, steps=[0, 1], generations=2)
    res = ablation.attribute(prompt)
    assert res.settings["mode"] == "mask" and res.detection_score > 0
    det = NoiseNormDetector(tiny_pipe, num_inference_steps=4, steps=[0, 1], generations=2)
    ids = denoise.tokenize(tiny_pipe, [prompt])
    # independent of the hook the ablation uses: a spare vocabulary row set to zero, and the word's
    # tokens replaced by that row's id in a plain text-encoder call
    table = tiny_pipe.text_encoder.get_input_embeddings().weight
    spare = next(i for i in range(1000, table.shape[0]) if i not in ids[0].tolist())
    saved_row = table.data[spare].clone()
    expected, hiddens = [], []
    try:
        table.data[spare] = 0
        for w in range(len(res.words)):
            masked_ids = ids.clone()
            masked_ids[0, 1 + np.flatnonzero(np.asarray(res.word_of_token) == w)] = spare
            with torch.no_grad():
                hidden = tiny_pipe.text_encoder(masked_ids)[0]
            expected.append(det.score_embeddings(hidden).mean())
            hiddens.append(hidden)
    finally:
        table.data[spare] = saved_row
    # the embeddings it scores, handed out for generation: the prompt's own first, then one per word
    masked = ablation.masked_embeddings(prompt)
    assert masked.shape[0] == 1 + len(res.words)
    torch.testing.assert_close(masked[:1], denoise.encode_text(tiny_pipe, [prompt]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked[1:], torch.cat(hiddens), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.word_scores, res.detection_score - np.array(expected), rtol=1e-5, atol=1e-7)
    # the unmasked prompt scores as the detector scores its text
    assert res.detection_score == pytest.approx(float(det.score([prompt]).scores[0]), rel=1e-5)  # fp32: batch composition moves the last digits


def test_empty_prompt_and_bad_mode(tiny_pipe):
    from diffmem.core.errors import InputError

    with pytest.raises(InputError, match="empty"):
        TokenAblation(tiny_pipe, num_inference_steps=4).attribute("  ")
    with pytest.raises(InputError, match="has no words to rank"):
        TokenAblation(tiny_pipe, num_inference_steps=4).attribute("<|endoftext|>")
    with pytest.raises(InputError, match="mode must be"):
        TokenAblation(tiny_pipe, num_inference_steps=4, mode="drop")


@pytest.mark.parametrize("explainer", ["attribution", "ablation_mask", "ablation_remove"])
def test_an_overlong_prompt_is_warned_of_once(tiny_pipe, explainer, tmp_path):
    import warnings

    from diffmem.explain import TokenAttribution
    from diffmem.explain.result import TRUNCATED_MARK

    made = {"attribution": lambda: TokenAttribution(tiny_pipe, num_inference_steps=4),
            "ablation_mask": lambda: TokenAblation(tiny_pipe, num_inference_steps=4),
            "ablation_remove": lambda: TokenAblation(tiny_pipe, num_inference_steps=4, mode="remove")}[explainer]()
    prompt = " ".join(f"w{i}" for i in range(60))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = made.attribute(prompt)
    said = [w for w in caught if issubclass(w.category, denoise.PromptTruncationWarning)]
    assert len(said) == 1 and repr(prompt[:80]) in str(said[0].message)
    assert len(res.tokens) == 75  # the explanation covers what the model reads: 77 less BOS and EOS
    assert res.truncated is True and made.attribute("w1 w2").truncated is False
    # every display says the prompt was cut where the explanation stops
    assert str(res.to_rich()).endswith(TRUNCATED_MARK) and res.to_html().count(TRUNCATED_MARK) == 1

    from PIL import Image

    from diffmem.explain.result import PLOT_MAX_WIDTH

    with Image.open(res.plot(tmp_path / "long.png")) as im:  # 75 bars, not a page-wide strip
        assert 1000 < im.width <= PLOT_MAX_WIDTH * 120
