import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from diffmem.core.errors import InputError
from diffmem.train.api import train_pipeline
from diffmem.train.trainer import CHECKPOINT_DIR


def test_skipped_rows_are_warned_and_a_fixed_rerun_leaves_no_stale_list(tmp_path, tiny_pipe_dir,
                                                                         colour_folder_with_a_broken_row):
    data = colour_folder_with_a_broken_row
    out = tmp_path / "out"
    common = dict(steps=1, batch_size=2, checkpoint_every=0, progress=False)
    with pytest.warns(UserWarning, match=r"1 of 4 rows of .* skipped \(the first: row 3, unreadable image: \w+ \(.*broken\.png"):
        train_pipeline(str(tiny_pipe_dir), str(data), out, **common)
    assert [p["row"] for p in json.loads((out / "data_problems.json").read_text())] == [3]

    # the user mends the image and runs again (the first run killed before it saved a checkpoint):
    # the list of problems must not outlive them
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(data / "broken.png")
    model_dir = train_pipeline(str(tiny_pipe_dir), str(data), out, **common)
    assert json.loads((model_dir / "diffmem_train.json").read_text())["skipped_rows"] == 0
    assert not (out / "data_problems.json").exists()


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_model_folder_diffmem_train_did_not_write_is_never_replaced(tmp_path, tiny_pipe_dir,
                                                                      colour_folder_with_a_broken_row):
    data, project = colour_folder_with_a_broken_row, tmp_path / "project"
    common = dict(steps=1, batch_size=2, checkpoint_every=0, progress=False)
    shutil.copytree(tiny_pipe_dir, project / "model")  # the user's own model, where the trained one would go
    before = _tree(project)
    for start in (str(tiny_pipe_dir), str(project / "model")):  # another model, or that very one
        with pytest.raises(InputError, match="choose another --out"):
            train_pipeline(start, str(data), project, **common)
        assert _tree(project) == before  # refused before anything was written

    # diffmem's own model in OUT is replaced by the next run, whole; fine-tuning it into the same OUT is refused
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipped"):
        first = _tree(train_pipeline(str(tiny_pipe_dir), str(data), out, **common))
    with pytest.warns(UserWarning, match="skipped"):
        model_dir = train_pipeline(str(tiny_pipe_dir), str(data), out, **{**common, "steps": 2})
    assert _tree(model_dir) != first and json.loads((model_dir / "diffmem_train.json").read_text())["config"]["steps"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["data_problems.json", "latents", "model"]  # no .tmp or .old left
    with pytest.raises(InputError, match="would replace the model it starts from"):
        train_pipeline(str(model_dir), str(data), out, **common)


def test_a_model_a_kill_left_whole_beside_its_folder_is_moved_in_and_not_trained_again(
        tmp_path, tiny_pipe_dir, colour_folder_with_a_broken_row, monkeypatch):
    from doubles import killed_renaming

    from diffmem.train.trainer import Trainer

    data, out = colour_folder_with_a_broken_row, tmp_path / "out"
    common = dict(steps=3, batch_size=2, checkpoint_every=2, progress=False)
    # killed as it moves the new model in
    with killed_renaming(monkeypatch, "model.new"), pytest.warns(UserWarning, match="skipped"), \
            pytest.raises(KeyboardInterrupt):
        train_pipeline(str(tiny_pipe_dir), str(data), out, **common)
    saved = _tree(out / "model.new")
    assert not (out / "model").exists()

    # run again with a setting its checkpoint refuses: the whole model is in place all the same
    with pytest.raises(InputError, match="checkpoint of another training run"):
        train_pipeline(str(tiny_pipe_dir), str(data), out, **{**common, "lr": 5e-4})
    assert _tree(out / "model") == saved and not (out / "model.new").exists()

    # run again as it was: the checkpoint of its last step is resumed, no step trained twice
    steps, run = [], Trainer.run
    monkeypatch.setattr(Trainer, "run", lambda self, **kw: run(self, **kw, on_step=steps.append))
    with pytest.warns(UserWarning, match="skipped"):
        model_dir = train_pipeline(str(tiny_pipe_dir), str(data), out, **common)
    assert steps == []
    assert {k: v for k, v in _tree(model_dir).items() if k.suffix == ".safetensors"} == {
        k: v for k, v in saved.items() if k.suffix == ".safetensors"}


def test_a_latents_folder_diffmem_did_not_write_is_kept_and_a_refused_source_writes_nothing(
        tmp_path, tiny_pipe_dir, colour_folder_with_a_broken_row):
    data, project = colour_folder_with_a_broken_row, tmp_path / "project"
    common = dict(steps=1, batch_size=2, checkpoint_every=0, progress=False)
    (project / "latents").mkdir(parents=True)
    (project / "latents" / "mine.npy").write_bytes(b"the user's own latents")
    with pytest.raises(InputError, match="latents holds files diffmem train did not write"):
        train_pipeline(str(tiny_pipe_dir), str(data), project, **common)
    assert _tree(project) == {Path("latents/mine.npy"): b"the user's own latents"}

    out = tmp_path / "out"
    with pytest.raises(InputError, match="no caption column 'nope'"):
        train_pipeline(str(tiny_pipe_dir), str(data), out, caption_column="nope", **common)
    assert not (out / "latents").exists()


def test_a_second_training_into_a_folder_in_use_is_refused_through_the_python_api(tmp_path, tiny_pipe_dir,
                                                                                  colour_folder_with_a_broken_row):
    # only the command line held OUT: two processes training into one folder encoded the same latents
    # and wrote the same checkpoints at once
    from doubles import held_by_another_run

    out = tmp_path / "out"
    with held_by_another_run(out):
        with pytest.raises(InputError, match="out is in use by another diffmem run"):
            train_pipeline(str(tiny_pipe_dir), str(colour_folder_with_a_broken_row), out, steps=1, batch_size=2,
                           checkpoint_every=0, progress=False)
        assert list(out.iterdir()) == []
