import json
import numpy as np
import pytest

from diffmem.bench.detect import LabelledPrompts, bench_detect, labelled_from_files, roc
from diffmem.core.errors import InputError


def test_tpr_at_1pct_fpr_is_taken_below_the_bar():
    # 200 negatives: one scores above every positive -> FPR 0.005 < 0.01 counts, TPR there is 1
    neg = np.r_[np.linspace(0, 1, 199), 10.0]
    pos = np.linspace(2, 3, 50)
    r = roc(np.r_[np.ones(50), np.zeros(200)], np.r_[pos, neg])
    assert r["tpr_at_1pct_fpr"] == 1.0 and 0.99 < r["auc"] < 1.0
    # 100 negatives: the same single outlier is FPR 0.01, not below it -> TPR at FPR 0 is 0
    neg = np.r_[np.linspace(0, 1, 99), 10.0]
    r = roc(np.r_[np.ones(50), np.zeros(100)], np.r_[pos, neg])
    assert r["tpr_at_1pct_fpr"] == 0.0


def test_grid_on_a_tiny_pipeline(tiny_pipe, tmp_path):
    data = LabelledPrompts(["a cat", "a dog", "a red circle", "a blue square"], np.array([1, 1, 0, 0.0]), ["x"] * 4, "test")
    res = bench_detect(tiny_pipe, data, generations=(1, 2), num_inference_steps=5, guidance_scale=7.5, progress=False)
    assert {(r["steps"], r["generations"]) for r in res.grid} == {
        (s, g) for s in ("first step", "first 2 steps", "all 5 steps") for g in (1, 2)}
    files = res.save(tmp_path)
    assert files["png"].stat().st_size > 1000 and "AUC" in res.table()
    # both black-box views in the same table
    assert [r["name"] for r in res.extra_rows] == ["seed consistency (black box, x0 after 1 step)",
                                                  "seed consistency (black box, full images)"]
    assert all(r["name"] in res.table() for r in res.extra_rows)
    # a grid cell equals a detector run with exactly those settings
    from diffmem.detect import NoiseNormDetector

    direct = NoiseNormDetector(tiny_pipe, 5, 7.5, steps=[0], generations=2).score(data.prompts)
    cell = next(r for r in res.grid if r["steps"] == "first step" and r["generations"] == 2)
    assert cell["auc"] == roc(data.labels, direct.scores)["auc"]


def test_subsets_and_hardest_negatives(tiny_pipe, tmp_path):
    prompts = ["a cat", "a dog", "a red circle", "a blue square", "a green ring", "a lucky star"]
    data = LabelledPrompts(prompts, np.array([1, 1, 0, 0, 0, 0.0]), ["x"] * 6, "test", {"no star": np.arange(5)})
    res = bench_detect(tiny_pipe, data, generations=(1,), num_inference_steps=5, guidance_scale=7.5, progress=False,
                       black_box=False)
    assert res.subset_sizes == {"no star": [2, 3]}
    from diffmem.detect import NoiseNormDetector

    direct = NoiseNormDetector(tiny_pipe, 5, 7.5, steps=[0], generations=1).score(prompts).scores
    cell = next(r for r in res.subset_grids["no star"] if r["steps"] == "first step")
    assert cell["auc"] == roc(data.labels[:5], direct[:5])["auc"]
    hard = [h["prompt"] for h in res.hardest_negatives]
    assert hard == [prompts[i] for i in 2 + np.argsort(-direct[2:])]
    saved = json.loads(res.save(tmp_path)["json"].read_text())
    assert saved["subsets"]["no star"]["n_neg"] == 3 and "no star" in saved["table"]
    # a main split: the grid and the black-box rows on its rows only, the full set as a subset
    data = LabelledPrompts(prompts, data.labels, ["x"] * 6, "test", {"all": np.arange(6)}, main=np.arange(5))
    res = bench_detect(tiny_pipe, data, generations=(1,), num_inference_steps=5, guidance_scale=7.5, progress=False,
                       black_box_modes=("x0",))
    assert (res.n_pos, res.n_neg) == (2, 3) and res.subset_sizes == {"all": [2, 4]}
    assert next(r for r in res.grid if r["steps"] == "first step")["auc"] == roc(data.labels[:5], direct[:5])["auc"]
    assert res.subset_extra_rows["all"][0]["name"] == res.extra_rows[0]["name"]


def test_memlab_negatives_exclude_feature_word_captions():
    from diffmem.bench.detect import memlab_feature_words, memlab_labelled
    from diffmem.memlab.verify import load_manifest

    m = load_manifest("memlab")
    words = memlab_feature_words(m)
    assert "lucky" in words  # the planted unintended stamp's word
    data = memlab_labelled(m)
    main = set(data.main_rows().tolist())
    (name, everything), = data.subsets.items()
    assert sorted(everything.tolist()) == list(range(len(data.prompts)))
    for i, (p, y, g) in enumerate(zip(data.prompts, data.labels, data.groups)):
        names_word = bool(words & set(p.split()))
        # every positive is in the main split; a negative is exactly when it names no feature word
        assert (i in main) == (y == 1 or not names_word), p
        assert g.endswith("+feature") == (y == 0 and names_word), (p, g)
    n_feature = len(data.prompts) - len(main)
    assert 100 < n_feature < (1 - data.labels).sum() and str(n_feature) in name
    # the literal split as the main one, the clean split beside it
    literal = memlab_labelled(m, feature_word_negatives=True)
    assert len(literal.main_rows()) == len(data.prompts)
    assert set(next(iter(literal.subsets.values())).tolist()) == main


def test_labelled_files(tmp_path):
    (tmp_path / "l.csv").write_text("prompt,label\na,1\nb,0\nc,memorized\n")
    d = labelled_from_files(str(tmp_path / "l.csv"))
    assert d.prompts == ["a", "b", "c"] and list(d.labels) == [1, 0, 1]
    (tmp_path / "bad.csv").write_text("prompt,label\na,maybe\n")
    with pytest.raises(InputError, match="line 2"):
        labelled_from_files(str(tmp_path / "bad.csv"))
    with pytest.raises(InputError, match="both --positives and --negatives"):
        labelled_from_files(positives=str(tmp_path / "l.csv"))


def test_a_one_class_labelled_set_is_refused_before_any_scoring(tmp_path):
    # the check used to come after every prompt was scored: hours lost on a large set
    (tmp_path / "pos.csv").write_text("prompt,label\na,1\nb,true\n")
    with pytest.raises(InputError, match="both memorized and non-memorized"):
        labelled_from_files(str(tmp_path / "pos.csv"))
    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "empty_neg.csv").write_text("prompt\n")
    with pytest.raises(InputError):
        labelled_from_files(positives=str(tmp_path / "p.txt"), negatives=str(tmp_path / "empty_neg.csv"))
    with pytest.raises(InputError, match="main split"):
        LabelledPrompts(["a", "b", "c"], np.array([1.0, 0.0, 1.0]), ["g"] * 3, "test", main=np.array([0, 2]))


def test_a_killed_bench_resumes_from_its_saved_parts(tiny_pipe, tmp_path, monkeypatch):
    import diffmem.bench.detect as bench_module
    from diffmem.detect import NoiseNormDetector

    monkeypatch.setattr(bench_module, "PART_SIZE", 2)  # two parts of the four prompts
    data = LabelledPrompts(["a cat", "a dog", "a red circle", "a blue square"], np.array([1, 1, 0, 0.0]), ["x"] * 4, "test")
    kw = dict(generations=(1,), num_inference_steps=5, guidance_scale=7.5, progress=False, black_box_modes=("x0",))
    whole = bench_detect(tiny_pipe, data, checkpoint=tmp_path / "whole", **kw)

    real, scored = NoiseNormDetector.score, []

    def killed_in_second_part(self, prompts, *a, **k):
        if "a red circle" in prompts:
            raise KeyboardInterrupt
        scored.append(list(prompts))
        return real(self, prompts, *a, **k)

    monkeypatch.setattr(NoiseNormDetector, "score", killed_in_second_part)
    with pytest.raises(KeyboardInterrupt):
        bench_detect(tiny_pipe, data, checkpoint=tmp_path / "run", **kw)
    assert scored == [["a cat", "a dog"]]

    def recorded(self, prompts, *a, **k):
        scored.append(list(prompts))
        return real(self, prompts, *a, **k)

    scored.clear()
    monkeypatch.setattr(NoiseNormDetector, "score", recorded)
    resumed = bench_detect(tiny_pipe, data, checkpoint=tmp_path / "run", **kw)
    assert scored == [["a red circle", "a blue square"]]  # the first part was read back, not scored again
    assert json.dumps([resumed.grid, resumed.extra_rows, resumed.hardest_negatives], sort_keys=True) == \
        json.dumps([whole.grid, whole.extra_rows, whole.hardest_negatives], sort_keys=True)
    # and the parts make no difference to the figures: the same as scoring the list in one go
    plain = bench_detect(tiny_pipe, data, **kw)
    assert [r["auc"] for r in plain.grid] == [r["auc"] for r in whole.grid]
