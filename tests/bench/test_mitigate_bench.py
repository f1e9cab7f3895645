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
    assert isinstance(res, MitigateBenchResult)


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
    assert [(r["method"], r["setting"]) for r in res.rows] == [("none", "unmitigated"), ("rta", "4 tokens")]
    assert not any("threshold" in k for k in res.settings)  # no calibration ran


def test_bench_mitigate_only_refuses_a_text_matching_no_row_before_any_work(memlab_manifest):
    import pytest

    from diffmem.bench.mitigate import bench_mitigate
    from diffmem.core.errors import InputError
    from diffmem.core.loading import load_pipeline

    pipe = load_pipeline("memlab")
    with pytest.raises(InputError, match="no benchmark row matches 'nope'"):
        bench_mitigate(pipe, memlab_manifest, generations=1, max_prompts=2, progress=False, only="nope")
