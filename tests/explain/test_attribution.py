import numpy as np
import pytest
import torch

from diffmem.core import denoise
from diffmem.core.errors import InputError
from diffmem.explain import AttributionResult, TokenAttribution
from diffmem.explain.tokens import prompt_tokens


def test_words_merge_bpe_pieces(tiny_pipe):
    tokens, word_of, words = prompt_tokens(tiny_pipe, "A Velvet harbor, unbelievably")
    assert words[0] == "a" and "velvet" in words and "unbelievably" in words
    assert len(tokens) == len(word_of) and max(word_of) == len(words) - 1


def test_words_read_as_text_beyond_ascii(tiny_pipe):
    # CLIP's byte-level vocabulary writes "é" as "Ã©": the words are decoded, not shown (or re-tokenized) that way
    from diffmem.explain.tokens import readable

    prompt = "a red Café circle 🐱 日本"
    tokens, word_of, words = prompt_tokens(tiny_pipe, prompt)
    assert words == ["a", "red", "café", "circle", "🐱", "日本"]
    assert "日本" == readable([t for t, w in zip(tokens, word_of) if w == 5]) and len(set(word_of)) == 6
    # ablation by removal rebuilds prompts from the words: they must tokenize as the prompt does
    assert denoise.tokenize(tiny_pipe, [" ".join(words)]).tolist() == denoise.tokenize(tiny_pipe, [prompt]).tolist()
    res = AttributionResult(prompt, tokens, np.ones(len(tokens)), words, np.arange(len(words), dtype=float), word_of,
                            "token_attribution", {}, [0])
    assert [w for _, w in res.segments()] == ["a", "red", "Café", "circle", "🐱", "日本"]  # the user's own spelling
    assert str(res.to_rich()) == prompt


def test_gradient_matches_finite_differences(tiny_pipe):
    """With wrt="output", the attribution is the gradient of the first-step loss with respect to the
    text-encoder output embeddings."""
    pipe = tiny_pipe
    prompt = "a red circle"
    res = TokenAttribution(pipe, num_inference_steps=4, steps=[0], wrt="output").attribute(prompt)
    with torch.no_grad():
        emb = denoise.encode_text(pipe, [prompt]).double()
        uncond = denoise.encode_text(pipe, [""]).double()
    sched = denoise.fresh_scheduler(pipe, 4)
    t = sched.timesteps[0]
    x = denoise.initial_latents(pipe, sched, 0, 1).double()  # drawn in float32, as the attribution draws it
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


def test_input_gradient_matches_a_directional_finite_difference(tiny_pipe):
    """Default wrt="input": the gradient with respect to the token embeddings, through the text
    encoder. A float64 central difference along a random direction at one token checks it."""
    from diffmem.explain.tokens import encode_token_embeddings

    pipe = tiny_pipe
    prompt = "a red circle"
    ta = TokenAttribution(pipe, num_inference_steps=4, steps=[0])
    assert ta.settings["wrt"] == "input"
    pos = 2
    sched = denoise.fresh_scheduler(pipe, 4)
    t = sched.timesteps[0]
    ids = denoise.tokenize(pipe, [prompt])
    x = denoise.initial_latents(pipe, sched, 0, 1).double()  # drawn in float32, as the attribution draws it
    pipe.unet.double()
    pipe.text_encoder.double()
    try:
        with torch.no_grad():
            uncond = pipe.unet(x, t, encoder_hidden_states=denoise.encode_text(pipe, [""])).sample
            tok = pipe.text_encoder.get_input_embeddings()(ids)

        def loss(e):
            return (pipe.unet(x, t, encoder_hidden_states=encode_token_embeddings(pipe, ids, e)).sample - uncond).norm()

        leaf = tok.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(leaf), leaf)
        v = torch.zeros_like(tok)
        v[0, pos] = torch.randn(tok.shape[-1], generator=torch.Generator().manual_seed(0), dtype=tok.dtype)
        h = 1e-6
        with torch.no_grad():
            fd = float((loss(tok + h * v) - loss(tok - h * v)) / (2 * h))
        assert float((g * v).sum()) == pytest.approx(fd, rel=1e-5)
        grad_norm = float(g[0, pos].norm())
    finally:
        pipe.unet.float()
        pipe.text_encoder.float()
    res = ta.attribute(prompt)
    assert res.token_scores[pos - 1] == pytest.approx(grad_norm, rel=1e-3)


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
    assert back.seeds == [0, 1] and back.settings["steps"] == [0, 1] and back.truncated is False
    # a file saved before diffmem recorded truncation loads, the flag unknown
    old = res.to_dict()
    del old["truncated"]
    assert AttributionResult.from_dict(old).truncated is None


def test_empty_prompt(tiny_pipe):
    with pytest.raises(InputError, match="empty"):
        TokenAttribution(tiny_pipe, num_inference_steps=4).attribute("  ")
    with pytest.raises(InputError, match="the prompt to explain holds a lone surrogate"):
        TokenAttribution(tiny_pipe, num_inference_steps=4).attribute("a \ud83d")
    with pytest.raises(InputError, match="empty"):
        TokenAttribution(tiny_pipe, num_inference_steps=4).attribute(None)
    with pytest.raises(InputError, match="one prompt, a string; got list"):
        TokenAttribution(tiny_pipe, num_inference_steps=4).attribute(["a red circle"])
    # the tokenizer reads these as its special tokens: no word is left to rank (it was numpy's
    # "zero-size array to reduction operation maximum")
    for prompt in ("<|endoftext|>", "<|startoftext|> <|endoftext|>"):
        with pytest.raises(InputError, match="has no words to rank"):
            TokenAttribution(tiny_pipe, num_inference_steps=4).attribute(prompt)
    # a special token among words is a word of its own, not glued to the next ("<|startoftext|>a")
    from diffmem.explain.tokens import prompt_tokens

    assert prompt_tokens(tiny_pipe, "<|startoftext|> a cat")[2] == ["<|startoftext|>", "a", "cat"]
    # the model reads on past an "<|endoftext|>" typed inside the prompt: so do the words ranked
    words = prompt_tokens(tiny_pipe, "a red circle <|endoftext|> a blue square")[2]
    assert words == ["a", "red", "circle", "<|endoftext|>", "a", "blue", "square"]
    res = TokenAttribution(tiny_pipe, num_inference_steps=4).attribute("a red circle <|endoftext|> a blue square")
    assert res.words == words and len(res.word_scores) == 7 and np.all(res.word_scores > 0)


def _result(words, scores):
    return AttributionResult(" ".join(words), [w + "</w>" for w in words], np.asarray(scores, float), list(words),
                             np.asarray(scores, float), list(range(len(words))), "token_attribution", {}, [0])


def test_words_keep_their_places_after_a_letter_that_grows_when_lower_cased(tiny_pipe):
    # Turkish "İ" lower-cases to "i" and a combining dot: positions found in the lower-cased prompt
    # shifted every word after it by one character ("STANBUL " shaded as "TANBUL A", "AT" as "T N", ...)
    prompt = "İSTANBUL AT NIGHT, a red circle"
    words = prompt_tokens(tiny_pipe, prompt)[2]
    assert words == ["i", "\u0307", "stanbul", "at", "night", ",", "a", "red", "circle"]
    res = AttributionResult(prompt, words, np.ones(len(words)), words, np.ones(len(words)), list(range(len(words))),
                            "token_attribution", {}, [0])
    assert res.segments() == [("", "İ"), ("", ""), ("", "STANBUL"), (" ", "AT"), (" ", "NIGHT"), ("", ","), (" ", "a"),
                              (" ", "red"), (" ", "circle")]  # the dot's word is empty: "İ" went to "i"
    # the tokenizer lower-cases letter by letter, a final "Σ" to "σ" where Python's lower() of the whole
    # prompt gives "ς": the words were not found, and were shown in the tokenizer's spelling
    prompt = "ΟΔΟΣ red"
    words = prompt_tokens(tiny_pipe, prompt)[2]
    res = AttributionResult(prompt, words, np.ones(len(words)), words, np.ones(len(words)), list(range(len(words))),
                            "token_attribution", {}, [0])
    assert "".join(b + w for b, w in res.segments()) == prompt and res.segments()[-1] == (" ", "red")
    # an accent typed apart ("e" and U+0301, as macOS writes file names): the tokenizer composes it
    prompt = "Cafe\u0301 RED"
    words = prompt_tokens(tiny_pipe, prompt)[2]
    assert words == ["caf\u00e9", "red"]
    res = AttributionResult(prompt, words, np.ones(2), words, np.ones(2), [0, 1], "token_attribution", {}, [0])
    assert res.segments() == [("", "Cafe\u0301"), (" ", "RED")]


def test_a_word_the_cut_splits_inside_a_character_is_shown_as_that_character(tiny_pipe):
    # the model reads 77 tokens: here the last one holds the first bytes of "龘", decoded as "\ufffd";
    # that word was not found in the prompt, and every word was shown in the tokenizer's spelling
    prompt = "A " * 73 + "龘 RED"
    with pytest.warns(denoise.PromptTruncationWarning):
        words = prompt_tokens(tiny_pipe, prompt)[2]
    assert words[-2:] == ["a", "\ufffd"]
    res = AttributionResult(prompt, words, np.ones(len(words)), words, np.ones(len(words)), list(range(len(words))),
                            "token_attribution", {}, [0])
    segments = res.segments()
    assert segments[0] == ("", "A") and segments[-1] == (" ", "龘")
    assert prompt.startswith("".join(b + w for b, w in segments))  # the displays and the app's edits read it so


def test_top_word_lead_and_near_tie_by_hand():
    from diffmem.explain.result import DECISIVE_LEAD

    clear = _result(["a", "velvet", "harbor"], [1.0, 4.0, 2.0])
    assert clear.top_word == "velvet" and clear.runner_up == "harbor"
    assert clear.top_lead == pytest.approx(0.5) and not clear.near_tie
    assert clear.lead_text() == 'ahead of "harbor" by 50%'
    tie = _result(["in", "the", "desert"], [3.8, 1.0, 4.0])
    assert tie.top_lead == pytest.approx(0.05) and tie.top_lead < DECISIVE_LEAD and tie.near_tie
    assert tie.lead_text() == 'a near tie with "in" (ahead by 5%): their order says little'
    # one word has no second to lead: no verdict, not a tie
    one = _result(["cat"], [2.0])
    assert one.runner_up is None and np.isnan(one.top_lead) and not one.near_tie and one.lead_text() == ""
    # ablation drops can be negative: the lead is still a share of the top score's size
    assert _result(["x", "y"], [-1.0, -2.0]).top_lead == pytest.approx(1.0)
    assert _result(["x", "y"], [0.0, 0.0]).lead_text() == ""
    # a word standing twice: its other occurrence is named as such, not as if it were another word
    twice = _result(["velvet", "harbor", "velvet"], [3.0, 1.0, 2.0])
    assert twice.runner_up == "velvet" and twice.lead_text() == 'ahead of the other "velvet" by 33%'


def test_an_ancestral_sampler_draws_its_step_noise_from_the_seed(tiny_pipe_with):
    from diffmem.detect import NoiseNormDetector

    pipe = tiny_pipe_with("EulerAncestralDiscreteScheduler")
    att = TokenAttribution(pipe, num_inference_steps=4, steps=[0, 2], generations=2, seed=3)
    first = att.attribute("a red circle on the left")
    torch.manual_seed(99)  # the global generator's state must not matter
    again = att.attribute("a red circle on the left")
    np.testing.assert_array_equal(again.token_scores, first.token_scores)
    # the loss it differentiates is the detector's score, whose trajectory is the pipeline's
    score = NoiseNormDetector(pipe, 4, 7.5, steps=[0, 2], generations=2, seed=3).score(["a red circle on the left"]).scores[0]
    assert first.detection_score == pytest.approx(score, rel=1e-4)


def test_a_textual_inversion_token_is_one_word_as_written(tiny_pipe_ti):
    # it has no end-of-word mark: it was glued to the next word ("<my-style>style"), and the further
    # vectors of a multi-vector one are one word with it
    from diffmem.explain import TokenAblation

    prompt = "A painting in <my-style> Style, <one>"
    tokens, word_of, words = prompt_tokens(tiny_pipe_ti, prompt)
    assert words == ["a", "painting", "in", "<my-style>", "style", ",", "<one>"]
    assert [t for t, w in zip(tokens, word_of) if w == 3] == ["<my-style>", "<my-style>_1", "<my-style>_2"]
    for explainer in (TokenAttribution(tiny_pipe_ti, 4, 7.5), TokenAblation(tiny_pipe_ti, 4, 7.5)):
        result = explainer.attribute(prompt)
        assert [w for _, w in result.segments()] == ["A", "painting", "in", "<my-style>", "Style", ",", "<one>"]
        assert np.isfinite(result.word_scores).all() and len(result.word_scores) == 7
