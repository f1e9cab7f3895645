import pytest

from diffmem.mitigate import BASELINES

PROMPTS = ["a red circle", "a photo of a cat"]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_share_the_interface(tiny_pipe, name):
    res = BASELINES[name](tiny_pipe, generations=2, num_inference_steps=3).mitigate(PROMPTS)
    assert res.images_after.shape == res.images_before.shape == (2, 2, 16, 16, 3)
    if name in ("rta", "rna", "word_repetition"):
        assert all(new != old for new, old in zip(res.mitigated_prompts, PROMPTS))
    if name == "rta":
        assert all(len(new.split()) == len(old.split()) + 4 for new, old in zip(res.mitigated_prompts, PROMPTS))


def test_rewrites_are_seeded_and_generated_as_written(tiny_pipe):
    from diffmem.core.generate import generate

    rna = BASELINES["rna"](tiny_pipe, generations=2, num_inference_steps=3, seed=5)
    res = rna.mitigate(PROMPTS)
    for new, old in zip(res.mitigated_prompts, PROMPTS):
        added = [w for w in new.split() if w.isdigit()]
        assert len(added) == 4 and [w for w in new.split() if not w.isdigit()] == old.split()
    again = BASELINES["rna"](tiny_pipe, generations=2, num_inference_steps=3, seed=5).mitigate(PROMPTS, generate_images=False)
    assert again.mitigated_prompts == res.mitigated_prompts and res.seeds == [5, 6]
    # the after images are a plain generation of the rewritten text with the same seeds
    plain = generate(tiny_pipe, res.mitigated_prompts, res.seeds, num_inference_steps=3)
    assert (plain == res.images_after).all()


def test_gaussian_noise_spares_bos_and_has_the_given_scale(tiny_pipe):
    import torch

    from diffmem.core import denoise

    gni = BASELINES["gni"](tiny_pipe, sigma=0.5, seed=0)
    with torch.no_grad():
        clean = denoise.encode_text(tiny_pipe, PROMPTS)
    noisy = gni.embeddings(PROMPTS)
    assert torch.equal(noisy[:, 0], clean[:, 0])
    assert float((noisy - clean)[:, 1:].std()) == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_a_prompts_mitigation_does_not_depend_on_the_other_prompts(tiny_pipe, name):
    """Draws are per prompt (seed and text): the same prompt alone, or after others, or twice in a
    list, is rewritten (RTA / RNA / repetition) or noised (GNI) the same way."""
    import torch

    m = BASELINES[name](tiny_pipe, generations=1, num_inference_steps=3, seed=2)
    together = m.mitigate(PROMPTS + [PROMPTS[0]], generate_images=False).mitigated_prompts
    alone = [m.mitigate([p], generate_images=False).mitigated_prompts[0] for p in PROMPTS]
    assert together == alone + [alone[0]]
    if name == "gni":
        both = m.embeddings(PROMPTS)
        assert torch.equal(both[1], m.embeddings(PROMPTS[1:])[0])
        assert not torch.equal(both[0, 1:], both[1, 1:])


@pytest.mark.parametrize("name, bad", [("gni", {"sigma": -0.1}), ("gni", {"sigma": float("nan")}),
                                       ("rta", {"n_tokens": -1}), ("rna", {"n_numbers": 2.5}),
                                       ("word_repetition", {"n_repeats": -2}), ("rna", {"generations": 0})])
def test_bad_settings_are_clear_errors(tiny_pipe, name, bad):
    from diffmem.core.errors import InputError

    with pytest.raises(InputError, match=next(iter(bad))):
        BASELINES[name](tiny_pipe, **bad)


def test_truncation_is_recorded_for_each_prompt_and_its_rewrite(tiny_pipe, tmp_path):
    import json

    import numpy as np

    from diffmem.mitigate import MitigationResult
    from diffmem.mitigate.report import save_outputs

    fits, cut = ("a " * 75).strip(), ("a " * 76).strip()  # 75 + BOS + EOS is all CLIP reads
    res = BASELINES["rna"](tiny_pipe, generations=1, num_inference_steps=2).mitigate(["a red circle", fits, cut])
    assert res.truncated.tolist() == [False, False, True]
    assert res.mitigated_truncated.tolist() == [False, True, True]  # the prompt's tail or some numbers past the cut
    frame = res.to_frame()
    assert frame["truncated"].tolist() == [False, False, True] and frame["mitigated_truncated"].tolist() == [False, True, True]
    summary = save_outputs(res, tmp_path / "m")
    assert "1 prompt(s) longer than the model reads" in summary and "2 rewrite(s) longer than the model reads" in summary
    back = MitigationResult.load(tmp_path / "m")
    np.testing.assert_array_equal(back.truncated, res.truncated)
    np.testing.assert_array_equal(back.mitigated_truncated, res.mitigated_truncated)
    joined = MitigationResult.concat([back, back])
    assert joined.truncated.tolist() == [False, False, True] * 2
    # a result saved before diffmem recorded truncation loads with it unknown, and joins so
    meta = json.loads((tmp_path / "m" / "mitigation.json").read_text())
    del meta["truncated"], meta["mitigated_truncated"]
    (tmp_path / "m" / "mitigation.json").write_text(json.dumps(meta))
    old = MitigationResult.load(tmp_path / "m")
    assert old.truncated is None and "truncated" not in old.to_frame()
    assert MitigationResult.concat([old, back]).truncated is None


def test_rta_adds_words_that_typed_are_the_tokens_drawn(tiny_pipe):
    # each candidate, written into a prompt, must come back as its own single token: CLIP's byte-level
    # vocabulary also holds pieces like "âĢĶ" (an em dash's bytes), which typed would be other tokens
    rta = BASELINES["rta"](tiny_pipe)
    tok = tiny_pipe.tokenizer
    ids = tok(rta._words, add_special_tokens=False).input_ids
    assert len(rta._words) > 30_000
    assert all(len(i) == 1 and tok.convert_ids_to_tokens(i)[0] == w + "</w>" for i, w in zip(ids, rta._words))


def test_added_words_go_in_at_random_places_as_in_the_papers_code(tiny_pipe):
    """Somepalli et al.'s and Wen et al.'s code insert each added word at a random place among the
    prompt's words; ``placement="end"`` appends them. The prompt's own words keep their order."""
    import collections

    prompts = [f"a photo of a cat number {chr(97 + i)} on a mat" for i in range(20)]
    places = collections.Counter()
    for name in ("rta", "rna"):
        new = BASELINES[name](tiny_pipe, seed=3).mitigate(prompts, generate_images=False).mitigated_prompts
        for rewritten, old in zip(new, prompts):
            words = rewritten.split()
            own = [w for w in words if w in old.split()]
            assert own == old.split() and len(words) == len(own) + 4  # the prompt's words, in order, and 4 more
            places.update("inside" if i < words.index("mat") else "after" for i, w in enumerate(words) if w not in old.split())
        if name == "rna":  # the papers' range, 0..99,999
            assert 10_000 <= max(int(w) for p in new for w in p.split() if w.isdigit()) < 100_000
        end = BASELINES[name](tiny_pipe, seed=3, placement="end").mitigate(prompts, generate_images=False).mitigated_prompts
        assert all(r.startswith(p + " ") and len(r.split()) == len(p.split()) + 4 for r, p in zip(end, prompts))
    assert places["inside"] > 2 * places["after"] > 0  # 10 places of 11 lie before the last word, at first
    distinct = [f"alpha{i} bravo charlie delta echo foxtrot golf hotel" for i in range(20)]  # no word twice
    repeated = BASELINES["word_repetition"](tiny_pipe, seed=3).mitigate(distinct, generate_images=False).mitigated_prompts
    apart = 0
    for rewritten, old in zip(repeated, distinct):
        extra = collections.Counter(rewritten.split()) - collections.Counter(old.split())
        assert sum(extra.values()) == 2 and set(extra) <= set(old.split())  # two of the prompt's own words, again
        words = rewritten.split()
        for w in extra:  # the copies of a repeated word stand apart unless every copy neighbours another
            at = [i for i, x in enumerate(words) if x == w]
            apart += any(b - a > 1 for a, b in zip(at, at[1:]))
    assert apart >= 10  # not next to the word repeated, as in-place repetition would put it


def test_a_prompt_near_clips_limit_keeps_its_added_words_inside_it(tiny_pipe):
    """At random places, a long prompt's additions mostly fall inside the 77 tokens CLIP reads, and
    the prompt's tail is cut instead. Appended, they all fell past the cut and changed nothing: they
    now go in just before it, the prompt's unread tail after them."""
    from diffmem.core import denoise
    from diffmem.core.errors import InputError

    long = " ".join(["a"] * 75)  # 75 + BOS + EOS: all CLIP reads
    for placement in ("random", "end"):
        rta = BASELINES["rta"](tiny_pipe, seed=1, placement=placement)
        res = rta.mitigate([long], generate_images=False)
        new = res.mitigated_prompts[0]
        ids = denoise.tokenize(tiny_pipe, [new], warn=False)[0].tolist()
        added = [w for w in new.split() if w != "a"]
        added_ids = set(tiny_pipe.tokenizer(" ".join(added), add_special_tokens=False).input_ids)
        assert len(added) == 4 and sum(i in added_ids for i in ids) == 4, placement
        assert res.mitigated_truncated[0]  # the prompt's tail is what the model does not read
    # appended: right before the cut, in their order, the prompt's own words kept in theirs
    assert new == " ".join(["a"] * 71 + added + ["a"] * 4)
    assert [i in added_ids for i in ids[72:76]] == [True] * 4 and ids[76] == tiny_pipe.tokenizer.eos_token_id
    short = BASELINES["rna"](tiny_pipe, seed=1, placement="end").mitigate(["a red circle"], generate_images=False)
    assert short.mitigated_prompts[0].startswith("a red circle ")  # a prompt with room: appended, as before
    with pytest.raises(InputError, match="placement must be one of random, end"):
        BASELINES["rna"](tiny_pipe, placement="middle")
