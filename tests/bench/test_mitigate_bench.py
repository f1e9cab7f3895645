import json

import numpy as np
import pytest


def test_bench_mitigate_one_row_end_to_end(memlab_manifest, tmp_path):
    """The default suite's check (the every-row run below is behind the slow marker)."""
    from diffmem.bench.mitigate import MitigateBenchResult, bench_mitigate
    from diffmem.core.loading import load_pipeline

    res = bench_mitigate(load_pipeline("memlab"), memlab_manifest, generations=1, max_prompts=2, progress=False,
                         max_reference=100, only="EOS positions, from RNA")
    s = res.settings
    assert s["verbatim"] == 1 and s["template"] == 1 and s["reference_prompts"] == 100
    assert [(r["method"], r["setting"]) for r in res.rows] == [
        ("none", "unmitigated"), ("embedding, 5-step loss, EOS positions, from RNA", "target FPR 0.01, lr 0.05, 20 iters")]
    before, row = res.rows
    assert before["replication"] == 1.0  # planted prompts replicate before mitigation
    assert row["target"] == s["calibration_threshold_5_steps"] and "calibration_threshold" not in s  # only its own target
    assert row["untouched"] == 0  # both planted prompts start above it and are changed
    for r in res.rows:
        assert r["replication"] == (r["replication_verbatim"] + r["replication_template"]) / 2
        assert abs(r["alignment"] - (r["alignment_verbatim"] + r["alignment_template"]) / 2) < 1e-12
    res.save(tmp_path)
    saved = json.loads((tmp_path / "bench_mitigate.json").read_text())
    assert [(r["setting"], r["replication"]) for r in saved["rows"]] == [(r["setting"], r["replication"]) for r in res.rows]
    assert "from RNA" in saved["table"]
    assert (tmp_path / "bench_mitigate.png").stat().st_size > 1000
    again = MitigateBenchResult.load(tmp_path)
    assert again.rows == res.rows and again.settings == res.settings and again.table() == res.table()


@pytest.mark.slow
def test_bench_mitigate_small_run(memlab_manifest, tmp_path):
    from diffmem.bench.mitigate import bench_mitigate
    from diffmem.core.loading import load_pipeline

    pipe = load_pipeline("memlab")
    res = bench_mitigate(pipe, memlab_manifest, generations=1, max_prompts=2, progress=False, max_reference=100)
    s = res.settings
    assert s["prompts"] == 2 and s["verbatim"] == 1 and s["template"] == 1  # both groups in a short run
    assert s["reference_prompts"] == 100
    rows = {(r["method"], r["setting"]): r for r in res.rows}
    assert rows[("none", "unmitigated")]["replication"] == 1.0  # planted prompts replicate before mitigation
    fpr1 = rows[("embedding", "target FPR 0.01, lr 0.05, 10 iters")]
    median = rows[("embedding", "target median, lr 0.05, 20 iters")]
    assert fpr1["target"] == s["calibration_threshold"] > median["target"] == s["median_threshold"]
    assert median["untouched"] == 0  # planted prompts start above the median non-memorized loss
    five = rows[("embedding, 5-step loss", "target FPR 0.01, lr 0.05, 20 iters")]
    assert five["target"] == s["calibration_threshold_5_steps"] > s["calibration_threshold"]  # a mean over later steps too
    eos = rows[("embedding, 5-step loss, EOS positions", "target FPR 0.01, lr 0.05, 20 iters")]
    eos40 = rows[("embedding, 5-step loss, EOS positions", "target FPR 0.01, lr 0.05, 40 iters")]
    assert eos["target"] == eos40["target"] == five["target"]
    for r in res.rows:
        assert 0.0 <= r["replication"] <= 1.0 and 0.0 <= r["alignment"] <= 1.0
        # one prompt per group: the per-group columns are that prompt's own figures, and average to the whole
        assert r["replication"] == (r["replication_verbatim"] + r["replication_template"]) / 2
        assert abs(r["alignment"] - (r["alignment_verbatim"] + r["alignment_template"]) / 2) < 1e-12
    saved = json.loads(res.save(tmp_path)["json"].read_text())
    assert len(saved["rows"]) == len(res.rows) and "target median" in saved["table"]
    assert "verbatim repl. / align." in saved["table"] and "EOS positions" in saved["table"]
    assert (tmp_path / "bench_mitigate.png").stat().st_size > 1000
    assert np.isfinite([r["seconds_per_prompt"] for r in res.rows]).all()


def test_bench_mitigate_only_computes_just_the_targets_its_rows_need(memlab_manifest):
    from diffmem.bench.mitigate import bench_mitigate
    from diffmem.core.loading import load_pipeline

    pipe = load_pipeline("memlab")
    res = bench_mitigate(pipe, memlab_manifest, generations=1, max_prompts=2, progress=False, only="rta, 4 tokens")
    assert [(r["method"], r["setting"]) for r in res.rows] == [("none", "unmitigated"), ("rta", "4 tokens, random places")]
    assert not any("threshold" in k for k in res.settings)  # no calibration ran


def test_bench_mitigate_only_refuses_a_text_matching_no_row_before_any_work(memlab_manifest):
    import pytest

    from diffmem.bench.mitigate import bench_mitigate
    from diffmem.core.errors import InputError
    from diffmem.core.loading import load_pipeline

    pipe = load_pipeline("memlab")
    with pytest.raises(InputError, match="no benchmark row matches 'nope'"):
        bench_mitigate(pipe, memlab_manifest, generations=1, max_prompts=2, progress=False, only="nope")
    for blank in ("", " ", ", "):  # in every row's name: it would run the whole benchmark
        with pytest.raises(InputError, match="only must name part of a row's"):
            bench_mitigate(pipe, memlab_manifest, generations=1, max_prompts=2, progress=False, only=blank)


def _interrupted():
    raise KeyboardInterrupt  # a kill while this row runs


@pytest.mark.slow
def test_bench_mitigate_resumes_from_its_saved_rows(memlab_manifest, tmp_path):
    """A killed benchmark keeps its finished rows; a re-run computes only the rest and equals an
    uninterrupted run; ``only`` lists the rows saved before; ``redo`` and other settings recompute."""
    from diffmem.bench.mitigate import bench_mitigate
    from diffmem.core.loading import load_pipeline
    from diffmem.mitigate import BASELINES

    pipe = load_pipeline("memlab")
    kw = dict(seed=0, num_inference_steps=25, guidance_scale=5.0)
    made = []

    def real(name, generations=1, **settings):
        def make():
            made.append(name)
            return BASELINES[name](pipe, **settings, generations=generations, **kw)
        return make

    rta, rna = ("rta", "4 tokens"), ("rna", "4 numbers")
    run = dict(generations=1, max_prompts=2, progress=False, rows_dir=tmp_path / "rows")
    with pytest.raises(KeyboardInterrupt):
        bench_mitigate(pipe, memlab_manifest, methods={rta: real("rta", n_tokens=4), rna: _interrupted}, **run)
    assert made == ["rta"] and len(list((tmp_path / "rows").glob("*.json"))) == 2  # unmitigated + RTA

    made.clear()
    resumed = bench_mitigate(pipe, memlab_manifest, methods={rta: _interrupted, rna: real("rna", n_numbers=4)}, **run)
    assert made == ["rna"] and resumed.settings["reused_rows"] == ["rta, 4 tokens"]
    whole = bench_mitigate(pipe, memlab_manifest, generations=1, max_prompts=2, progress=False,
                           methods={rta: real("rta", n_tokens=4), rna: real("rna", n_numbers=4)})
    timeless = [[{k: v for k, v in r.items() if k != "seconds_per_prompt"} for r in res.rows] for res in (resumed, whole)]
    assert timeless[0] == timeless[1] and [r["method"] for r in resumed.rows] == ["none", "rta", "rna"]

    made.clear()  # only: runs nothing saved, and lists every row saved under the same settings
    listed = bench_mitigate(pipe, memlab_manifest, methods={rta: _interrupted, rna: _interrupted}, only="rna", **run)
    assert made == [] and listed.rows == resumed.rows
    (unmitigated,) = (tmp_path / "rows").glob("none-unmitigated-*.json")
    unmitigated.unlink()  # every row saved but this one: regenerated without re-running any method
    assert bench_mitigate(pipe, memlab_manifest, methods={rta: _interrupted, rna: _interrupted}, **run).rows == resumed.rows
    assert made == [] and unmitigated.is_file()
    redone = bench_mitigate(pipe, memlab_manifest, methods={rta: _interrupted, rna: real("rna", n_numbers=4)},
                            only="rna", redo=True, **run)
    assert made == ["rna"] and redone.settings["reused_rows"] == ["rta, 4 tokens"]
    assert [r["replication"] for r in redone.rows] == [r["replication"] for r in resumed.rows]

    made.clear()  # another seed count: the saved rows are another benchmark's, recomputed
    other = bench_mitigate(pipe, memlab_manifest, methods={rta: real("rta", n_tokens=4, generations=2)},
                           **{**run, "generations": 2})
    assert made == ["rta"] and "reused_rows" not in other.settings and len(other.rows) == 2


@pytest.mark.slow
def test_bench_mitigate_recomputes_rows_saved_before_a_method_changed(memlab_manifest, tmp_path, monkeypatch):
    # the baselines' rewrite changed with the same settings (892da4b): rows saved by the earlier code
    # were read back as this code's unless renamed, and only --redo recomputed them
    from diffmem.bench.mitigate import bench_mitigate
    from diffmem.core.loading import load_pipeline
    from diffmem.mitigate import BASELINES, GaussianNoiseInjection
    from doubles import bump_revision

    pipe = load_pipeline("memlab")
    made = []

    def gni():
        made.append("gni")
        return BASELINES["gni"](pipe, sigma=0.1, generations=1, seed=0, num_inference_steps=25, guidance_scale=5.0)

    run = dict(methods={("gni", "sigma 0.1"): gni}, generations=1, max_prompts=2, progress=False, rows_dir=tmp_path / "rows")
    first = bench_mitigate(pipe, memlab_manifest, **run)
    assert bench_mitigate(pipe, memlab_manifest, **run).rows == first.rows and made == ["gni"]  # read back
    bump_revision(monkeypatch, GaussianNoiseInjection)
    again = bench_mitigate(pipe, memlab_manifest, **run)
    assert made == ["gni", "gni"] and "reused_rows" not in again.settings
    # so are rows measured by an earlier revision of a measure
    from diffmem.mitigate.measures import MemLabAlignment, MemLabReplication

    for measure, runs in ((MemLabAlignment, 3), (MemLabReplication, 4)):
        bump_revision(monkeypatch, measure)
        bench_mitigate(pipe, memlab_manifest, **run)
        assert made == ["gni"] * runs, measure


@pytest.mark.slow
def test_bench_mitigate_command_adds_a_row_to_the_saved_ones(tmp_path):
    from forked_cli import run_cli

    out = tmp_path / "bench"
    common = ["bench", "mitigate", "--generations", "1", "--max-prompts", "2", "--out", out]
    for only in ("rta, 4 tokens", "rna, 4 numbers"):
        done = run_cli(*common, "--only", only)
        assert done.returncode == 0, done.stderr
    saved = json.loads((out / "bench_mitigate.json").read_text())
    assert [(r["method"], r["setting"]) for r in saved["rows"]] == [
        ("none", "unmitigated"), ("rta", "4 tokens, random places"), ("rna", "4 numbers, random places")]
    assert saved["settings"]["reused_rows"] == ["rta, 4 tokens, random places"] and "rna" in saved["table"]


def test_trade_off_labels_keep_off_each_other_and_the_points():
    """Crowded rows (as RTA-4 / RTA-10 / RNA are on MemLab) get labels that neither overlap one
    another nor cover a point; the plain offset the plot used before overlapped here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    from diffmem.bench.mitigate import _label_points

    points = [(0.23, 0.981), (0.25, 0.982), (0.16, 0.992), (0.0, 0.986), (0.07, 0.929), (0.07, 0.921)]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(*zip(*points), "o")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(0.70, 1.0)
    _label_points(ax, [(xy, f"setting number {i}", "k") for i, xy in enumerate(points)])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == len(points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    for x, y in (ax.transData.transform(xy) for xy in points):
        assert not any(b.overlaps(Bbox.from_extents(x - 2, y - 2, x + 2, y + 2)) for b in boxes)
    plt.close(fig)


def test_a_method_with_another_seed_count_is_refused(tmp_path, memlab_manifest):
    """A method built for 1 generation in a 2-generation benchmark was measured with its images and the
    prompts out of step (alignment's zip dropped the surplus unsaid)."""
    from diffmem.bench.mitigate import bench_mitigate
    from diffmem.core.errors import InputError
    from diffmem.core.loading import load_pipeline
    from diffmem.mitigate import BASELINES

    pipe = load_pipeline("memlab")
    one_seed = lambda: BASELINES["rna"](pipe, n_numbers=4, generations=1, num_inference_steps=4)  # noqa: E731
    with pytest.raises(InputError, match="generates 1 image\\(s\\) per prompt, the benchmark 2"):
        bench_mitigate(pipe, memlab_manifest, generations=2, max_prompts=2, progress=False, max_reference=4,
                       methods={("rna", "4 numbers"): one_seed}, rows_dir=tmp_path / "rows")
