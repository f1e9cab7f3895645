from functools import partial

import numpy as np
import pytest

from diffmem.core.errors import InputError
from diffmem.mitigate import EmbeddingOptimization, MitigationResult, RandomNumberAddition
from diffmem.mitigate.parts import mitigate_in_parts
from doubles import Recording, bump_revision

PROMPTS = ["a red circle", "a photo of a cat", "a blue square at night", "a green ring"]

Counting = partial(Recording, call="mitigate")


def embedding(pipe, **kw):
    return EmbeddingOptimization(pipe, target=0.05, lr=0.05, max_iters=3, generations=2, num_inference_steps=3,
                                 rewrite="rna", **kw)


def assert_same(a: MitigationResult, b: MitigationResult, exact_images: bool = True):
    assert a.prompts == b.prompts and a.mitigated_prompts == b.mitigated_prompts and a.seeds == b.seeds
    assert a.trajectories == b.trajectories
    for name in ("initial_loss", "final_loss", "iterations", "reached_target", "truncated", "mitigated_truncated"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    if exact_images:
        np.testing.assert_array_equal(a.images_after, b.images_after)
    else:  # other generation batches: equal up to the last bits
        np.testing.assert_allclose(a.images_after, b.images_after, atol=1e-5)
    assert a.measures == b.measures


@pytest.mark.parametrize("make", [embedding, lambda pipe: RandomNumberAddition(pipe, generations=2, num_inference_steps=3)],
                         ids=["embedding", "rna"])
def test_parts_join_to_the_unsplit_result(tiny_pipe, tmp_path, make):
    m = make(tiny_pipe)
    parted = mitigate_in_parts(m, PROMPTS, tmp_path / "parts", part_size=3)
    whole = m.mitigate(PROMPTS)
    assert_same(parted, whole, exact_images=False)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part_0000", "part_0001"]
    # measures of saved parts (results of earlier versions carry them) join in prompt order
    saved = [MitigationResult.load(tmp_path / "parts" / name) for name in ("part_0000", "part_0001")]
    for r in saved:
        r.measures["n_words"] = [len(p.split()) for p in r.prompts]
    whole.measures["n_words"] = [len(p.split()) for p in PROMPTS]
    assert_same(MitigationResult.concat(saved), whole, exact_images=False)


def test_a_killed_run_redoes_only_the_unsaved_parts(tiny_pipe, tmp_path):
    folder = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt):
        mitigate_in_parts(Counting(embedding(tiny_pipe), fail_on=PROMPTS[2]), PROMPTS, folder, part_size=2)
    assert (folder / "part_0000" / "done.json").exists() and not (folder / "part_0001").exists()
    stamp = (folder / "part_0000" / "done.json").stat().st_mtime_ns
    resumed_method = Counting(embedding(tiny_pipe))
    resumed = mitigate_in_parts(resumed_method, PROMPTS, folder, part_size=2)
    assert resumed_method.calls == [PROMPTS[2:]]
    assert (folder / "part_0000" / "done.json").stat().st_mtime_ns == stamp
    uninterrupted = mitigate_in_parts(embedding(tiny_pipe), PROMPTS, tmp_path / "other", part_size=2)
    assert_same(resumed, uninterrupted)  # same parts, same batches: bit for bit


def test_parts_of_other_settings_prompts_or_models_are_never_mixed_in(tiny_pipe, tiny_pipe_v, tmp_path):
    folder = tmp_path / "parts"
    mitigate_in_parts(embedding(tiny_pipe), PROMPTS[:2], folder, part_size=2)
    marker = (folder / "part_0000" / "done.json").read_bytes()
    for other in (embedding(tiny_pipe, seed=4), embedding(tiny_pipe_v)):
        with pytest.raises(InputError, match="other prompts, settings or another model"):
            mitigate_in_parts(other, PROMPTS[:2], folder, part_size=2)
    with pytest.raises(InputError, match="other prompts"):
        mitigate_in_parts(embedding(tiny_pipe), PROMPTS[1:3], folder, part_size=2)
    assert (folder / "part_0000" / "done.json").read_bytes() == marker  # refused before any work
    again = Counting(embedding(tiny_pipe, seed=4))
    res = mitigate_in_parts(again, PROMPTS[:2], folder, part_size=2, stale="restart")
    assert again.calls == [PROMPTS[:2]] and res.seeds == [4, 5]


@pytest.mark.parametrize("make", [embedding, lambda pipe: RandomNumberAddition(pipe, generations=2, num_inference_steps=3)],
                         ids=["embedding", "rna"])
def test_parts_saved_by_an_earlier_revision_of_the_method_are_never_mixed_in(tiny_pipe, tmp_path, monkeypatch, make):
    # RNA's numbers moved from below 10,000 to below 100,000 with the same settings; parts an
    # earlier diffmem saved matched the new run's key and were joined to it
    folder = tmp_path / "parts"
    old = make(tiny_pipe)
    mitigate_in_parts(old, PROMPTS[:2], folder, part_size=2)
    marker = (folder / "part_0000" / "done.json").read_bytes()
    bump_revision(monkeypatch, type(old))
    with pytest.raises(InputError, match="earlier diffmem's version of the method"):
        mitigate_in_parts(make(tiny_pipe), PROMPTS[:2], folder, part_size=2)
    assert (folder / "part_0000" / "done.json").read_bytes() == marker  # refused before any work
    newer = Counting(make(tiny_pipe))
    res = mitigate_in_parts(newer, PROMPTS[:2], folder, part_size=2, stale="restart")
    assert newer.calls == [PROMPTS[:2]] and res.settings["revision"] == type(old).revision
    assert MitigationResult.load(folder / "part_0000").settings["revision"] == type(old).revision  # saved with it


def test_bad_input_fails_before_any_work(tiny_pipe, tmp_path):
    m = Counting(embedding(tiny_pipe))
    with pytest.raises(InputError, match="empty"):
        mitigate_in_parts(m, ["a cat", " "], tmp_path / "p")
    with pytest.raises(InputError, match="part_size"):
        mitigate_in_parts(m, ["a cat"], tmp_path / "p", part_size=0)
    assert m.calls == [] and not (tmp_path / "p").exists()
    a = embedding(tiny_pipe).mitigate(["a cat"], generate_images=False)
    b = embedding(tiny_pipe, seed=3).mitigate(["a dog"], generate_images=False)
    with pytest.raises(InputError, match="cannot join"):
        MitigationResult.concat([a, b])
