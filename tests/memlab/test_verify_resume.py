"""memlab verify with --out saves each group's records as it finishes: a killed verification
resumes at the group it was in and ends with the figures of an uninterrupted one."""

import json

import pytest

import diffmem.core.generate as generate_module
from diffmem.memlab import dataset as ds
from diffmem.memlab.verify import VerifySettings, verify

SMALL = VerifySettings(seeds=1, control_prompts=2, single_prompts=1, novel_prompts=2)


def test_a_killed_verification_resumes_at_its_group(tmp_path, monkeypatch, memlab_manifest):
    # kept to seconds: generations of 2 sampler steps instead of 25 (what is checked is that saved
    # groups are read back, not generated, and join into the same figures) and the data set built once
    built = {}
    real_build = ds.build
    monkeypatch.setattr(ds, "build", lambda config: built.get(repr(config)) or built.setdefault(repr(config), real_build(config)))
    full_real = generate_module.generate
    real = lambda pipe, prompts, seeds, **k: full_real(pipe, prompts, seeds, **{**k, "num_inference_steps": 2})  # noqa: E731
    monkeypatch.setattr(generate_module, "generate", real)
    whole = verify("memlab", SMALL, progress=False, out=tmp_path / "whole")

    first_template = memlab_manifest["groups"]["template"][0]["test_prompts"][0]["prompt"]
    first_verbatim = memlab_manifest["groups"]["verbatim"][0]["prompt"]
    calls = []

    def killed_at_templates(pipe, prompts, seeds, **k):
        if first_template in prompts:
            raise KeyboardInterrupt
        return real(pipe, prompts, seeds, **k)

    monkeypatch.setattr(generate_module, "generate", killed_at_templates)
    with pytest.raises(KeyboardInterrupt):
        verify("memlab", SMALL, progress=False, out=tmp_path / "run")
    assert (tmp_path / "run" / "parts" / "group_0000" / "done.json").exists()  # verbatim, the first group
    assert not (tmp_path / "run" / "memlab_verify.json").exists()

    def recorded(pipe, prompts, seeds, **k):
        calls.append(list(prompts))
        return real(pipe, prompts, seeds, **k)

    monkeypatch.setattr(generate_module, "generate", recorded)
    resumed = verify("memlab", SMALL, progress=False, out=tmp_path / "run")
    assert calls and not any(first_verbatim in c for c in calls)  # the saved group was not generated again
    assert any(first_template in c for c in calls)
    read = lambda run, name: json.loads((tmp_path / run / name).read_text())  # noqa: E731
    assert read("run", "memlab_verify_prompts.json") == read("whole", "memlab_verify_prompts.json")
    figures = lambda res: {k: v for k, v in res.items() if k != "wall_time_s"}  # noqa: E731
    assert json.dumps(figures(resumed), sort_keys=True, default=str) == json.dumps(figures(whole), sort_keys=True, default=str)
    assert not (tmp_path / "run" / "parts").exists()  # gone once the records are joined


def test_an_unwritable_out_fails_before_any_generation(tmp_path, monkeypatch, capsys):
    from diffmem import cli

    def no_generation(*a, **k):
        raise AssertionError("generated before checking the output folder")

    monkeypatch.setattr(generate_module, "generate", no_generation)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["memlab", "verify", "--out", str(blocker / "sub")])
    assert e.value.code == 2 and "cannot be created" in capsys.readouterr().err


@pytest.mark.parametrize("make, says", [
    (lambda tmp: tmp / "nope", "control model: model folder not found"),
    (lambda tmp: tmp, "control model:"),  # a folder, but not a pipeline: no model_index.json
])
def test_a_bad_control_model_fails_before_any_generation(tmp_path, monkeypatch, capsys, make, says):
    # its AUC is measured last: before this check a wrong path failed after the whole verification
    from diffmem import cli
    import diffmem.core.loading as loading

    def no_loading(*a, **k):
        raise AssertionError("loaded the model before checking the control model")

    monkeypatch.setattr(loading, "load_pipeline", no_loading)
    monkeypatch.setattr(generate_module, "generate", no_loading)
    with pytest.raises(SystemExit) as e:
        cli.main(["memlab", "verify", "--control-model", str(make(tmp_path))])
    assert e.value.code == 2 and says in capsys.readouterr().err
