import json

import numpy as np


def test_bench_mitigate_small_run(memlab_manifest, tmp_path):
    from diffmem.bench.mitigate import bench_mitigate
    from diffmem.core.loading import load_pipeline

    pipe = load_pipeline("memlab")
    res = bench_mitigate(pipe, memlab_manifest, generations=1, max_prompts=2, progress=False)
    s = res.settings
    assert s["prompts"] == 2 and s["verbatim"] == 1 and s["template"] == 1  # both groups in a short run
    rows = {(r["method"], r["setting"]): r for r in res.rows}
    assert rows[("none", "unmitigated")]["replication"] == 1.0  # planted prompts replicate before mitigation
    fpr1 = rows[("embedding", "target FPR 0.01, lr 0.05, 10 iters")]
    median = rows[("embedding", "target median, lr 0.05, 20 iters")]
    assert fpr1["target"] == s["calibration_threshold"] > median["target"] == s["median_threshold"]
    assert median["untouched"] == 0  # planted prompts start above the median non-memorized loss
    five = rows[("embedding, 5-step loss", "target FPR 0.01, lr 0.05, 20 iters")]
    assert five["target"] == s["calibration_threshold_5_steps"] > s["calibration_threshold"]  # a mean over later steps too
    for r in res.rows:
        assert 0.0 <= r["replication"] <= 1.0 and 0.0 <= r["alignment"] <= 1.0
    saved = json.loads(res.save(tmp_path)["json"].read_text())
    assert len(saved["rows"]) == len(res.rows) and "target median" in saved["table"]
    assert (tmp_path / "bench_mitigate.png").stat().st_size > 1000
    assert np.isfinite([r["seconds_per_prompt"] for r in res.rows]).all()
