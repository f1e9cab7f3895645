import json
import os
import shutil
import signal
import subprocess
import time
import warnings

import numpy as np
import pytest
import torch

from diffmem.core.errors import InputError, ModelLoadError
from diffmem.report.audit import Audit, AuditResult, AuditSettings, memlab_audit_prompts

from .conftest import DIFFMEM, run_cli


def test_memlab_audit_finds_the_planted_prompts(memlab_audit, memlab_manifest):
    out, run = memlab_audit
    from diffmem.detect.noise_norm import DetectionResult
    from diffmem.memlab import dataset as ds

    det = DetectionResult.load(out / "detect" / "detections.parquet")
    planted = set(ds.prompts(memlab_manifest, "verbatim")) | set(ds.prompts(memlab_manifest, "template"))
    flagged = {p for p, v in zip(det.prompts, det.verdicts) if v}
    audited_planted = planted & set(det.prompts)
    assert len(audited_planted) == 100
    recall = len(flagged & audited_planted) / len(audited_planted)
    negatives = [p for p in det.prompts if p not in planted]
    fp_rate = len([p for p in negatives if p in flagged]) / len(negatives)
    assert recall >= 0.95
    assert fp_rate <= 0.05  # calibrated at 0.01 on a disjoint reference set of 500
    summary = json.loads((out / "audit.json").read_text())["stages"]
    assert summary["detect"]["summary"]["recall"] == pytest.approx(recall)
    assert f"planted recall {recall:.3f}" in run.stdout
    # every stage ran and left its results
    for stage in ("detect", "explain", "categorize", "mitigate"):
        assert summary[stage]["status"] == "done" and (out / stage / "stage.json").exists()
    assert summary["scan"]["status"] == "skipped"
    attributions = json.loads((out / "explain" / "attributions.json").read_text())["attributions"]
    assert len(attributions) == 12 and all(a["prompt"] in flagged for a in attributions)
    mit = json.loads((out / "mitigate" / "mitigation.json").read_text())
    assert len(mit["prompts"]) == 2 and set(mit["prompts"]) <= flagged
    # the target is a calibration of the loss (steps 0-4, the mitigation's seeds), not the detection threshold
    target = json.loads((out / "mitigate" / "target_calibration.json").read_text())
    assert mit["settings"]["target"] == target["threshold"] == summary["mitigate"]["summary"]["target"]
    assert mit["settings"]["loss_steps"] == 5 and mit["settings"]["positions"] == AuditSettings.mitigate_positions
    assert target["settings"]["steps"] == [0, 1, 2, 3, 4] and target["settings"]["generations"] == 1
    # the two strongest planted prompts start above it, so the mitigation changes them (from their RNA
    # rewrite, optimized while still above the target) and brings them below it
    assert mit["settings"]["rewrite"] == AuditSettings.mitigate_rewrite == "rna"
    assert all(l0 > target["threshold"] for l0 in mit["initial_loss"])
    assert all(p != q and q.startswith(p + " ") for p, q in zip(mit["prompts"], mit["mitigated_prompts"]))
    assert all(f < l0 for f, l0 in zip(mit["final_loss"], mit["initial_loss"]))
    assert np.mean(mit["measures"]["replication_before"]) > 0.5  # planted content (image or template layout)
    prof = json.loads((out / "categorize" / "profile.json").read_text())
    assert len(prof["prompts"]) == 2 + 4  # two flagged, four unflagged controls


def test_app_from_an_audit_mitigates_with_the_audits_loss(memlab_audit):
    from diffmem.report.app import AppState

    out, _ = memlab_audit
    target = json.loads((out / "mitigate" / "target_calibration.json").read_text())
    m = AppState(audit=out)._mitigator()
    assert m.settings["target"] == target["threshold"]
    assert m.settings["loss_steps"] == 5 and m.settings["generations"] == 1 and m.settings["seed"] == target["settings"]["seed"]
    done = json.loads((out / "mitigate" / "mitigation.json").read_text())["settings"]
    assert m.settings["positions"] == done["positions"] and m.settings["rewrite"] == done["rewrite"]


def test_tests_of_the_memlab_audit_share_one_worker(memlab_audit, request):
    """Run by pytest-xdist with --dist loadgroup, a test of the costly audit carries its group
    (tests/conftest.py), so the audit is built on one worker only. pytest 9.2 drops the groups
    without a word (pytest-xdist issue 1386): this says so instead of the suite just running slower."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not request.config.getvalue("loadgroup"):
        pytest.skip("not run by pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@memlab_audit"), request.node.nodeid


def test_memlab_audit_sets_are_disjoint(memlab_manifest):
    ap = memlab_audit_prompts(memlab_manifest)
    assert not set(ap.reference) & set(ap.prompts)
    assert len(ap.prompts) == 300 and ap.labels.sum() == 100 and len(ap.reference) == 500


def test_report_holds_every_section(memlab_audit):
    out, _ = memlab_audit
    html = (out / "report.html").read_text()
    for section in ('id="summary"', 'id="scores"', 'id="roc"', 'id="flagged"', 'class="diffmem-attribution"',
                    "before and after mitigation", "what is memorized"):
        assert section in html, section
    assert "src=\"http" not in html and "href=\"http" not in html  # self-contained: nothing fetched
    assert html.count('<div class="prompt"') >= 95
    # each explained prompt's top word says how far it leads the second (or that it is a near tie)
    attributions = json.loads((out / "explain" / "attributions.json").read_text())["attributions"]
    from diffmem.explain import AttributionResult
    from markupsafe import escape

    for a in map(AttributionResult.from_dict, attributions):
        assert a.lead_text() and f"strongest: <b>{escape(a.top_word)}</b>, {escape(a.lead_text())}." in html


def test_rerun_reuses_finished_stages_and_settings_change_redoes_them(memlab_audit, tmp_path):
    out, _ = memlab_audit
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    stamps = {s: (copy / s / "stage.json").stat().st_mtime_ns for s in ("detect", "explain", "categorize", "mitigate")}
    from .conftest import SMALL

    r = run_cli("audit", "--out", copy, *SMALL, "--mitigate-generations", "1", "--max-explain", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    stages = AuditResult.load(copy).stages
    assert stages["detect"]["status"] == "reused" and stages["categorize"]["status"] == "reused"
    assert stages["explain"]["status"] == "done"  # --max-explain changed
    assert "detect: reused (saved earlier with the same settings)" in r.stdout + r.stderr
    assert (copy / "detect" / "stage.json").stat().st_mtime_ns == stamps["detect"]
    assert len(json.loads((copy / "explain" / "attributions.json").read_text())["attributions"]) == 3
    # another explainer is another explain stage: the word ablation of the same steps, in the report
    r = run_cli("audit", "--out", copy, *SMALL, "--mitigate-generations", "1", "--max-explain", "2",
                "--explain-method", "ablation")
    assert r.returncode == 0, r.stderr[-2000:]
    stages = AuditResult.load(copy).stages
    assert stages["explain"]["status"] == "done" and stages["mitigate"]["status"] == "reused"
    from diffmem.core.loading import load_pipeline, sampler_defaults
    from diffmem.explain import TokenAblation

    items = json.loads((copy / "explain" / "attributions.json").read_text())["attributions"]
    assert len(items) == 2 and {it["method"] for it in items} == {"token_ablation"}
    pipe = load_pipeline("memlab")
    d = sampler_defaults(pipe)
    direct = TokenAblation(pipe, d["num_inference_steps"], d["guidance_scale"], steps=items[0]["settings"]["steps"]).attribute(items[0]["prompt"])
    assert items[0]["settings"]["steps"] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(items[0]["word_scores"], direct.word_scores, rtol=1e-4, atol=1e-6)
    assert "word ablation (score drop with the word masked)" in (copy / "report.html").read_text()
    with pytest.raises(InputError, match="--explain-method must be one of attribution, ablation"):
        AuditSettings(explain_method="gradcam")


def test_killed_during_mitigation_resumes_only_that_stage(tmp_path, memlab_manifest):
    from diffmem.memlab import dataset as ds

    prompts = tmp_path / "prompts.txt"
    planted = ds.prompts(memlab_manifest, "verbatim")[:12]
    prompts.write_text("\n".join(planted + ds.prompts(memlab_manifest, "novel")[:8]) + "\n")
    reference = tmp_path / "reference.txt"
    reference.write_text("\n".join(ds.prompts(memlab_manifest, "control")[:100]) + "\n")
    out = tmp_path / "out"
    args = ["audit", "--out", str(out), "--prompts", str(prompts), "--reference", str(reference), "--fpr", "0.05",
            "--skip", "categorize", "--max-explain", "2", "--max-mitigate", "12", "--mitigate-generations", "1", "--mitigate-iters", "3"]
    proc = subprocess.Popen([*DIFFMEM, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first_part = out / "mitigate" / "parts" / "part_0000" / "done.json"
    t0 = time.time()
    while not first_part.exists():
        assert proc.poll() is None, "the audit ended before the mitigation stage saved its first part"
        assert time.time() - t0 < 600
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "mitigate" / "stage.json").exists()
    before = {s: (out / s / "stage.json").stat().st_mtime_ns for s in ("detect", "explain")}
    part0 = first_part.stat().st_mtime_ns

    r = run_cli(*args, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    stages = AuditResult.load(out).stages
    assert [stages[s]["status"] for s in ("detect", "explain", "mitigate")] == ["reused", "reused", "done"]
    assert {s: (out / s / "stage.json").stat().st_mtime_ns for s in before} == before
    assert first_part.stat().st_mtime_ns == part0  # the saved part was kept, not redone
    mit = json.loads((out / "mitigate" / "mitigation.json").read_text())
    assert len(mit["prompts"]) == 12 and set(mit["prompts"]) <= set(planted)
    assert (out / "report.html").exists()


@pytest.mark.parametrize("case", ["missing_model", "empty_prompts", "unwritable_out", "one_seed_to_compare",
                                  "column_without_train_data", "empty_train_data_for_mitigation"])
def test_bad_input_fails_before_any_work(tmp_path, case):
    out = tmp_path / "out"
    args = ["audit", "--out", out]
    if case == "one_seed_to_compare":
        args += ["--detect-method", "seed-consistency", "--generations", "1"]
        expect = "--generations must be at least 2, got 1"
    elif case == "column_without_train_data":
        args += ["--train-caption-column", "TEXT"]
        expect = "--train-caption-column names a column of --train-data: give it too"
    elif case == "empty_train_data_for_mitigation":  # with the scan skipped, it said "nothing to scan"
        (tmp_path / "header.csv").write_text("image,caption\n")
        args += ["--train-data", tmp_path / "header.csv", "--skip", "scan"]
        expect = "header.csv has zero rows: no training images to compare generations with"
    elif case == "missing_model":
        args += ["--model", tmp_path / "no-such-model"]
        expect = "not found"
    elif case == "empty_prompts":
        empty = tmp_path / "empty.txt"
        empty.write_text("")
        args += ["--prompts", empty]
        expect = "holds no prompts"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "out"
        args = ["audit", "--out", out]
        expect = "not writable"
        if os.geteuid() == 0:  # root writes anywhere: make the output path a file's child instead
            (tmp_path / "file").write_text("x")
            out = tmp_path / "file" / "out"
            args = ["audit", "--out", out]
            expect = "is a file"
    t0 = time.time()
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert time.time() - t0 < 60
    assert not out.exists()


def test_a_folder_that_is_not_an_audit_is_refused_and_left_as_it_was(tmp_path):
    project = tmp_path / "project"
    (project / "notes").mkdir(parents=True)
    (project / "report.html").write_text("<p>the user's own report</p>")
    (project / "notes" / "a.txt").write_text("x")
    r = run_cli("audit", "--out", project, timeout=120)
    assert r.returncode == 2 and "is not an earlier audit" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in project.iterdir()) == ["notes", "report.html"]
    assert (project / "report.html").read_text() == "<p>the user's own report</p>"
    # an audit killed in its first stage left only that stage's folder: it is taken back up
    from diffmem.report.audit import check_audit_folder

    killed = tmp_path / "killed"
    (killed / "detect").mkdir(parents=True)
    check_audit_folder(killed)


def test_settings_errors():
    with pytest.raises(InputError, match="cannot be skipped"):
        AuditSettings(skip=("detect",))
    with pytest.raises(InputError, match="unknown stage"):
        AuditSettings(skip=("nope",))
    with pytest.raises(InputError, match="--mitigate-positions must be one of all, eos"):
        AuditSettings(mitigate_positions="words")
    with pytest.raises(InputError, match="--mitigate-rewrite must be one of rna, rta"):
        AuditSettings(mitigate_rewrite="gni")
    for name in ("max_explain", "max_categorize", "max_mitigate"):
        with pytest.raises(InputError, match=f"--{name.replace('_', '-')} must be 0 or more, got -1"):
            AuditSettings(**{name: -1})
    with pytest.raises(InputError, match="--column names the prompt column of a --prompts file"):
        AuditSettings(column="caption")  # it was ignored: MemLab's own audit set was read


def test_non_memlab_model_needs_prompts(tiny_pipe_dir, tmp_path):
    with pytest.raises(InputError, match="give --prompts and --reference"):
        Audit(AuditSettings(model=str(tiny_pipe_dir)), tmp_path / "o")


def test_prompts_that_are_also_reference_prompts_are_warned_of_before_the_model_loads(tiny_pipe_dir, tmp_path):
    from diffmem.report.audit import resolve_prompts

    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "r.txt").write_text("a cat\na red circle\n")
    settings = AuditSettings(model=str(tiny_pipe_dir), prompts=str(tmp_path / "p.txt"), reference=str(tmp_path / "r.txt"))
    with pytest.warns(UserWarning, match=r"1 of the prompts to judge is also in the reference prompts .*'a red circle'"):
        resolve_prompts(settings)
    (tmp_path / "r.txt").write_text("a cat\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_prompts(settings)


def test_audit_scans_training_data_and_links_triggers(tmp_path, memlab_manifest):
    """With --train-data, the scan's trigger phrases are linked to the flagged prompts that hold them."""
    from diffmem.memlab import dataset as ds

    triggers = [t["trigger"] for t in memlab_manifest["groups"]["template"]]
    test_prompts = ds.prompts(memlab_manifest, "template")[:6]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(test_prompts + ds.prompts(memlab_manifest, "novel")[:6]) + "\n")
    reference = tmp_path / "r.txt"
    reference.write_text("\n".join(ds.prompts(memlab_manifest, "control")[:100]) + "\n")
    out = tmp_path / "out"
    r = run_cli("audit", "--out", out, "--prompts", prompts, "--reference", reference, "--fpr", "0.05",
                "--skip", "explain,categorize,mitigate", "--train-data", "memlab")
    assert r.returncode == 0, r.stderr[-2000:]
    links = json.loads((out / "scan" / "links.json").read_text())["links"]
    flagged_templates = [p for p in test_prompts if p in links]
    assert len(flagged_templates) >= 5
    for p in flagged_templates:
        phrases = {t["phrase"] for t in links[p]["triggers"]}
        assert phrases & {t for t in triggers if t in p}
    html = (out / "report.html").read_text()
    assert "trigger phrase <b>" in html and 'id="scan"' in html


def test_a_stage_in_another_dtype_is_redone(tiny_pipe_dir, tmp_path):
    prompts, reference = tmp_path / "p.txt", tmp_path / "r.txt"
    prompts.write_text("a red circle\na photo of a cat\n")
    reference.write_text("\n".join(f"reference prompt {i}" for i in range(12)) + "\n")
    settings = AuditSettings(model=str(tiny_pipe_dir), prompts=str(prompts), reference=str(reference), steps=(0,),
                             grid=False, skip=("explain", "categorize", "mitigate"))
    out = tmp_path / "audit"

    def detect_status(dtype):
        return Audit(settings, out, progress=False, device="cpu", dtype=dtype).run().stages["detect"]["status"]

    assert detect_status("float32") == "done"
    assert detect_status("float32") == "reused"
    assert detect_status("bfloat16") == "done"  # half precision scores differently: redone
    assert AuditResult.load(out).settings["runs_on"] == {"device": "cpu", "dtype": "torch.bfloat16"}
    assert detect_status("bfloat16") == "reused"


def _small_mitigating_audit(model, tmp_path, skip=("explain", "categorize", "scan")):
    """Settings of an audit that detects and mitigates 2 of 6 prompts with ``model``, and its folder."""
    prompts, reference = tmp_path / "p.txt", tmp_path / "r.txt"
    prompts.write_text("\n".join(f"a red circle number {i}" for i in range(6)) + "\n")
    reference.write_text("\n".join(f"reference prompt {i}" for i in range(12)) + "\n")
    settings = AuditSettings(model=str(model), prompts=str(prompts), reference=str(reference), steps=(0,),
                             grid=False, fpr=0.5, mitigate_iters=2, mitigate_generations=1, max_mitigate=2, skip=skip)
    return settings, tmp_path / "audit"


def test_a_stage_measured_by_an_earlier_revision_of_a_measure_is_redone(tiny_pipe_dir, tmp_path, monkeypatch):
    # revisions covered the methods and not the measures: a stage measured by a measure that has
    # since changed was reused with its old figures
    from doubles import bump_revision

    from diffmem.mitigate import measures

    settings, out = _small_mitigating_audit(tiny_pipe_dir, tmp_path)
    assert Audit(settings, out, progress=False).run().stages["mitigate"]["status"] == "done"
    assert Audit(settings, out, progress=False).run().stages["mitigate"]["status"] == "reused"
    for measure in (measures.MemLabAlignment, measures.MemLabReplication):
        bump_revision(monkeypatch, measure)
        redone = Audit(settings, out, progress=False).run()
        assert [redone.stages[s]["status"] for s in ("detect", "mitigate")] == ["reused", "done"], measure
    # a measure the audit does not use changes nothing
    bump_revision(monkeypatch, measures.CLIPScore)
    assert Audit(settings, out, progress=False).run().stages["mitigate"]["status"] == "reused"


def test_a_vae_saved_over_the_model_redoes_the_stages_it_decodes_for(tiny_pipe_dir, tmp_path):
    # the stage keys held the UNet's first tensors alone: a new VAE (SD 1.x's ft-MSE swap, say) left
    # the mitigate stage's images, decoded by the old one, reported as reused
    from diffmem.core.loading import load_pipeline

    model = tmp_path / "model"
    shutil.copytree(tiny_pipe_dir, model)
    settings, out = _small_mitigating_audit(model, tmp_path)
    assert Audit(settings, out, progress=False).run().stages["mitigate"]["status"] == "done"
    assert Audit(settings, out, progress=False).run().stages["mitigate"]["status"] == "reused"
    pipe = load_pipeline(model)
    with torch.no_grad():
        for weight in pipe.vae.decoder.parameters():
            weight.mul_(1.05)
    pipe.save_pretrained(model, safe_serialization=True)
    assert Audit(settings, out, progress=False).run().stages["mitigate"]["status"] == "done"


def test_a_mitigate_stage_of_an_earlier_revision_of_the_method_is_redone(tiny_pipe_dir, tmp_path, monkeypatch):
    # the audit's RNA start drew its numbers from another range in an earlier diffmem, with the same
    # settings: its mitigate stage was reported reused, and a killed one resumed with the old parts
    from diffmem.mitigate import EmbeddingOptimization, MitigationResult
    from doubles import bump_revision

    settings, out = _small_mitigating_audit(tiny_pipe_dir, tmp_path)
    first = Audit(settings, out, progress=False).run()
    assert first.stages["mitigate"]["status"] == "done"
    marker = json.loads((out / "mitigate" / "parts" / "part_0000" / "done.json").read_text())["key"]
    bump_revision(monkeypatch, EmbeddingOptimization)
    again = Audit(settings, out, progress=False).run()
    assert again.stages["detect"]["status"] == "reused" and again.stages["mitigate"]["status"] == "done"
    assert json.loads((out / "mitigate" / "parts" / "part_0000" / "done.json").read_text())["key"] != marker
    assert MitigationResult.load(out / "mitigate").settings["revision"] == EmbeddingOptimization.revision


def test_stages_of_an_earlier_revision_of_the_detector_explainer_or_extractor_are_redone(tiny_pipe_dir, tmp_path,
                                                                                         monkeypatch):
    # as for mitigation above: a later diffmem whose detector, explainer or feature extractor gives
    # other outputs for the same settings must not report an earlier one's stage as its own
    from diffmem.categorize import MemLabExtractor
    from diffmem.detect import NoiseNormDetector
    from diffmem.explain import TokenAttribution
    from doubles import bump_revision

    prompts, reference = tmp_path / "p.txt", tmp_path / "r.txt"
    prompts.write_text("\n".join(f"a red circle number {i}" for i in range(6)) + "\n")
    reference.write_text("\n".join(f"reference prompt {i}" for i in range(12)) + "\n")
    settings = AuditSettings(model=str(tiny_pipe_dir), prompts=str(prompts), reference=str(reference), steps=(0,),
                             grid=False, fpr=0.5, max_explain=2, skip=("mitigate", "scan"))
    out = tmp_path / "audit"

    def run():
        stages = Audit(settings, out, progress=False).run().stages
        keys = {st: json.loads((out / st / "stage.json").read_text())["key"] for st in ("detect", "explain", "categorize")}
        return {st: stages[st]["status"] for st in ("detect", "explain")}, keys

    assert run()[0] == {"detect": "done", "explain": "done"}
    status, keys = run()
    assert status == {"detect": "reused", "explain": "reused"}  # the same revisions of everything: nothing redone
    bump_revision(monkeypatch, TokenAttribution)
    status, after = run()
    assert status == {"detect": "reused", "explain": "done"} and after["explain"] != keys["explain"]
    assert json.loads((out / "explain" / "attributions.json").read_text())["revision"] == TokenAttribution.revision
    bump_revision(monkeypatch, MemLabExtractor)
    status, later = run()
    assert status == {"detect": "reused", "explain": "reused"} and later["categorize"] != after["categorize"]
    bump_revision(monkeypatch, NoiseNormDetector)
    status, last = run()
    assert status == {"detect": "done", "explain": "done"} and last["detect"] != keys["detect"]


def test_a_non_memlab_audit_measures_mitigation_against_its_training_data(tiny_pipe_dir, tmp_path, sscd_stand_in,
                                                                          tiny_clip_dir):
    """Without MemLab's manifest the mitigate stage kept only losses; with --train-data it measures
    replication against those images. The training set here is the model's own unmitigated
    generations of the flagged prompts, so every one of them replicates before mitigation."""
    from PIL import Image

    from diffmem.mitigate import MitigationResult

    prompts, reference = tmp_path / "p.txt", tmp_path / "r.txt"
    prompts.write_text("\n".join(f"a <red> circle number {i}" for i in range(6)) + "\n")
    reference.write_text("\n".join(f"reference prompt {i}" for i in range(12)) + "\n")
    common = dict(model=str(tiny_pipe_dir), prompts=str(prompts), reference=str(reference), steps=(0,), grid=False,
                  fpr=0.5, mitigate_iters=2, mitigate_generations=2, max_mitigate=2)
    out = tmp_path / "audit"
    first = Audit(AuditSettings(**common, skip=("explain", "categorize")), out, progress=False).run()
    assert "replication_before" not in first.stages["mitigate"]["summary"]
    plain = MitigationResult.load(out / "mitigate")
    assert len(plain.prompts) >= 1
    train = tmp_path / "train <data>"
    train.mkdir()
    for i, gens in enumerate(plain.images_before):
        for j, im in enumerate(gens):
            Image.fromarray((im * 255).round().astype(np.uint8)).save(train / f"gen_{i}_{j} <copy>.png")
            (train / f"gen_{i}_{j} <copy>.txt").write_text(plain.prompts[i])
    again = Audit(AuditSettings(**common, train_data=str(train), skip=("explain", "categorize", "scan")), out,
                  progress=False).run()
    assert again.stages["detect"]["status"] == "reused" and again.stages["mitigate"]["status"] == "done"
    summary = again.stages["mitigate"]["summary"]
    assert summary["replication_before"] == 1.0 and "pixel correlation" in summary["replication_measure"]
    measured = MitigationResult.load(out / "mitigate")
    assert measured.measures["replication_before"] == [1.0] * len(plain.prompts)
    html = (out / "report.html").read_text()
    assert "train &lt;data&gt;" in html and "train <data>" not in html  # the path is escaped
    # each mitigated prompt names the training image its generations came nearest, escaped too
    assert measured.measures["nearest_location_before"] == [f"gen_{i}_{measured.measures['nearest_before'][i] % 2} <copy>.png"
                                                            for i in range(len(plain.prompts))]
    assert "nearest training image: before row 0 (gen_0_0 &lt;copy&gt;.png)" in html or \
        "nearest training image: before row 1 (gen_0_1 &lt;copy&gt;.png)" in html
    assert "<copy>" not in html
    # and shows it beside the generations: the image read back from the training data
    from PIL import Image

    k = measured.measures["nearest_before"][0]
    shown = np.asarray(Image.open(out / "mitigate" / "nearest_0000.png").convert("RGB"))
    assert np.array_equal(shown, np.asarray(Image.open(train / measured.measures["nearest_location_before"][0]).convert("RGB")))
    assert html.count('alt="the nearest training image"') == len(plain.prompts) and k in (0, 1)
    assert "replication before → after mitigation" in html and "alignment before → after" not in html

    # SSCD for replication and CLIP for alignment: the stage is redone with them, and the report names both
    third = Audit(AuditSettings(**common, train_data=str(train), sscd=str(sscd_stand_in), clip=str(tiny_clip_dir),
                                skip=("explain", "categorize", "scan")), out, progress=False).run()
    summary = third.stages["mitigate"]["summary"]
    assert third.stages["mitigate"]["status"] == "done" and summary["replication_before"] == 1.0
    assert summary["replication_measure"].startswith("SSCD") and summary["alignment_measure"].startswith("CLIP score")
    assert -1.0 <= summary["alignment_before"] <= 1.0
    html = (out / "report.html").read_text()
    assert "alignment before → after" in html and "CLIP score (" in html and "sscd_stand_in.pt" in html

    # the same images in a table whose columns the scan's defaults do not find: named for the scan and the
    # measure (the audit took no column names, so such data could not be audited at all)
    import pandas as pd

    table = train / "table.csv"
    images = sorted(p.name for p in train.glob("*.png"))
    words = [(train / n).with_suffix(".txt").read_text() for n in images]
    pd.DataFrame({"picture": images, "words": words}).to_csv(table, index=False)
    with pytest.raises(InputError, match="no caption column .*; name one with --train-caption-column"):
        Audit(AuditSettings(**common, train_data=str(table)), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    fourth = Audit(AuditSettings(**common, train_data=str(table), train_caption_column="words", train_image_column="picture",
                                 skip=("explain", "categorize")), out, progress=False).run()
    assert fourth.stages["scan"]["status"] == "done" and fourth.stages["mitigate"]["status"] == "done"
    from diffmem.scan.scanner import ScanResult

    scanned = ScanResult.load(out / "scan")
    assert (scanned.source["caption_column"], scanned.source["image_column"]) == ("words", "picture")
    assert set(scanned.rows["caption"]) == set(plain.prompts) and scanned.rows["image_issue"].isna().all()
    summary = fourth.stages["mitigate"]["summary"]
    assert summary["replication_before"] == 1.0 and "table.csv" in summary["replication_measure"]
    assert MitigationResult.load(out / "mitigate").measures["nearest_location_before"][0].startswith("gen_0_")
    with pytest.raises(InputError, match="--train-image-column names a column of --train-data"):
        AuditSettings(train_image_column="picture")


def test_audit_measure_paths_are_checked_before_any_work(tiny_pipe_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    common = dict(model=str(tiny_pipe_dir), prompts=str(prompts), reference=str(prompts))
    with pytest.raises(InputError, match="--sscd measures replication against --train-data"):
        AuditSettings(**common, sscd=str(tmp_path / "sscd.pt"))
    from PIL import Image

    (tmp_path / "train").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "a.png")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="SSCD model file not found"):
        Audit(AuditSettings(**common, train_data=str(tmp_path / "train"), sscd=str(tmp_path / "sscd.pt")), out)
    with pytest.raises(InputError, match="CLIP model folder not found"):
        Audit(AuditSettings(**common, clip=str(tmp_path / "no-clip")), out)
    assert not out.exists()
    Audit(AuditSettings(**common, clip=str(tmp_path / "no-clip"), skip=("mitigate",)), out)  # not used: not checked


def test_training_images_without_captions_serve_mitigation_when_scan_is_skipped(tiny_pipe_dir, tmp_path):
    """Mitigation compares generations with the training images alone; only the scan reads captions.
    A caption-less table was refused even with the scan skipped."""
    from PIL import Image

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    train = tmp_path / "train"
    train.mkdir()
    Image.new("RGB", (16, 16)).save(train / "a.png")
    (train / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}) + "\n")  # no caption column
    common = dict(model=str(tiny_pipe_dir), prompts=str(prompts), reference=str(prompts), train_data=str(train))
    Audit(AuditSettings(**common, skip=("scan",)), tmp_path / "out")
    with pytest.raises(InputError, match="caption"):
        Audit(AuditSettings(**common), tmp_path / "out2")


def test_a_stage_whose_saved_files_were_damaged_is_redone(tiny_pipe_dir, tmp_path):
    # a reused stage read its files only when a later stage or the report needed them, and stopped the
    # audit there on a truncated file; the stage's marker now holds each file's hash, and a stage whose
    # files changed is redone
    import io

    from rich.console import Console

    from diffmem.detect import DetectionResult
    from diffmem.mitigate import MitigationResult

    settings, out = _small_mitigating_audit(tiny_pipe_dir, tmp_path, skip=("explain", "categorize"))
    first = Audit(settings, out, progress=False).run()
    scores = DetectionResult.load(out / "detect" / "detections.parquet").scores
    mitigated = MitigationResult.load(out / "mitigate")
    assert len(mitigated.prompts) == 2

    detections = out / "detect" / "detections.parquet"
    detections.write_bytes(detections.read_bytes()[:64])
    (out / "mitigate" / "parts" / "part_0000" / "images.npz").write_bytes(b"not an npz")
    log = io.StringIO()
    again = Audit(settings, out, progress=False, console=Console(file=log, width=300)).run()
    assert again.stages["detect"]["status"] == "done" and again.stages["mitigate"]["status"] == "done"
    assert "detect: detections.parquet changed since the stage finished: redoing it" in log.getvalue()
    assert "mitigate: parts/part_0000/images.npz changed since the stage finished: redoing it" in log.getvalue()
    np.testing.assert_array_equal(DetectionResult.load(detections).scores, scores)
    redone = MitigationResult.load(out / "mitigate")
    assert redone.prompts == mitigated.prompts
    np.testing.assert_array_equal(np.asarray(redone.images_after), np.asarray(mitigated.images_after))
    assert again.stages["detect"]["summary"] == first.stages["detect"]["summary"]

    log = io.StringIO()
    third = Audit(settings, out, progress=False, console=Console(file=log, width=300)).run()
    assert [third.stages[s]["status"] for s in ("detect", "mitigate")] == ["reused", "reused"]
    assert "changed since" not in log.getvalue()


def test_an_audit_of_a_lora_records_it_and_redoes_stages_when_its_scale_changes(tiny_pipe_dir, tiny_lora, tmp_path):
    from dataclasses import replace

    prompts, reference = tmp_path / "p.txt", tmp_path / "r.txt"
    prompts.write_text("a red circle\na photo of a cat\n")
    reference.write_text("\n".join(f"reference prompt {i}" for i in range(12)) + "\n")
    settings = AuditSettings(model=str(tiny_pipe_dir), lora=str(tiny_lora), lora_scale=0.5, prompts=str(prompts),
                             reference=str(reference), steps=(0,), grid=False, skip=("explain", "categorize", "mitigate"))
    out = tmp_path / "audit"
    first = Audit(settings, out, progress=False).run()
    assert first.stages["detect"]["status"] == "done"
    assert first.settings["model_identity"]["lora"]["scale"] == 0.5
    assert "with the LoRA <code>" + str(tiny_lora) + "</code> fused at scale 0.5" in (out / "report.html").read_text()
    assert "<title>diffmem audit: " + str(tiny_pipe_dir) + " with a LoRA</title>" in (out / "report.html").read_text()
    assert Audit(settings, out, progress=False).run().stages["detect"]["status"] == "reused"
    assert Audit(replace(settings, lora_scale=1.0), out, progress=False).run().stages["detect"]["status"] == "done"
    # a second LoRA on the first: a model of its own, and the page names both
    two = Audit(replace(settings, lora=[str(tiny_lora), str(tiny_lora)], lora_scale=[1.0, 0.25]), out, progress=False).run()
    assert two.stages["detect"]["status"] == "done" and [x["scale"] for x in two.settings["model_identity"]["lora"]] == [1.0, 0.25]
    page = (out / "report.html").read_text()
    assert f"with the LoRAs <code>{tiny_lora}</code> at scale 1.0 and <code>{tiny_lora}</code> at scale 0.25, fused in that order" in page
    assert "<title>diffmem audit: " + str(tiny_pipe_dir) + " with 2 LoRAs</title>" in page
    # a LoRA that cannot be loaded is said before any work, the audit folder left as it was
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ModelLoadError, match="LoRA not found"):
        Audit(replace(settings, lora=str(tmp_path / "nowhere.safetensors")), out, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_an_audit_can_flag_by_seed_consistency_and_says_so(tiny_pipe_dir, tmp_path, monkeypatch):
    from dataclasses import replace

    from diffmem.core import loading
    from diffmem.core.loading import load_pipeline, sampler_defaults
    from diffmem.detect import DetectionResult, SeedConsistencyDetector
    from diffmem.report.app import AppState

    assert AuditSettings().generations == 1 and AuditSettings(detect_method="seed_consistency").generations == 4
    with pytest.raises(InputError, match="--generations must be at least 2, got 1"):
        AuditSettings(detect_method="seed_consistency", generations=1)
    with pytest.raises(InputError, match="--detect-method must be one of noise-norm, seed-consistency"):
        AuditSettings(detect_method="wen")
    reference_texts = [f"reference prompt {i}" for i in range(12)]
    pipe = load_pipeline(tiny_pipe_dir)
    sampler = sampler_defaults(pipe)
    detector = SeedConsistencyDetector(pipe, "x0", 4, sampler["num_inference_steps"], sampler["guidance_scale"])
    reference_scores = detector.score(reference_texts).scores
    # the reference prompt that scores highest stands above a median threshold: one flagged prompt
    top = reference_texts[int(np.argmax(reference_scores))]
    texts = ["a red circle", top]
    prompts, reference = tmp_path / "p.txt", tmp_path / "r.txt"
    prompts.write_text("\n".join(texts) + "\n")
    reference.write_text("\n".join(reference_texts) + "\n")
    settings = AuditSettings(model=str(tiny_pipe_dir), prompts=str(prompts), reference=str(reference), fpr=0.5,
                             detect_method="seed_consistency", steps=(0,), grid=False, skip=("categorize", "mitigate", "scan"))
    out = tmp_path / "audit"
    with pytest.warns(UserWarning, match="also in the reference"):  # the top reference prompt is audited too
        first = Audit(settings, out, progress=False).run()
    got = DetectionResult.load(out / "detect" / "detections.parquet")
    assert got.method == "seed_consistency" and got.seeds == [0, 1, 2, 3]
    assert got.scores == pytest.approx(detector.score(texts).scores, rel=1e-5)
    assert first.stages["detect"]["summary"]["threshold"] == pytest.approx(np.quantile(reference_scores, 0.5, method="higher"))
    assert got.verdicts[1]
    assert first.stages["explain"]["summary"]["n_explained"] == int(got.verdicts.sum())
    page = (out / "report.html").read_text()
    assert "seed consistency of the first step&#39;s x0 (4 seeds) &gt;" in page
    assert "Flagged by seed consistency" in page and "by the noise norm" in page
    # the noise norm is another detection: redone, not reused
    with pytest.warns(UserWarning):
        again = Audit(replace(settings, detect_method="noise_norm", generations=None), out, progress=False).run()
    assert again.stages["detect"]["status"] == "done"
    assert DetectionResult.load(out / "detect" / "detections.parquet").method == "noise_norm"
    assert "noise norm (Wen et al.) &gt;" in (out / "report.html").read_text()
    # the app scores the noise norm: a seed-consistency audit's calibration is refused before the model loads
    with pytest.warns(UserWarning):
        Audit(settings, out, progress=False).run()
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(InputError, match="calibrates the seed consistency detector"):
        AppState(model=str(tiny_pipe_dir), audit=out)


def test_a_second_audit_into_a_folder_in_use_is_refused_through_the_python_api(tmp_path):
    # only the command line held OUT: a second audit from a notebook redid and overwrote the same stages
    from doubles import held_by_another_run

    out = tmp_path / "audit"
    audit = Audit(AuditSettings(), out)
    with held_by_another_run(out):
        with pytest.raises(InputError, match="audit is in use by another diffmem run"):
            audit.run()
        assert list(out.iterdir()) == [] and audit.pipe is None  # refused before the model loads
