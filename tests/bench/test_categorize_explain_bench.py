import json
import math

import numpy as np
import pytest

from diffmem.bench.categorize import bench_categorize, kind_scores, planted_kinds
from diffmem.bench.explain import ExplainBenchResult, bench_explain


def test_planted_kinds_follow_the_scene_and_adjective_words():
    exp = {"colour": "red", "shape": "ring", "position": "left", "white_ground": True, "stamp": True,
           "vignette": False, "sand_ground": False, "dark_sky": False, "frame": True, "template": None}
    assert planted_kinds(exp) == {"colour:red": "explicit", "shape:ring": "explicit", "position:left": "explicit",
                                  "white_ground": "implicit", "stamp": "unintended"}


def test_kind_scores_by_hand():
    truth = [{"colour:red": "explicit", "stamp": "unintended"}, {"colour:blue": "explicit", "white_ground": "implicit"}]
    # prompt 0: stamp called implicit (wrong kind); prompt 1: all right plus a frame that was not planted
    pred = [{"colour:red": "explicit", "stamp": "implicit"},
            {"colour:blue": "explicit", "white_ground": "implicit", "frame": "unintended"}]
    s = kind_scores(truth, pred)
    assert s["explicit"]["precision"] == 1.0 and s["explicit"]["recall"] == 1.0
    assert s["implicit"]["precision"] == 0.5 and s["implicit"]["recall"] == 1.0
    assert s["unintended"]["precision"] == 0.0 and s["unintended"]["recall"] == 0.0
    assert s["memorized_recall"] == 1.0 and s["false_flag_rate"] == 0.5
    assert math.isnan(kind_scores([{}], [{}])["explicit"]["precision"])


def test_bench_categorize_small_run_and_resume(memlab_manifest, tmp_path, monkeypatch):
    from diffmem.categorize.profiler import MemorizationProfiler
    from diffmem.core.loading import load_pipeline

    pipe = load_pipeline("memlab")
    parts = tmp_path / "parts"
    res = bench_categorize(pipe, memlab_manifest, n=2, max_prompts=3, progress=False, checkpoint=parts)
    assert set(res.routes) >= {"expectation_map", "caption_cooccurrence"}
    # tracing is ground truth end to end: the word and count come from the training captions and scenes
    assert len(res.tracing) == 5 and all(t["matches_manifest"] for t in res.tracing)
    saved = json.loads(res.save(tmp_path).read_text())
    assert saved["settings"]["n"] == 2 and saved["settings"]["prompts"] == 3 and "table" in saved

    # a re-run generates nothing (prompts and controls come from the saved parts) and scores the same
    assert (parts / "part_0000" / "done.json").exists() and (parts / "control_0000" / "done.json").exists()

    def no_generation(*a, **k):
        raise AssertionError("a resumed bench generated again")

    monkeypatch.setattr(MemorizationProfiler, "_features", no_generation)
    again = bench_categorize(pipe, memlab_manifest, n=2, max_prompts=3, progress=False, checkpoint=parts)
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 - NaN == NaN here
    assert same(again.routes, res.routes) and same(again.tracing, res.tracing)
    assert again.habit_flagged_rate == res.habit_flagged_rate
    # no prompt was generated, so no speed is claimed (it used to report the read-back as generation time)
    assert res.seconds_per_prompt > 0 and math.isnan(again.seconds_per_prompt)
    assert "time not measured" in again.table()


def test_lead_margin_by_hand():
    from diffmem.explain.result import lead_margin

    assert lead_margin([1.0, 3.0, 2.0]) == pytest.approx(1 / 3)
    assert lead_margin([2.0, 2.0]) == 0.0
    assert np.isnan(lead_margin([5.0])) and np.isnan(lead_margin([0.0, 0.0]))


def test_outcome_takes_a_repeated_word_by_its_position():
    # "at" stands twice; the methods' top word is the second "at", whose masking breaks the replication
    # and the first's does not: looking the word up by text would take the first
    row = {"prompt": "a blue triangle at the top at night", "words": "a blue triangle at the top at night".split(),
           "replicated_unmasked": 1.0, "replicated_masked": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0],
           "outcome_top": "at", "outcome_top_index": 6}
    for m in ("attribution", "ablation"):
        row |= {f"{m}_top": "at", f"{m}_top_index": 6, f"{m}_spearman": 1.0}
    res = ExplainBenchResult([], [], {"methods": ["attribution", "ablation"], "outcome_seeds": 1}, [row])
    for m in ("attribution", "ablation"):
        assert res.outcome()[m]["replication_with_top_word_masked"] == 0.0
        assert res.outcome()[m]["top_word_is_outcome_top"] == 1.0
    # rows saved before positions were recorded still load, taking the word's first position
    old = {k: v for k, v in row.items() if not k.endswith("_top_index")}
    assert ExplainBenchResult([], [], res.settings, [old]).outcome()["ablation"]["replication_with_top_word_masked"] == 1.0


@pytest.mark.slow
def test_bench_explain_small_run(memlab_manifest, tmp_path):
    from diffmem.core.loading import load_pipeline
    from diffmem.explain import TokenAttribution

    pipe = load_pipeline("memlab")
    res = bench_explain(pipe, memlab_manifest, max_prompts=2, outcome_seeds=1, progress=False)
    assert len(res.trigger_rows) == 2
    row = res.trigger_rows[0]
    direct = TokenAttribution(pipe, res.settings["num_inference_steps"], res.settings["guidance_scale"]).attribute(row["prompt"])
    assert row["attribution_top"] == direct.top_word
    assert row["attribution_hit"] == (direct.top_word in row["trigger"].split())
    saved = json.loads(res.save(tmp_path).read_text())
    assert saved["settings"]["candidates"] == 4 and saved["settings"]["ablation_mode"] == "mask"
    # per-group agreement adds up to the overall rate
    by_group = res.agreement_by_group()
    assert set(by_group) <= {"verbatim", "trigger"} and sum(n for _, n in by_group.values()) == len(res.agreement_rows)
    if res.agreement_rows:
        assert sum(r * n for r, n in by_group.values()) / len(res.agreement_rows) == pytest.approx(res.agreement_rate)
    # the attribution's top word is the ablation's first exactly when they agree; with no margin asked
    # for, the decisive split is the whole split
    for r in res.agreement_rows:
        assert (r["attribution_top_rank_by_ablation"] == 1) == r["agree"] == (r["attribution_top_index"] == r["ablation_top_index"])
        assert r["attribution_margin"] >= 0 and r["ablation_margin"] >= 0
    assert res.agreement_where_decisive(0.0) == by_group
    assert all(n <= by_group[g][1] for g, (_, n) in res.agreement_where_decisive(0.5).items())
    assert "agreement_where_decisive" in saved and "lead their second" in res.table()
    assert res.plot(tmp_path / "bench_explain.png").stat().st_size > 5000
    back = ExplainBenchResult.load(tmp_path)
    assert back.table() == res.table() and back.outcome() == res.outcome()
    # the masked generations: one row per flagged verbatim prompt, measured against its planted image
    flagged_verbatim = [r for r in res.agreement_rows if r["group"] == "verbatim"]
    assert [r["prompt"] for r in res.outcome_rows] == [r["prompt"] for r in flagged_verbatim]
    assert res.outcome_rows, "the planted verbatim prompts are flagged"
    from diffmem.core.generate import generate
    from diffmem.mitigate.measures import MemLabReplication

    kernel = MemLabReplication(pipe, memlab_manifest).kernel
    for row, agreed in zip(res.outcome_rows, flagged_verbatim):
        planted = next(e for e in memlab_manifest["groups"]["verbatim"] if e["prompt"] == row["prompt"])
        assert row["image_id"] == planted["image_id"]
        plain = generate(pipe, [row["prompt"]], [0], res.settings["num_inference_steps"], res.settings["guidance_scale"])
        # the first generation is the prompt's own: a plain generation's ratio to the planted image
        assert row["ratio_unmasked"][0] == pytest.approx(float(kernel.ratio_to(plain[0], planted["image_id"])[0]), rel=1e-4)
        effect = np.mean(row["ratio_masked"], axis=1) - np.mean(row["ratio_unmasked"])
        assert row["outcome_top_index"] == int(np.argmax(effect)) and row["outcome_top"] == row["words"][row["outcome_top_index"]]
        assert len(row["ratio_masked"]) == len(row["words"]) and row["ablation_top"] == agreed["ablation_top"]
    outcome = res.outcome()
    assert set(outcome) == {"attribution", "ablation", "unmasked"}
    assert outcome["unmasked"]["replication"] == np.mean([r["replicated_unmasked"] for r in res.outcome_rows])
    assert "outcome" in saved and "whose masking most breaks the replication" in res.table()


def test_bench_explain_scores_the_steps_it_is_given(memlab_manifest, monkeypatch):
    from diffmem.core.loading import load_pipeline
    from diffmem.detect import NoiseNormDetector
    from diffmem.explain import TokenAblation, TokenAttribution

    scored = set()  # the steps of every explainer and detector the bench runs
    for cls in (TokenAttribution, TokenAblation, NoiseNormDetector):
        init = cls.__init__

        def recording(self, *args, _init=init, **kw):
            _init(self, *args, **kw)
            settings = self.settings if isinstance(self.settings, dict) else self.settings.to_dict()
            scored.add((type(self).__name__, tuple(settings["steps"])))

        monkeypatch.setattr(cls, "__init__", recording)
    pipe = load_pipeline("memlab")
    res = bench_explain(pipe, memlab_manifest, max_prompts=1, outcome_seeds=0, progress=False, scored_steps=(2, 0))
    monkeypatch.undo()
    assert scored == {(name, (0, 2)) for name in ("TokenAttribution", "TokenAblation", "NoiseNormDetector")}
    assert res.settings["steps"] == [0, 2] and "| sampling steps scored (explainers and flagging detector) | [0, 2] |" in res.table()
    row, s = res.trigger_rows[0], res.settings
    for name, explainer in (("attribution", TokenAttribution), ("ablation", TokenAblation)):
        direct = explainer(pipe, s["num_inference_steps"], s["guidance_scale"], steps=[0, 2]).attribute(row["prompt"])
        assert row[f"{name}_top"] == direct.top_word, name


@pytest.mark.slow
def test_masked_outcomes_resume_from_saved_parts(memlab_manifest, tmp_path, monkeypatch):
    import diffmem.bench.explain as bench_module
    from diffmem.core.loading import load_pipeline, sampler_defaults
    from diffmem.explain import TokenAblation, TokenAttribution

    pipe = load_pipeline("memlab")
    d = sampler_defaults(pipe)
    steps, scale = d["num_inference_steps"], d["guidance_scale"]
    ablation = TokenAblation(pipe, steps, scale, steps=(0,))
    entries = memlab_manifest["groups"]["verbatim"][:2]
    prompts, ids = [e["prompt"] for e in entries], [e["image_id"] for e in entries]
    explained = {p: {"attribution": TokenAttribution(pipe, steps, scale).attribute(p), "ablation": ablation.attribute(p)}
                 for p in prompts}
    monkeypatch.setattr(bench_module, "OUTCOME_PART_SIZE", 1)
    args = (pipe, memlab_manifest, ablation, prompts, ids, explained, [0], steps, scale, False)
    whole = bench_module.masked_outcomes(*args, checkpoint=tmp_path / "whole")

    real, done = bench_module._masked_outcome, []

    def killed_at_second(pipe, kernel, ablation, prompt, *a, **k):
        if prompt == prompts[1]:
            raise KeyboardInterrupt
        done.append(prompt)
        return real(pipe, kernel, ablation, prompt, *a, **k)

    monkeypatch.setattr(bench_module, "_masked_outcome", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        bench_module.masked_outcomes(*args, checkpoint=tmp_path / "run")
    done.clear()

    def recorded(pipe, kernel, ablation, prompt, *a, **k):
        done.append(prompt)
        return real(pipe, kernel, ablation, prompt, *a, **k)

    monkeypatch.setattr(bench_module, "_masked_outcome", recorded)
    resumed = bench_module.masked_outcomes(*args, checkpoint=tmp_path / "run")
    assert done == [prompts[1]]  # the first prompt's rows were read back
    assert json.dumps(resumed, sort_keys=True) == json.dumps(whole, sort_keys=True)
    # an explanation that changed (here: the methods swapped) makes its saved rows stale: redone
    done.clear()
    swapped = {p: {"attribution": r["ablation"], "ablation": r["attribution"]} for p, r in explained.items()}
    bench_module.masked_outcomes(*args[:5], swapped, *args[6:], checkpoint=tmp_path / "run")
    assert done == prompts


@pytest.mark.parametrize("max_prompts", [0, -1, 2.5, True])
def test_a_prompt_limit_below_one_is_refused_before_any_work(max_prompts, memlab_manifest):
    # 0 read as "no limit" ran the whole benchmark, and -1 all prompts but the last
    from diffmem.bench.mitigate import bench_mitigate
    from diffmem.core.errors import InputError

    for bench in (bench_explain, bench_categorize, bench_mitigate):
        with pytest.raises(InputError, match="max_prompts must be a whole number of at least 1"):
            bench(None, memlab_manifest, max_prompts=max_prompts)  # no pipeline: nothing may run first
