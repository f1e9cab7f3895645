from functools import partial

import numpy as np
import pandas as pd
import pytest

from diffmem.core.errors import InputError
from diffmem.detect import Calibration, DetectionResult, NoiseNormDetector
from diffmem.detect.run import detect_file
from doubles import Recording

PROMPTS = ["a red circle", "a photo of a cat", "a blue square at night", "a green ring", "an old map"]

Counting = partial(Recording, call="score")


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def detector(pipe, **kw):
    return NoiseNormDetector(pipe, num_inference_steps=4, **kw)


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_a_killed_run_resumes_at_the_first_unsaved_chunk(tiny_pipe, tmp_path, prompt_file, suffix):
    out = tmp_path / f"r{suffix}"
    cal = Calibration.fit(detector(tiny_pipe).score(["a dog", "a tree", "a house", "a car"]), fpr=0.25)
    with pytest.raises(KeyboardInterrupt):
        detect_file(Counting(detector(tiny_pipe), fail_on=PROMPTS[4]), prompt_file, out, calibration=cal, chunk=2,
                    progress=False)
    assert not out.exists()  # the output appears only when every prompt is scored
    parts = out.with_name(out.name + ".parts")
    assert sorted(p.name for p in parts.glob("*.done")) == ["chunk_000000.done", "chunk_000001.done"]

    again = Counting(detector(tiny_pipe))
    summary = detect_file(again, prompt_file, out, calibration=cal, chunk=2, progress=False)
    assert again.calls == [PROMPTS[4:]] and not parts.exists()
    assert summary.n_prompts == 5 and summary.n_flagged == int(DetectionResult.load(out).verdicts.sum())
    got = DetectionResult.load(out)
    assert got.prompts == PROMPTS and got.threshold == cal.threshold
    # the same as a run never interrupted, bit for bit (same chunks, so the same batches) ...
    straight = tmp_path / f"straight{suffix}"
    detect_file(detector(tiny_pipe), prompt_file, straight, calibration=cal, chunk=2, progress=False)
    pd.testing.assert_frame_equal(got.to_frame(), DetectionResult.load(straight).to_frame(), check_exact=True)
    # ... and as scoring the list in one batch, up to float32 batch effects
    whole = cal.apply(detector(tiny_pipe).score(PROMPTS))
    np.testing.assert_allclose(got.values, whole.values, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::diffmem.core.denoise.PromptTruncationWarning")
def test_parts_saved_before_the_truncated_column_resume_into_one_table(tiny_pipe, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:2] + ["a long one " + "word " * 100] + PROMPTS[2:]) + "\n")
    out = tmp_path / "r.parquet"
    with pytest.raises(KeyboardInterrupt):
        detect_file(Counting(detector(tiny_pipe), fail_on=PROMPTS[3]), prompts, out, chunk=2, progress=False)
    part = out.with_name("r.parquet.parts") / "chunk_000000.parquet"
    old = DetectionResult.load(part)
    old.truncated = None  # as an earlier diffmem saved it
    old.save(part)
    summary = detect_file(detector(tiny_pipe), prompts, out, chunk=2, progress=False)
    got = DetectionResult.load(out)
    assert got.truncated.tolist() == [False, False, True, False, False, False]
    assert summary.n_truncated == 1 and "1 longer than the model reads" in summary.line()


def test_parts_of_another_run_are_refused_not_mixed_in(tiny_pipe, tiny_pipe_v, tmp_path, prompt_file):
    out = tmp_path / "r.parquet"
    with pytest.raises(KeyboardInterrupt):
        detect_file(Counting(detector(tiny_pipe), fail_on=PROMPTS[2]), prompt_file, out, chunk=2, progress=False)
    marker = out.with_name("r.parquet.parts") / "chunk_000000.done"
    saved = marker.read_text()
    for other in (detector(tiny_pipe, seed=7), detector(tiny_pipe_v)):
        probe = Counting(other)
        with pytest.raises(InputError, match="another model, other settings or other prompts"):
            detect_file(probe, prompt_file, out, chunk=2, progress=False)
        assert probe.calls == [] and marker.read_text() == saved
    changed = tmp_path / "q.txt"
    changed.write_text("a new first prompt\n" + "\n".join(PROMPTS) + "\n")
    with pytest.raises(InputError, match="other prompts"):
        detect_file(detector(tiny_pipe), changed, out, chunk=2, progress=False)


def test_parts_of_another_revision_of_the_detector_are_refused_not_mixed_in(tiny_pipe, tmp_path, prompt_file,
                                                                           monkeypatch):
    # a later diffmem whose detector scores otherwise for the same settings must not finish an
    # earlier one's killed run: the output would hold scores of two methods
    from diffmem.detect.run import run_identity
    from doubles import bump_revision

    out = tmp_path / "r.parquet"
    # revision 1 adds nothing to the key: chunks saved before detectors had revisions still resume
    monkeypatch.setattr(NoiseNormDetector, "revision", 1)
    assert "revision" not in run_identity(detector(tiny_pipe), None)
    with pytest.raises(KeyboardInterrupt):
        detect_file(Counting(detector(tiny_pipe), fail_on=PROMPTS[2]), prompt_file, out, chunk=2, progress=False)
    marker = out.with_name("r.parquet.parts") / "chunk_000000.done"
    saved = marker.read_text()
    bump_revision(monkeypatch, NoiseNormDetector)
    probe = Counting(detector(tiny_pipe))
    with pytest.raises(InputError, match="another diffmem's version of the method"):
        detect_file(probe, prompt_file, out, chunk=2, progress=False)
    assert probe.calls == [] and marker.read_text() == saved and not out.exists()


def test_a_saved_chunk_that_cannot_be_read_is_scored_again(tiny_pipe, tmp_path, prompt_file):
    # its marker outlived its scores (a disk fault, a hand edit): the run re-scores that chunk
    # instead of stopping on it, and says so
    out = tmp_path / "r.parquet"
    with pytest.raises(KeyboardInterrupt):
        detect_file(Counting(detector(tiny_pipe), fail_on=PROMPTS[4]), prompt_file, out, chunk=2, progress=False)
    part = out.with_name("r.parquet.parts") / "chunk_000001.parquet"
    part.write_bytes(part.read_bytes()[:50])
    again = Counting(detector(tiny_pipe))
    with pytest.warns(UserWarning, match="rescoring .*chunk_000001.parquet: it cannot be read"):
        detect_file(again, prompt_file, out, chunk=2, progress=False)
    assert again.calls == [PROMPTS[2:4], PROMPTS[4:]]
    straight = tmp_path / "straight.parquet"
    detect_file(detector(tiny_pipe), prompt_file, straight, chunk=2, progress=False)
    pd.testing.assert_frame_equal(DetectionResult.load(out).to_frame(), DetectionResult.load(straight).to_frame(),
                                  check_exact=True)


def test_the_prompt_file_as_the_results_file_is_refused_and_kept(tiny_pipe, tmp_path):
    table = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": PROMPTS, "source": ["mine"] * len(PROMPTS)}).to_parquet(table)
    before = table.read_bytes()
    with pytest.raises(InputError, match="is the prompts file"):
        detect_file(detector(tiny_pipe), table, table, progress=False)
    assert table.read_bytes() == before and not (tmp_path / "prompts.parquet.parts").exists()


def test_a_second_run_into_the_same_results_file_is_refused_through_the_python_api(tiny_pipe, tmp_path, prompt_file):
    # only the command line held OUT.parts: two notebooks scoring into one file wrote the same chunks,
    # and the first to finish removed them under the other
    from doubles import held_by_another_run

    out = tmp_path / "r.parquet"
    parts = tmp_path / "r.parquet.parts"
    scorer = Counting(detector(tiny_pipe))
    with held_by_another_run(parts):
        with pytest.raises(InputError, match="r.parquet.parts is in use by another diffmem run; wait for it to end, "
                                             "or write to another output file"):
            detect_file(scorer, prompt_file, out, chunk=2, progress=False)
        assert scorer.calls == [] and list(parts.iterdir()) == [] and not out.exists()
    detect_file(scorer, prompt_file, out, chunk=2, progress=False)  # once the first run has ended
    assert len(DetectionResult.load(out).prompts) == len(PROMPTS) and not parts.exists()
