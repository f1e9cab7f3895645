import numpy as np
import pytest
import torch

from diffmem.core.errors import InputError
from diffmem.core.generate import generate
from diffmem.mitigate import EmbeddingOptimization, MitigationResult, NonFiniteLoss

PROMPTS = ["a red circle", "a photo of a cat"]


def test_loss_falls_and_trajectory_is_recorded(tiny_pipe):
    m = EmbeddingOptimization(tiny_pipe, target=1e-6, lr=0.05, max_iters=4, generations=2, num_inference_steps=3)
    res = m.mitigate(PROMPTS, generate_images=False)
    for tr in res.trajectories:
        assert len(tr) == 5 and tr[-1] < tr[0]
    assert not res.reached_target.any() and res.unreached == PROMPTS  # reported, never silent
    assert (res.iterations == 4).all()


def test_prompts_below_target_pass_untouched_bit_for_bit(tiny_pipe):
    m = EmbeddingOptimization(tiny_pipe, target=1e9, generations=2, num_inference_steps=3)
    res = m.mitigate(PROMPTS)
    assert (res.iterations == 0).all() and res.reached_target.all()
    plain = generate(tiny_pipe, PROMPTS, [0, 1], num_inference_steps=3, guidance_scale=7.5)
    assert np.array_equal(res.images_after, plain) and np.array_equal(res.images_before, plain)


def test_optimized_embedding_is_used_for_generation(tiny_pipe, tmp_path):
    m = EmbeddingOptimization(tiny_pipe, target=1e-6, lr=0.5, max_iters=2, generations=2, num_inference_steps=3)
    res = m.mitigate(PROMPTS)
    assert not np.array_equal(res.images_after, res.images_before)
    back = MitigationResult.load(res.save(tmp_path / "m"))
    assert np.array_equal(back.images_after, res.images_after) and back.trajectories == res.trajectories
    assert res.plot_grid(tmp_path / "g.png").stat().st_size > 1000
    assert res.plot_trajectories(tmp_path / "t.png").stat().st_size > 1000


def test_bos_position_stays_fixed(tiny_pipe):
    m = EmbeddingOptimization(tiny_pipe, target=1e-6, lr=0.5, max_iters=2, generations=1, num_inference_steps=3)
    from diffmem.core import denoise

    emb, _, steps, _ = m.optimize("a red circle")
    with torch.no_grad():
        orig = denoise.encode_text(tiny_pipe, ["a red circle"])
    assert steps == 2
    assert torch.equal(emb[:, 0], orig[:, 0]) and not torch.equal(emb[:, 1:], orig[:, 1:])


def test_eos_positions_keep_every_words_output(tiny_pipe):
    from diffmem.core import denoise

    prompt = "a red circle"
    m = EmbeddingOptimization(tiny_pipe, target=1e-6, lr=0.05, max_iters=2, generations=1, num_inference_steps=3, positions="eos")
    emb, traj, steps, _ = m.optimize(prompt)
    with torch.no_grad():
        orig = denoise.encode_text(tiny_pipe, [prompt])
    ids = denoise.tokenize(tiny_pipe, [prompt])[0].tolist()
    eos = ids.index(tiny_pipe.tokenizer.eos_token_id, 1)
    assert m.first_optimized_position(prompt) == eos == 4  # BOS, a, red, circle, EOS
    assert steps == 2 and traj[-1] < traj[0]
    assert torch.equal(emb[:, :eos], orig[:, :eos])  # BOS and the words untouched
    assert not torch.equal(emb[:, eos:], orig[:, eos:])
    assert m.settings["positions"] == "eos"
    # an "<|endoftext|>" typed inside the prompt is not where its end starts: the words after it are kept too
    assert m.first_optimized_position("a red <|endoftext|> circle") == 5  # BOS, a, red, EOS, circle, EOS
    with pytest.raises(InputError, match="positions must be one of all, eos"):
        EmbeddingOptimization(tiny_pipe, target=1.0, positions="words")


def test_rewrite_start_leaves_prompts_below_target_untouched(tiny_pipe):
    m = EmbeddingOptimization(tiny_pipe, target=1e9, generations=2, num_inference_steps=3, rewrite="rna")
    res = m.mitigate(PROMPTS)
    assert (res.iterations == 0).all() and res.mitigated_prompts == PROMPTS
    plain = generate(tiny_pipe, PROMPTS, [0, 1], num_inference_steps=3, guidance_scale=7.5)
    assert np.array_equal(res.images_after, plain)


def test_rewrite_start_optimizes_from_the_rewritten_prompt(tiny_pipe):
    from diffmem.core import denoise

    kw = dict(target=1e-6, lr=0.05, max_iters=2, generations=1, num_inference_steps=3, positions="eos")
    plain = EmbeddingOptimization(tiny_pipe, **kw)
    m = EmbeddingOptimization(tiny_pipe, rewrite="rna", **kw)
    prompt = "a red circle"
    text = m.rewritten(prompt)
    assert text.startswith(prompt + " ") and len(text.split()) == 3 + 4 and all(w.isdigit() for w in text.split()[3:])
    assert m.rewritten(prompt) == text != m.rewritten("a blue square")  # one draw per prompt, whatever the batch
    full = " ".join(["a"] * 75)  # fills what CLIP reads: appended numbers would be cut and change nothing
    words = m.rewritten(full).split()
    k = next(i for i, w in enumerate(words) if w.isdigit())
    numbers, rest = words[k:k + 4], words[k + 4:]
    assert all(w.isdigit() for w in numbers) and words[:k] + rest == ["a"] * 75
    # just before the cut instead: inside what the model reads, after as much of the prompt as leaves room
    assert not denoise.truncated(tiny_pipe, [" ".join(words[:k + 4])])[0]
    assert denoise.truncated(tiny_pipe, [" ".join(["a"] * (k + 1) + numbers)])[0] and k < 75
    seen = []
    emb, traj, steps, _ = m.optimize(prompt, callback=lambda *a: seen.append(a))
    _, traj_plain, _, _ = plain.optimize(prompt)
    assert traj[0] == pytest.approx(traj_plain[0], rel=1e-6)  # the trajectory starts at the prompt's own loss
    # the callback names what it evaluated: the prompt once, then the rewrite from its iteration 0
    assert seen == [(0, traj[0], prompt)] + [(i, v, text) for i, v in enumerate(traj[1:])]
    assert len(traj) == 1 + steps + 1 and steps == 2
    with torch.no_grad():
        rewritten = denoise.encode_text(tiny_pipe, [text])
    eos = m.first_optimized_position(text)
    assert torch.equal(emb[:, :eos], rewritten[:, :eos])  # the rewrite's words, kept (EOS positions)
    res = m.mitigate([prompt])
    assert res.mitigated_prompts == [text]
    # no step at all (max_iters=0): the rewrite alone, still generated from, and reported as changed
    none = EmbeddingOptimization(tiny_pipe, **{**kw, "max_iters": 0}, rewrite="rna").mitigate([prompt])
    assert none.iterations[0] == 0 and not np.array_equal(none.images_after, none.images_before)
    with pytest.raises(InputError, match="rewrite must be one of rna, rta"):
        EmbeddingOptimization(tiny_pipe, target=1.0, rewrite="gni")


def test_non_finite_loss_stops_with_a_clear_error(tiny_pipe):
    m = EmbeddingOptimization(tiny_pipe, target=1e-6, lr=1e30, max_iters=5, generations=1, num_inference_steps=3)
    with pytest.raises(NonFiniteLoss, match="lower the learning rate"):
        m.mitigate(["a red circle"], generate_images=False)


@pytest.mark.parametrize("target", [float("nan"), -1.0, 0, None, "1.0x", float("inf")])
def test_bad_target(tiny_pipe, target):
    with pytest.raises(InputError, match="target loss must be a positive number"):
        EmbeddingOptimization(tiny_pipe, target=target)


def test_a_numeric_target_of_any_type_is_taken_as_a_float(tiny_pipe):
    for target in (np.float32(0.5), torch.tensor(0.5), "0.5"):
        m = EmbeddingOptimization(tiny_pipe, target=target)
        assert m.settings["target"] == 0.5 and type(m.settings["target"]) is float


@pytest.mark.parametrize("bad, message", [({"lr": float("nan")}, "learning rate"), ({"lr": 0.0}, "learning rate"),
                                          ({"max_iters": -1}, "max_iters"), ({"generations": 0}, "generations")])
def test_bad_hyperparameters_are_clear_errors(tiny_pipe, bad, message):
    # torch's AdamW would say "Invalid learning rate: nan" from inside the run, after the first generations
    with pytest.raises(InputError, match=message):
        EmbeddingOptimization(tiny_pipe, target=1.0, **bad)


def test_calibrated_target_is_on_the_scale_of_the_loss(tiny_pipe):
    from diffmem.detect import NoiseNormDetector

    reference = ["a blue square", "a green ring", "a tree", "a house", "a dog on grass"]
    kw = dict(generations=2, seed=3, num_inference_steps=3, guidance_scale=7.5)
    m, cal = EmbeddingOptimization.calibrated(tiny_pipe, reference, fpr=0.2, max_iters=1, **kw)
    assert m.settings["target"] == cal.threshold
    # the detector's first-step score of a prompt is exactly this method's initial loss
    score = NoiseNormDetector(tiny_pipe, 3, 7.5, steps=[0], generations=2, seed=3).score(PROMPTS).scores
    res = m.mitigate(PROMPTS, generate_images=False)
    np.testing.assert_allclose(res.initial_loss, score, rtol=1e-4)


def test_calibrations_of_another_score_are_refused(tiny_pipe):
    from diffmem.detect import Calibration, NoiseNormDetector
    from diffmem.detect.calibration import CalibrationMismatch

    reference = ["a blue square", "a green ring", "a tree"]
    kw = dict(generations=2, seed=0, num_inference_steps=3, guidance_scale=7.5)
    for det_kw, what in (({"steps": [0, 1], "generations": 2}, "steps"), ({"steps": [0], "generations": 1}, "generations")):
        cal = Calibration.fit(NoiseNormDetector(tiny_pipe, 3, 7.5, seed=0, **det_kw).score(reference), fpr=0.5)
        with pytest.raises(CalibrationMismatch, match=what):
            EmbeddingOptimization.from_calibration(tiny_pipe, cal, **kw)
    good = Calibration.fit(NoiseNormDetector(tiny_pipe, 3, 7.5, steps=[0], generations=2, seed=0).score(reference), fpr=0.5)
    assert EmbeddingOptimization.from_calibration(tiny_pipe, good, **kw).settings["target"] == good.threshold


def test_multi_step_loss_is_the_detectors_score_at_those_steps(tiny_pipe):
    from diffmem.detect import Calibration, NoiseNormDetector
    from diffmem.detect.calibration import CalibrationMismatch

    kw = dict(generations=2, seed=1, num_inference_steps=4, guidance_scale=7.5)
    m = EmbeddingOptimization(tiny_pipe, target=1e-6, lr=0.05, max_iters=2, loss_steps=3, **kw)
    res = m.mitigate(PROMPTS, generate_images=False)
    # iteration 0 runs the unchanged embedding through 3 guided steps, as the detector does
    score = NoiseNormDetector(tiny_pipe, 4, 7.5, steps=[0, 1, 2], generations=2, seed=1).score(PROMPTS).scores
    np.testing.assert_allclose(res.initial_loss, score, rtol=1e-4)
    assert all(tr[-1] < tr[0] for tr in res.trajectories) and res.settings["loss_steps"] == 3
    # its calibration must be of the same steps; a first-step one is refused
    reference = ["a blue square", "a green ring", "a tree"]
    first = Calibration.fit(NoiseNormDetector(tiny_pipe, 4, 7.5, steps=[0], generations=2, seed=1).score(reference), fpr=0.5)
    with pytest.raises(CalibrationMismatch, match="steps"):
        EmbeddingOptimization.from_calibration(tiny_pipe, first, loss_steps=3, **kw)
    m3, cal3 = EmbeddingOptimization.calibrated(tiny_pipe, reference, fpr=0.5, loss_steps=3, **kw)
    assert cal3.settings["steps"] == [0, 1, 2] and m3.settings["target"] == cal3.threshold
    with pytest.raises(InputError, match="loss_steps"):
        EmbeddingOptimization(tiny_pipe, target=1.0, loss_steps=5, num_inference_steps=4)


def test_an_ancestral_sampler_sees_the_same_noise_at_every_iteration(tiny_pipe_with):
    from diffmem.detect import NoiseNormDetector

    pipe = tiny_pipe_with("EulerAncestralDiscreteScheduler")
    kw = dict(generations=2, seed=1, num_inference_steps=4, guidance_scale=7.5, loss_steps=3)
    first = EmbeddingOptimization(pipe, target=1e-6, lr=0.05, max_iters=3, **kw).mitigate(PROMPTS, generate_images=False)
    torch.manual_seed(99)  # the global generator's state must not matter
    again = EmbeddingOptimization(pipe, target=1e-6, lr=0.05, max_iters=3, **kw).mitigate(PROMPTS, generate_images=False)
    assert [list(t) for t in again.trajectories] == [list(t) for t in first.trajectories]
    score = NoiseNormDetector(pipe, 4, 7.5, steps=[0, 1, 2], generations=2, seed=1).score(PROMPTS).scores
    np.testing.assert_allclose(first.initial_loss, score, rtol=1e-4)
    # an embedding that does not move scores the same at every iteration: neither does the noise
    still = EmbeddingOptimization(pipe, target=1e-6, lr=1e-30, max_iters=2, **kw)  # steps too small to move a float32
    same = still.mitigate(PROMPTS[:1], generate_images=False)
    assert len(set(same.trajectories[0])) == 1
