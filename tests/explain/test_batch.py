import json
import re
from functools import partial

import numpy as np
import pytest
from markupsafe import escape

from diffmem.core import denoise
from diffmem.core.errors import InputError
from diffmem.explain import AttributionSet, TokenAblation, TokenAttribution, explain_prompts
from diffmem.explain.batch import write_outputs
from doubles import Recording

PROMPTS = ["a red circle", "a blue square at night", "a red circle", "a green ring"]

Counting = partial(Recording, call="attribute")


def test_batch_equals_one_by_one_once_per_distinct_prompt(tiny_pipe):
    explainer = Counting(TokenAttribution(tiny_pipe, num_inference_steps=4))
    got = explain_prompts(explainer, PROMPTS)
    assert [r.prompt for r in got.results] == ["a red circle", "a blue square at night", "a green ring"]
    assert explainer.calls == [r.prompt for r in got.results]
    for r in got.results:
        want = TokenAttribution(tiny_pipe, num_inference_steps=4).attribute(r.prompt)
        np.testing.assert_array_equal(r.word_scores, want.word_scores)
    assert got.top_words()["a green ring"] == got.by_prompt()["a green ring"].top_word
    assert got.method == "token_attribution" and got.seeds == [0] and got.model["unet_hash"]


def test_interrupted_run_resumes_without_recomputing(tiny_pipe, tmp_path):
    ckpt = tmp_path / "attributions.json"
    first = Counting(TokenAblation(tiny_pipe, num_inference_steps=4), fail_on="a green ring")
    with pytest.raises(KeyboardInterrupt):
        explain_prompts(first, PROMPTS, checkpoint=ckpt, save_every=0)
    saved = AttributionSet.load(ckpt)
    assert [r.prompt for r in saved.results] == ["a red circle", "a blue square at night"]

    second = Counting(TokenAblation(tiny_pipe, num_inference_steps=4))
    resumed = explain_prompts(second, PROMPTS, checkpoint=ckpt)
    assert second.calls == ["a green ring"]
    fresh = explain_prompts(TokenAblation(tiny_pipe, num_inference_steps=4), PROMPTS)
    for a, b in zip(resumed.results, fresh.results):
        assert a.prompt == b.prompt
        np.testing.assert_array_equal(a.word_scores, b.word_scores)
    # the checkpoint now holds the finished set, in input order
    assert [r.prompt for r in AttributionSet.load(ckpt).results] == [r.prompt for r in fresh.results]


def test_saves_are_spaced_in_time_but_the_finished_set_is_always_saved(tiny_pipe, tmp_path):
    ckpt = tmp_path / "attributions.json"
    with pytest.raises(KeyboardInterrupt):
        explain_prompts(Counting(TokenAttribution(tiny_pipe, num_inference_steps=4), fail_on="a green ring"), PROMPTS,
                        checkpoint=ckpt, save_every=3600)
    assert not ckpt.exists()  # within the hour nothing was due
    explain_prompts(TokenAttribution(tiny_pipe, num_inference_steps=4), PROMPTS, checkpoint=ckpt, save_every=3600)
    assert len(AttributionSet.load(ckpt)) == 3


def test_a_checkpoint_from_other_settings_or_another_model_is_never_mixed_in(tiny_pipe, tiny_pipe_v, tmp_path):
    ckpt = tmp_path / "attributions.json"
    explain_prompts(TokenAttribution(tiny_pipe, num_inference_steps=4), PROMPTS[:2], checkpoint=ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(InputError, match="other settings"):
        explain_prompts(TokenAttribution(tiny_pipe, num_inference_steps=4, seed=3), PROMPTS, checkpoint=ckpt)
    with pytest.raises(InputError, match="another model"):
        explain_prompts(TokenAttribution(tiny_pipe_v, num_inference_steps=4), PROMPTS, checkpoint=ckpt)
    assert ckpt.read_bytes() == before  # refused: the user's file is untouched
    restarted = Counting(TokenAttribution(tiny_pipe, num_inference_steps=4, seed=3))
    explain_prompts(restarted, PROMPTS[:2], checkpoint=ckpt, stale="restart")
    assert restarted.calls == PROMPTS[:2] and AttributionSet.load(ckpt).seeds == [3]


def test_a_checkpoint_of_another_revision_of_the_explainer_is_never_mixed_in(tiny_pipe, tmp_path, monkeypatch):
    # a later diffmem whose attribution scores words otherwise for the same settings must not resume
    # an earlier one's half-done checkpoint: the set would hold word scores of two methods
    from doubles import bump_revision

    ckpt = tmp_path / "attributions.json"
    explain_prompts(TokenAttribution(tiny_pipe, num_inference_steps=4), PROMPTS[:2], checkpoint=ckpt)
    before = ckpt.read_bytes()
    saved = TokenAttribution.revision
    bump_revision(monkeypatch, TokenAttribution)
    refused = Counting(TokenAttribution(tiny_pipe, num_inference_steps=4))
    with pytest.raises(InputError, match=rf"another diffmem's version of token_attribution \(revision {saved}; this diffmem's is {saved + 1}\)"):
        explain_prompts(refused, PROMPTS, checkpoint=ckpt)
    assert refused.calls == [] and ckpt.read_bytes() == before
    restarted = Counting(TokenAttribution(tiny_pipe, num_inference_steps=4))
    explain_prompts(restarted, PROMPTS[:2], checkpoint=ckpt, stale="restart")
    assert restarted.calls == PROMPTS[:2] and AttributionSet.load(ckpt).revision == saved + 1
    # and the next run of that revision resumes its own checkpoint
    again = Counting(TokenAttribution(tiny_pipe, num_inference_steps=4))
    explain_prompts(again, PROMPTS, checkpoint=ckpt)
    assert again.calls == ["a green ring"]


def test_a_checkpoint_saved_before_sets_had_a_revision_resumes_as_revision_1(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(TokenAttribution, "revision", 1)  # an explainer still at its first revision
    ckpt = tmp_path / "attributions.json"
    explain_prompts(TokenAttribution(tiny_pipe, num_inference_steps=4), PROMPTS[:2], checkpoint=ckpt)
    old = json.loads(ckpt.read_text())
    del old["revision"]  # as an earlier diffmem saved it
    ckpt.write_text(json.dumps(old))
    resumed = Counting(TokenAttribution(tiny_pipe, num_inference_steps=4))
    explain_prompts(resumed, PROMPTS, checkpoint=ckpt)
    assert resumed.calls == ["a green ring"] and AttributionSet.load(ckpt).revision == 1
    monkeypatch.setattr(TokenAttribution, "revision", 2)  # and one past it refuses such a checkpoint
    with pytest.raises(InputError, match=r"another diffmem's version of token_attribution \(revision 1; this diffmem's is 2\)"):
        explain_prompts(TokenAttribution(tiny_pipe, num_inference_steps=4), PROMPTS + ["a tree"], checkpoint=ckpt)


def test_a_string_is_one_prompt(tiny_pipe):
    explainer = Counting(TokenAttribution(tiny_pipe, num_inference_steps=4))
    got = explain_prompts(explainer, "a red circle")
    assert explainer.calls == ["a red circle"] and [r.prompt for r in got.results] == ["a red circle"]


def test_bad_prompts_fail_before_any_work(tiny_pipe, tmp_path):
    explainer = Counting(TokenAttribution(tiny_pipe, num_inference_steps=4))
    with pytest.raises(InputError, match="empty"):
        explain_prompts(explainer, ["a cat", "   "], checkpoint=tmp_path / "a.json")
    assert explainer.calls == [] and not (tmp_path / "a.json").exists()
    with pytest.raises(InputError, match=re.escape("'<|endoftext|>' has no words to rank")):  # special tokens only
        explain_prompts(explainer, ["a cat", "<|endoftext|>"], checkpoint=tmp_path / "a.json")
    assert explainer.calls == [] and not (tmp_path / "a.json").exists()
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(InputError, match="is not a saved attributions file"):
        explain_prompts(explainer, ["a cat"], checkpoint=tmp_path / "junk.json")
    assert explain_prompts(explainer, []).results == []


def test_set_saves_tabulates_and_draws_escaped_html(tiny_pipe, tmp_path):
    hostile = "a <script>alert(1)</script> circle"
    long = " ".join(f"w{i}" for i in range(80))
    with pytest.warns(denoise.PromptTruncationWarning):
        res = explain_prompts(TokenAttribution(tiny_pipe, num_inference_steps=4), ["a red circle", hostile, long])
    paths = write_outputs(res, tmp_path)
    back = AttributionSet.load(paths[0])
    assert back.to_dict() == json.loads(json.dumps(res.to_dict()))
    frame = back.to_frame()
    assert len(frame) == sum(len(r.words) for r in res.results)
    assert frame.groupby("prompt_index")["truncated"].first().tolist() == [False, False, True] and back.n_truncated == 1
    leads = frame.groupby("prompt_index")["top_lead"].first().tolist()
    assert leads == pytest.approx([r.top_lead for r in res.results])
    assert back.n_near_ties == sum(lead < 0.2 for lead in leads)
    for r in res.results:
        rows = frame[frame.prompt == r.prompt]
        assert rows.loc[rows["rank"] == 1, "word"].item() == r.top_word
        assert sorted(rows["rank"]) == list(range(1, len(r.words) + 1))
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_parquet(paths[1]), frame)
    page = paths[2].read_text()
    # the tokenizer splits "<script>" into three words, each escaped in its own span
    assert "<script" not in page and "</script" not in page and "&lt;/" in page
    assert page.count('class="diffmem-attribution"') == 3 and page.count('class="truncated"') == 1
    for r in res.results:  # each prompt's top word's lead, its runner-up escaped like every word
        assert str(escape(r.lead_text())) in page
