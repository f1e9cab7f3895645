"""memlab train's working folder: its own or a new one, never a user's folder it would overwrite or misread."""

import json
from dataclasses import replace

import pytest

from diffmem.core.errors import InputError
from diffmem.memlab import recipe


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_that_is_not_a_training_run_is_refused_before_any_work(tmp_path, tiny_pipe_dir):
    import shutil

    foreign = tmp_path / "project"
    shutil.copytree(tiny_pipe_dir, foreign)  # a pipeline folder: its vae/ would be read as a finished VAE stage
    before = _tree(foreign)
    with pytest.raises(InputError, match="not an earlier MemLab training run"):
        recipe.run(recipe.MemLabRecipe(), foreign, progress=False)
    finished = tmp_path / "run" / "vae"  # another run's finished VAE stage
    finished.mkdir(parents=True)
    (finished / "config.json").write_text("{}")
    (finished.parent / recipe.VAE_STATS).write_text("{}")
    with pytest.raises(InputError, match="not an earlier MemLab training run"):
        recipe.reuse_vae(finished, foreign)
    assert _tree(foreign) == before


@pytest.mark.slow
def test_a_tiny_run_and_a_second_run_seeded_with_its_vae(tmp_path, monkeypatch):
    rc = recipe.MemLabRecipe()
    rc = replace(rc, vae_steps=1, train=replace(rc.train, steps=1, checkpoint_every=0))
    first = tmp_path / "main"
    model_dir = recipe.run(rc, first, progress=False)
    assert sorted(p.name for p in first.iterdir()) == ["model", "vae", recipe.VAE_STATS]  # no vae.tmp left
    assert (model_dir / "memlab_manifest.json").exists()
    record = lambda: json.loads((first / "model" / recipe.RECIPE_RECORD).read_text())  # noqa: E731
    assert record()["this_run"] == {"vae_stage_reused": False, "training_from_step": 0}
    vae = _tree(first / "vae")
    (first / "vae").rename(first / "vae.new")  # as a kill between the VAE swap's two renames leaves it
    (first / "model").rename(first / "model.new")  # and the model's: its save was swapped in whole too

    def trained_again(*args, **kwargs):
        raise AssertionError("the VAE stage was trained again")

    monkeypatch.setattr(recipe, "train_vae", trained_again)
    recipe.run(rc, first, progress=False)  # its own folder: run again, the VAE stage (finished in vae.new) reused
    assert _tree(first / "vae") == vae and not (first / "vae.new").exists()
    assert sorted(p.name for p in first.iterdir()) == ["model", "vae", recipe.VAE_STATS]
    # its wall_time_s covers only this run: the record says what it took over from the first
    assert record()["this_run"] == {"vae_stage_reused": True, "training_from_step": 0}
    second = tmp_path / "control"
    recipe.reuse_vae(first / "vae", second)
    assert _tree(second) == {k: v for k, v in _tree(first).items() if k.parts[0] != "model"}


@pytest.mark.slow
def test_a_finished_model_folder_seeds_the_vae_stage_when_its_recipe_matches(tmp_path):
    import json

    rc = recipe.MemLabRecipe()
    rc = replace(rc, vae_steps=1, train=replace(rc.train, steps=1, checkpoint_every=0))
    model_dir = recipe.run(rc, tmp_path / "main", progress=False)
    recorded = json.loads((model_dir / recipe.RECIPE_RECORD).read_text())
    for source, out in ((model_dir, tmp_path / "a"), (model_dir / "vae", tmp_path / "b")):
        recipe.reuse_vae(source, out, recipe.control_recipe(rc))  # duplication does not change the VAE stage
        assert _tree(out / "vae") == _tree(model_dir / "vae")
        assert json.loads((out / recipe.VAE_STATS).read_text()) == recorded["vae"]
    other = replace(rc, vae_steps=2)  # another VAE stage: its VAE must be trained, not copied
    with pytest.raises(InputError, match="other data, architecture, VAE steps or seed"):
        recipe.reuse_vae(model_dir, tmp_path / "c", other)
    assert not (tmp_path / "c").exists()
    with pytest.raises(InputError, match="is not a finished MemLab VAE stage"):
        recipe.reuse_vae(tmp_path / "a", tmp_path / "d", rc)  # a run folder, not its vae/
    assert not (tmp_path / "d").exists()


def test_the_shipped_models_vae_seeds_a_run_of_the_shipped_recipe(tmp_path):
    import json

    from diffmem.core.loading import memlab_path

    out = tmp_path / "filtered"
    recipe.reuse_vae("memlab", out, recipe.MemLabRecipe())
    assert _tree(out / "vae") == _tree(memlab_path() / "vae")
    shipped = json.loads((memlab_path() / recipe.RECIPE_RECORD).read_text())
    assert json.loads((out / recipe.VAE_STATS).read_text()) == shipped["vae"]
    recipe.check_run_folder(out)  # a run takes it as its own folder, the VAE stage done


def test_a_second_training_run_into_a_folder_in_use_is_refused_before_any_work(tmp_path, monkeypatch):
    # only the command line held OUT: a second run from Python wrote the same VAE stage and checkpoints
    from doubles import held_by_another_run

    built = []
    monkeypatch.setattr(recipe.ds, "build", lambda *a, **k: built.append(a) or pytest.fail("the data was built"))
    with held_by_another_run(tmp_path / "run"):
        with pytest.raises(InputError, match="run is in use by another diffmem run"):
            recipe.run(recipe.MemLabRecipe(), tmp_path / "run", progress=False)
        assert built == [] and list((tmp_path / "run").iterdir()) == []
