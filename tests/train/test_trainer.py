import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffmem.core.components import tiny_pipeline
from diffmem.train.trainer import TrainConfig, TrainData, Trainer, encode_images


def _data(pipe, n=6):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(n, 16, 16, 3)).astype(np.float32)
    return TrainData(encode_images(pipe, images), np.arange(n), [f"image number {i}" for i in range(n)])


def _weights(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()} | {
        "te." + k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}


def _interrupted_then_resumed(cfg, folder, at_step: int):
    """The tiny pipeline trained into ``folder``, killed at ``at_step`` and resumed from a fresh pipeline,
    as a new process would start from scratch weights."""
    interrupted = tiny_pipeline(seed=3)

    def stop(step):
        if step == at_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(interrupted, _data(interrupted), cfg, folder).run(progress=False, on_step=stop)
    resumed = tiny_pipeline(seed=3)
    Trainer(resumed, _data(resumed), cfg, folder).run(progress=False)
    return resumed


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    cfg = TrainConfig(steps=20, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=5, train_text_encoder=True, ema=True)
    straight = tiny_pipeline(seed=3)
    Trainer(straight, _data(straight), cfg, tmp_path / "a").run(progress=False)

    resumed = _interrupted_then_resumed(cfg, tmp_path / "b", at_step=12)
    a, b = _weights(straight), _weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# (the folder a rename moves, the how-manieth such rename is killed, the step the run resumes from);
# checkpoints every 5 steps: saves 1 and 2 are steps 5 and 10, and save 1 has no checkpoint to move out
@pytest.mark.parametrize("moving, nth, resumes_at", [
    ("checkpoint.tmp", 1, 5),   # save 1 written, not yet marked whole (.new): its state.json, written last, says it is
    ("checkpoint.tmp", 2, 5),   # save 2 likewise, beside save 1: the checkpoint in place is kept
    ("checkpoint", 1, 10),      # save 2 whole in .new, save 1 not yet moved out: save 2 is swapped in
    ("checkpoint.new", 1, 5),   # between the swap's renames: the new checkpoint moves in
    ("checkpoint.new", 2, 10),
])
def test_a_kill_during_a_checkpoint_swap_resumes_from_a_whole_checkpoint(tmp_path, monkeypatch, moving, nth, resumes_at):
    from doubles import killed_renaming

    cfg = TrainConfig(steps=20, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=5, train_text_encoder=True, ema=True)
    straight = tiny_pipeline(seed=3)
    Trainer(straight, _data(straight), cfg, tmp_path / "a").run(progress=False)

    interrupted = tiny_pipeline(seed=3)
    with killed_renaming(monkeypatch, moving, nth), pytest.raises(KeyboardInterrupt):
        Trainer(interrupted, _data(interrupted), cfg, tmp_path / "b").run(progress=False)

    resumed, steps = tiny_pipeline(seed=3), []
    Trainer(resumed, _data(resumed), cfg, tmp_path / "b").run(progress=False, on_step=steps.append)
    assert steps[0] == resumes_at  # a whole checkpoint, the newest the kill left, not a start from nothing
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint"]  # nothing of the swap left beside it
    a, b = _weights(straight), _weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_finished_run_run_again_trains_nothing_and_one_given_more_steps_goes_on_from_its_end(tmp_path):
    from dataclasses import replace

    from diffmem.core.errors import InputError

    # 20 steps, checkpoints every 8: the last one before the end is at step 16
    cfg = TrainConfig(steps=20, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=8, ema=True)
    first = tiny_pipeline(seed=3)
    Trainer(first, _data(first), cfg, tmp_path).run(progress=False)
    again, steps = tiny_pipeline(seed=3), []
    Trainer(again, _data(again), cfg, tmp_path).run(progress=False, on_step=steps.append)
    assert steps == []  # not steps 16-19 again
    a, b = _weights(first), _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same (EMA) model, saved again

    more, steps = tiny_pipeline(seed=3), []
    going_on = Trainer(more, _data(more), replace(cfg, steps=30), tmp_path)
    going_on.run(progress=False, on_step=steps.append)
    assert steps == list(range(20, 30)) and going_on.started_at_step == 20  # said in memlab_recipe.json
    # resumed with fewer steps than it holds, the model would be saved as trained for fewer than it was
    fewer = tiny_pipeline(seed=3)
    with pytest.raises(InputError, match="already trained to step 30, past the 20 steps asked for"):
        Trainer(fewer, _data(fewer), cfg, tmp_path).check_resumable()


def _other_attention(pipe, part: str):
    with torch.no_grad():
        for name, weight in getattr(pipe, part).named_parameters():
            if "attn" in name:
                weight.mul_(1.05)
    return pipe


def test_a_checkpoint_of_another_run_is_refused_and_names_what_differs(tmp_path):
    from diffmem.core.errors import InputError

    cfg = TrainConfig(steps=8, batch_size=2, lr=1e-3, warmup_steps=1, checkpoint_every=3, train_text_encoder=False)

    def stop(step):
        if step == 4:
            raise KeyboardInterrupt

    first = tiny_pipeline(seed=3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(first, _data(first), cfg, tmp_path / "run").run(progress=False, on_step=stop)
    state = (tmp_path / "run" / "checkpoint" / "state.json").read_text()
    other_cfg = TrainConfig(**{**cfg.to_dict(), "lr": 5e-4})
    for pipe, data, config, said in [
        (tiny_pipeline(seed=3), None, other_cfg, "lr 0.001 -> 0.0005"),
        (tiny_pipeline(seed=3), "captions", cfg, "other training data (6 rows then, 6 now)"),
        (tiny_pipeline(seed=4), None, cfg, "another starting model"),
        # the same first UNet tensors, which were all the key held of the weights
        (_other_attention(tiny_pipeline(seed=3), "unet"), None, cfg, "another starting model"),
        (_other_attention(tiny_pipeline(seed=3), "text_encoder"), None, cfg, "another starting model"),
        (tiny_pipeline(seed=3), None, TrainConfig(**{**cfg.to_dict(), "lora_rank": 4}), "lora_rank None -> 4"),
    ]:
        d = _data(pipe)
        if data == "captions":
            d = TrainData(d.latents, d.image_index, [c + "!" for c in d.captions])
        before = _weights(pipe)
        with pytest.raises(InputError, match="is a checkpoint of another training run") as e:
            Trainer(pipe, d, config, tmp_path / "run").run(progress=False)
        assert said in str(e.value)
        assert all(torch.equal(before[k], v) for k, v in _weights(pipe).items())  # nothing trained
        assert (tmp_path / "run" / "checkpoint" / "state.json").read_text() == state  # nothing overwritten
    # more steps, another checkpoint interval or thread count: the same run, continued; a checkpoint saved
    # before the key fingerprinted all the weights is checked by the fingerprint it holds
    saved = json.loads(state)
    saved["run"]["model"] = {k: v for k, v in saved["run"]["model"].items() if not k.endswith("_weights")}
    del saved["run"]["config"]["lora_rank"]  # nor a setting added since, at its value that trains as before
    (tmp_path / "run" / "checkpoint" / "state.json").write_text(json.dumps(saved))
    same = tiny_pipeline(seed=3)
    Trainer(same, _data(same), TrainConfig(**{**cfg.to_dict(), "steps": 10, "checkpoint_every": 2, "threads": 2}),
            tmp_path / "run").run(progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_float32_weights_and_resumes_exactly(tmp_path, precision):
    """Autocast changes the arithmetic (the weights differ from a float32 run) but not the weights'
    dtype; fp16's gradient scaler is checkpointed, so an interrupted run resumes to the same weights."""
    cfg = TrainConfig(steps=12, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=4, mixed_precision=precision,
                      mem_filter_threshold=10.0)
    full = tiny_pipeline(seed=3)
    trainer = Trainer(full, _data(full), cfg, tmp_path / "a")
    trainer.run(progress=False)
    assert all(np.isfinite(r["loss"]) for r in trainer.log)
    assert all(v.dtype == torch.float32 for v in full.unet.state_dict().values())
    fp32 = tiny_pipeline(seed=3)
    Trainer(fp32, _data(fp32), TrainConfig(**{**cfg.to_dict(), "mixed_precision": "no"}), tmp_path / "c").run(progress=False)
    assert not all(torch.equal(v, fp32.unet.state_dict()[k]) for k, v in full.unet.state_dict().items())

    def stop(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_pipeline(seed=3), _data(tiny_pipeline(seed=3)), cfg, tmp_path / "b").run(progress=False, on_step=stop)
    if precision == "fp16":
        import json

        state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
        assert state["grad_scaler"]["scale"] > 0
    resumed = tiny_pipeline(seed=3)
    Trainer(resumed, _data(resumed), cfg, tmp_path / "b").run(progress=False)
    a, b = _weights(full), _weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("bad", [{"lr": float("nan")}, {"lr": 0.0}, {"mem_filter_threshold": float("nan")},
                                 {"mem_filter_threshold": -1.0}, {"caption_dropout": 1.5}, {"ema_decay": float("inf")},
                                 {"grad_clip": -1.0}, {"steps": 0}, {"batch_size": 0}, {"checkpoint_every": -1}])
def test_bad_settings_are_input_errors_before_any_work(bad):
    # torch says only "Invalid learning rate: nan" once training starts; a NaN filter threshold drops nothing
    from diffmem.core.errors import InputError

    with pytest.raises(InputError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_unknown_mixed_precision_is_an_input_error(tmp_path):
    from diffmem.core.errors import InputError

    pipe = tiny_pipeline()
    with pytest.raises(InputError, match="mixed_precision must be one of no, bf16, fp16"):
        Trainer(pipe, _data(pipe), TrainConfig(mixed_precision="fp8"), tmp_path)


@pytest.mark.parametrize("sampler, prediction_type", [("EulerDiscreteScheduler", "epsilon"), ("PNDMScheduler", "v_prediction"),
                                                       ("DPMSolverMultistepScheduler", "epsilon")])
def test_a_pipeline_with_another_sampler_trains_with_the_same_noise(tmp_path, sampler, prediction_type):
    # training noises as DDPM does, whatever sampler the folder holds: Euler's own add_noise is on
    # its sigma scale, DPM-Solver's looks up its inference timesteps only, PNDM has no get_velocity
    import diffusers

    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=0)
    trained = {}
    for name in ("DDIMScheduler", sampler):
        pipe = tiny_pipeline(seed=3, prediction_type=prediction_type)
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
        Trainer(pipe, _data(pipe), cfg, tmp_path / name).run(progress=False)
        trained[name] = (_weights(pipe), type(pipe.scheduler).__name__)
    assert trained[sampler][1] == sampler  # the pipeline keeps its own sampler
    a, b = trained["DDIMScheduler"][0], trained[sampler][0]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_lowers_the_loss_v_prediction_frozen_text_encoder(tmp_path):
    pipe = tiny_pipeline(seed=0, prediction_type="v_prediction")
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    cfg = TrainConfig(steps=150, batch_size=6, lr=3e-3, warmup_steps=5, checkpoint_every=0, train_text_encoder=False,
                      caption_dropout=0.0)
    tr = Trainer(pipe, _data(pipe), cfg, tmp_path)
    tr.run(progress=False)
    losses = [r["loss"] for r in tr.log]
    assert np.mean(losses[-2:]) < losses[0]
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, te_before[k]), k


def test_memorization_filter_drops_samples(tmp_path):
    pipe = tiny_pipeline(seed=0)
    before = _weights(pipe)
    cfg = TrainConfig(steps=5, batch_size=4, warmup_steps=1, checkpoint_every=0, caption_dropout=0.0, mem_filter_threshold=0.0)
    tr = Trainer(pipe, _data(pipe), cfg, tmp_path)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.run(progress=False)
    # skipping the optimizer is deliberate: torch's scheduler-order warning must not reach the user
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert tr.log[-1]["dropped"] == 20  # every sample is at or above a threshold of 0
    # 6 rows in batches of 4: an epoch is 2 steps; 5 steps make two whole epochs and half of a third
    assert tr.filter_log == [{"epoch": 1, "last_step": 1, "samples": 8, "dropped": 8, "complete": True},
                             {"epoch": 2, "last_step": 3, "samples": 8, "dropped": 8, "complete": True},
                             {"epoch": 3, "last_step": 4, "samples": 4, "dropped": 4, "complete": False}]
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)  # all dropped: every step skipped


def test_the_filters_counts_per_epoch_go_on_across_a_resume(tmp_path):
    # a threshold some samples pass and some do not; checkpoints fall mid-epoch (3 steps an epoch)
    cfg = TrainConfig(steps=14, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=4, caption_dropout=0.0,
                      mem_filter_threshold=0.22)
    straight = tiny_pipeline(seed=3)
    whole = Trainer(straight, _data(straight, n=10), cfg, tmp_path / "a")
    whole.run(progress=False)
    assert 0 < whole.filter_counts["dropped"] < 14 * 4, "the threshold should drop some samples, not all"

    def stop(step):
        if step == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_pipeline(seed=3), _data(tiny_pipeline(seed=3), n=10), cfg, tmp_path / "b").run(progress=False,
                                                                                                   on_step=stop)
    resumed = Trainer(tiny_pipeline(seed=3), _data(tiny_pipeline(seed=3), n=10), cfg, tmp_path / "b")
    resumed.run(progress=False)
    assert resumed.filter_log == whole.filter_log
    assert [r["dropped"] for r in resumed.log] == [r["dropped"] for r in whole.log]  # the running total too
    assert sum(e["samples"] for e in whole.filter_log) == 14 * 4


def test_empty_data_is_an_error(tmp_path):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="empty"):
        Trainer(pipe, TrainData(torch.zeros(0, 4, 8, 8), np.zeros(0, int), []), TrainConfig(), tmp_path)


def test_a_resumed_runs_log_counts_training_time_from_its_checkpoint(tmp_path, monkeypatch):
    import types

    from diffmem.train import trainer as trainer_module

    clock = [0.0]  # a step takes one second; the pause between the two processes, an hour
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(time=lambda: clock[0]))

    def tick(step):
        clock[0] += 1

    cfg = TrainConfig(steps=20, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=5)
    straight = tiny_pipeline(seed=3)
    whole = Trainer(straight, _data(straight), cfg, tmp_path / "a")
    whole.run(progress=False, on_step=tick)

    def stop(step):
        tick(step)
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_pipeline(seed=3), _data(tiny_pipeline(seed=3)), cfg, tmp_path / "b").run(progress=False, on_step=stop)
    clock[0] += 3600
    resumed = Trainer(tiny_pipeline(seed=3), _data(tiny_pipeline(seed=3)), cfg, tmp_path / "b")
    resumed.run(progress=False, on_step=tick)
    assert whole.log[-1]["elapsed_s"] == 19
    # steps 0-9 before the checkpoint (9 s: it is saved before step 9's tick) and 10-18 after; not the pause,
    # nor the lost steps 10-12 of the killed run
    assert resumed.log[-1]["elapsed_s"] == 18


def test_a_lora_run_trains_the_adapters_alone_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(steps=12, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=4, train_text_encoder=True,
                      ema=True, lora_rank=4)
    straight = tiny_pipeline(seed=3)
    before = _weights(straight)
    Trainer(straight, _data(straight), cfg, tmp_path / "a").run(progress=False)
    after = _weights(straight)
    adapters = {k: v for k, v in after.items() if ".lora_" in k}
    # the model's own weights as they were, bit for bit (PEFT keeps them as base_layer); every adapter trained
    assert {k.replace(".base_layer", ""): v for k, v in after.items() if k not in adapters}.keys() == before.keys()
    assert all(torch.equal(before[k.replace(".base_layer", "")], v) for k, v in after.items() if k not in adapters)
    assert sum(".lora_B." in k and k.startswith("te.") for k in adapters) == 8  # q, k, v, out of 2 text layers
    assert all(v.abs().max() > 0 for k, v in adapters.items() if ".lora_B." in k)  # B starts at zero
    # the checkpoint keeps the adapters, not a copy of the model
    saved = load_file(tmp_path / "a" / "checkpoint" / "unet.safetensors")
    assert saved.keys() == {k for k in adapters if not k.startswith("te.")}

    again = _weights(_interrupted_then_resumed(cfg, tmp_path / "b", at_step=6))
    assert again.keys() == after.keys() and all(torch.equal(after[k], again[k]) for k in after)


def test_two_lora_runs_of_one_seed_train_the_same_lora(tmp_path):
    # the adapters' random start came from torch's global generator: two runs of one seed, in a process
    # that had drawn anything else between them, trained different LoRAs
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=1, checkpoint_every=0, lora_rank=4, train_text_encoder=True)
    runs = []
    for i, folder in enumerate(("a", "b")):
        pipe = tiny_pipeline(seed=3)
        torch.manual_seed(100 + i)  # whatever the process drew before
        Trainer(pipe, _data(pipe), cfg, tmp_path / folder).run(progress=False)
        runs.append({k: v for k, v in _weights(pipe).items() if ".lora_" in k})
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_second_training_into_a_folder_in_use_is_refused_before_a_step(tmp_path):
    # the Trainer held nothing: a second process training into the folder wrote the same checkpoints
    from doubles import held_by_another_run

    from diffmem.core.errors import InputError

    pipe = tiny_pipeline(seed=3)
    before = _weights(pipe)
    steps = []
    cfg = TrainConfig(steps=2, batch_size=2, warmup_steps=0, checkpoint_every=1)
    with held_by_another_run(tmp_path / "run"):
        with pytest.raises(InputError, match="run is in use by another diffmem run"):
            Trainer(pipe, _data(pipe), cfg, tmp_path / "run").run(progress=False, on_step=steps.append)
        assert steps == [] and list((tmp_path / "run").iterdir()) == []
    assert all(torch.equal(before[k], v) for k, v in _weights(pipe).items())
