"""The score histogram diffmem detect writes beside its results, and the audit's report draws."""

import numpy as np


def test_the_histogram_counts_every_score_and_marks_the_threshold():
    from diffmem.detect.plot import score_figure

    rng = np.random.default_rng(0)
    scores, reference = rng.normal(0.3, 0.05, 130), rng.normal(0.25, 0.05, 300)
    ax = score_figure(scores, 0.4, reference, caption="settings").axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == 130 + 300  # both histograms, every prompt in a bar
    assert [ln.get_xdata()[0] for ln in ax.lines] == [0.4]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["reference (non-memorized), n=300", "scored prompts, n=130", "threshold 0.4"]
    # no calibration: no threshold line; one distinct score still gets its bar
    ax = score_figure(np.full(5, 0.2)).axes[0]
    assert len(ax.lines) == 0 and sum(p.get_height() for p in ax.patches) == 5


def test_detect_writes_the_histogram_beside_its_results(tmp_path, tiny_pipe):
    from diffmem.detect import Calibration, NoiseNormDetector
    from diffmem.detect.run import detect_file

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na red circle\n")
    det = NoiseNormDetector(tiny_pipe, num_inference_steps=4, guidance_scale=5.0)
    cal = Calibration.fit(det.score([f"reference prompt {i}" for i in range(10)]), fpr=0.1)
    summary = detect_file(det, prompts, tmp_path / "r.parquet", calibration=cal, progress=False)
    assert np.array_equal(summary.scores, np.asarray(det.score(["a cat", "a dog", "a red circle"]).scores, np.float32))
    assert summary.plot(tmp_path / "r.png").stat().st_size > 1000


def test_the_histogram_names_the_detector_that_scored(tmp_path, tiny_pipe):
    from diffmem.detect import NoiseNormDetector, SeedConsistencyDetector
    from diffmem.detect.plot import score_figure
    from diffmem.detect.run import detect_file

    assert score_figure(np.ones(3)).axes[0].get_xlabel() == "text-conditional noise norm (Wen et al.)"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    for det, axis in ((NoiseNormDetector(tiny_pipe, 4, 5.0), "noise norm"),
                      (SeedConsistencyDetector(tiny_pipe, "x0", 2, 4, 5.0), "seed consistency")):
        summary = detect_file(det, prompts, tmp_path / f"{det.method}.parquet", progress=False)
        assert summary.method == det.method
        assert summary.plot(tmp_path / f"{det.method}.png").stat().st_size > 1000
        assert axis in score_figure(summary.scores, method=summary.method).axes[0].get_xlabel()


def test_a_detection_result_names_its_settings_as_the_detector_that_made_it(tiny_pipe):
    # the histogram of `diffmem detect` and the audit's report worded them each their own way
    from diffmem.detect import NoiseNormDetector, SeedConsistencyDetector
    from diffmem.detect.plot import settings_caption

    norm = NoiseNormDetector(tiny_pipe, 4, 5.0, steps=(0, 2), generations=2, seed=3).score(["a cat"])
    assert settings_caption(norm.method, norm.settings, norm.seeds) == \
        "4 steps, guidance 5.0, scored step(s) 0,2, 2 generations from seed 3"
    for mode, made in (("x0", "first-step x0"), ("images", "full images")):
        consistency = SeedConsistencyDetector(tiny_pipe, mode, 3, 4, 5.0).score(["a cat"])
        assert settings_caption(consistency.method, consistency.settings, consistency.seeds) == \
            f"4 steps, guidance 5.0, {made} of 3 generations from seed 0"
