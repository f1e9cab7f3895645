"""The command line: bad input gives one clear line and exit code 2, never a traceback."""

import json
import subprocess
import sys

import pytest

from forked_cli import run_cli as run


def test_missing_model_folder(tmp_path):
    r = run("train", "--model", str(tmp_path / "nope"), "--data", "memlab", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "model folder not found" in r.stderr and "Traceback" not in r.stderr


def test_folder_that_is_not_a_pipeline(tmp_path):
    r = run("memlab", "verify", "--model", str(tmp_path))
    assert r.returncode == 2 and "no model_index.json" in r.stderr and "Traceback" not in r.stderr


def test_memlab_train_refuses_a_vae_source_that_is_not_one_before_making_its_folder(tmp_path, tiny_pipe_dir):
    out = tmp_path / "run"
    r = run("memlab", "train", "--out", str(out), "--vae-from", str(tiny_pipe_dir / "vae"))  # a pipeline's, not a stage's
    assert r.returncode == 2 and "is not a finished MemLab VAE stage" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = run("memlab", "build", "--out", str(blocker / "sub"))
    assert r.returncode == 2 and "cannot be created" in r.stderr and "Traceback" not in r.stderr


def test_brackets_in_user_text_are_printed_as_written(tmp_path, tiny_pipe_dir):
    # rich markup would read "[bold]" as a style and fail on "[/x]": paths, prompts and words are printed literally
    missing = tmp_path / "[/x] [bold]p.txt"
    r = run("detect", "--prompts", str(missing), "--out", str(tmp_path / "r.parquet"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and f"prompt file not found: {missing}" in r.stderr
    out = tmp_path / "[/x] [bold]out"
    r = run("explain", "--prompt", "a [/ circle ] [bold] red", "--model", str(tiny_pipe_dir), "--num-inference-steps", "4",
            "--out", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "a [/ circle ] [bold] red" in r.stdout and f"wrote {out}/attribution.json" in r.stdout
    assert "[/=" in r.stdout  # the ranking lists the word "[/" as it is


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0 and "train" in r.stdout and "memlab" in r.stdout


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, path + (name,))


def test_help_texts_survive_rich_markup():
    # typer reads every help text as rich markup: "[features]" would vanish from the printed help
    import inspect

    import typer
    from rich.text import Text

    from diffmem.cli import app

    checked = 0
    for path, command in _commands(typer.main.get_command(app)):
        for text in [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]:
            text = inspect.cleandoc(text)
            assert Text.from_markup(text).plain == text.replace("\\[", "["), (path, text)
            checked += bool(text)
    assert checked > 100
    r = run("categorize", "--help", env={"COLUMNS": "250"})
    assert "YAML {concept: [features]}" in r.stdout


def test_detect_bad_inputs_never_write_results(tmp_path):
    import pandas as pd

    out = tmp_path / "r.parquet"
    cases = {
        "empty.txt": (b"", "holds no prompts"),
        "blank.txt": (b"a cat\n\na dog\n", "line 2: empty prompt"),
        "latin.txt": ("caf\xe9".encode("latin-1"), "not UTF-8"),
        "nocol.csv": (b"id,text\n1,x\n", "no column 'prompt'"),
    }
    for name, (content, msg) in cases.items():
        f = tmp_path / name
        f.write_bytes(content)
        r = run("detect", "--prompts", str(f), "--out", str(out), *(["--column", "prompt"] if name.endswith("csv") else []))
        assert r.returncode == 2, (name, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert not out.exists() and not list(tmp_path.glob(".r.parquet*"))
    ok = tmp_path / "ok.txt"
    ok.write_text("a cat\n")
    r = run("detect", "--prompts", str(ok), "--model", str(tmp_path / "missing-model"), "--out", str(out))
    assert r.returncode == 2 and "model folder not found" in r.stderr and not out.exists()
    # options that were ignored without a word: a fitted calibration replaced the file given, and --fpr
    # went unused without --calibrate-with
    cal = tmp_path / "c.json"
    cal.write_text("{}")
    for extra, said in ((["--calibration", str(cal), "--calibrate-with", str(ok)], "not both"),
                        (["--fpr", "0.05"], "--fpr is the false-positive rate of a calibration fitted with --calibrate-with"),
                        (["--calibration", str(cal), "--fpr", "0.05"], "a --calibration file brings its own")):
        r = run("detect", "--prompts", str(ok), "--out", str(out), *extra)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr and not out.exists(), (extra, r.stderr)
    # the results file named as the prompts or the reference file: it replaced them with the scores
    table = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": ["a cat", "a dog"], "source": ["mine", "mine"]}).to_parquet(table)
    before = table.read_bytes()
    for args in (["--prompts", str(table)], ["--prompts", str(ok), "--calibrate-with", str(table)]):
        r = run("detect", *args, "--out", str(table))
        assert r.returncode == 2 and "choose another --out" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert table.read_bytes() == before


def test_bad_prompt_files_fail_before_torch_loads(tmp_path):
    """A bad prompt file is reported at once: nothing heavy (torch, diffusers) is imported before the check."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    probe = ("import sys\nfrom diffmem.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    print('exit', e.code, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    for command in (["detect", "--out", str(tmp_path / "r.parquet")], ["mitigate", "--target", "1", "--out", str(tmp_path / "m")],
                    ["categorize", "--out", str(tmp_path / "c")]):
        r = subprocess.run([sys.executable, "-c", probe, *command, "--prompts", str(empty)], capture_output=True, text=True,
                           timeout=120)
        assert "holds no prompts" in r.stderr, (command, r.stderr)
        assert r.stdout.split()[-4:] == ["exit", "2", "False", "False"], (command, r.stdout)


def test_many_long_prompts_show_a_few_warnings_and_count_the_rest(tmp_path, tiny_pipe_dir):
    from diffmem.cli import WARNINGS_SHOWN

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i} " + "word " * 100 + "\n" for i in range(WARNINGS_SHOWN + 3)) + "a cat\n")
    r = run("detect", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--num-inference-steps", "4",
            "--out", str(tmp_path / "r.parquet"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("truncated to 77 tokens") == WARNINGS_SHOWN
    assert "prompt 4 word" in r.stderr and "prompt 5 word" not in r.stderr  # the first ones, in order
    assert r.stderr.rstrip().endswith("3 more warnings of this kind (PromptTruncationWarning) not shown")
    assert "scored 9 prompts" in r.stdout
    # each warning starts a line of its own: the progress bar is cleared first, not written after
    import re

    starts = [m.start() for m in re.finditer("warning:", r.stderr)]
    assert starts and all(i == 0 or r.stderr[i - 1] in "\r\n" for i in starts), r.stderr[:500]


def test_detect_end_to_end_with_calibration_and_long_prompt(tmp_path, tiny_pipe_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n" + "word " * 100 + "\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(f"reference prompt {i}" for i in range(20)) + "\n")
    out = tmp_path / "r.parquet"
    r = run("detect", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--out", str(out),
            "--num-inference-steps", "4", "--calibrate-with", str(ref), "--fpr", "0.1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("truncated to 77 tokens") == 1  # the warning names the prompt, once
    assert "also in the reference prompts" not in r.stderr
    assert "scored 3 prompts" in r.stdout and "flagged" in r.stdout
    assert f"histogram of the scores -> {tmp_path / 'r.png'}" in r.stdout and (tmp_path / "r.png").stat().st_size > 1000
    from diffmem.detect import DetectionResult

    res = DetectionResult.load(out)
    assert len(res.prompts) == 3 and res.threshold is not None
    assert "verdict" in res.to_frame()

    # a prompt to judge among the reference prompts: said, as it raises the threshold were it memorized
    shared = tmp_path / "shared.txt"
    shared.write_text(ref.read_text() + "a dog\n")
    r = run("detect", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "s.parquet"),
            "--num-inference-steps", "4", "--calibrate-with", str(shared), "--fpr", "0.1")
    assert r.returncode == 0 and "1 of the prompts to judge is also in the reference prompts" in r.stderr, r.stderr

    # mitigation takes its target only from a calibration of its own loss (first step, same seeds)
    cal = out.with_name("r.calibration.json")
    mit = tmp_path / "mit"
    r = run("mitigate", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--calibration", str(cal),
            "--out", str(mit), "--generations", "2", "--max-iters", "1")
    assert r.returncode == 2 and "generations=1 (needs 2)" in r.stderr and "Traceback" not in r.stderr
    assert not mit.exists() or not any(mit.iterdir())
    r = run("mitigate", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--calibration", str(cal),
            "--out", str(mit), "--generations", "1", "--loss-steps", "2", "--max-iters", "1")
    assert r.returncode == 2 and "steps=[0] (needs [0, 1])" in r.stderr and "Traceback" not in r.stderr
    assert not mit.exists() or not any(mit.iterdir())
    # with the sampler the calibration was made on, it is taken
    r = run("mitigate", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--calibration", str(cal),
            "--out", str(mit), "--generations", "1", "--max-iters", "1", "--num-inference-steps", "4")
    assert r.returncode == 0, r.stderr
    done = json.loads((mit / "mitigation.json").read_text())
    assert done["settings"]["num_inference_steps"] == 4
    assert done["settings"]["target"] == json.loads(cal.read_text())["threshold"]
    assert not (mit / "parts").exists()  # the resume parts go once the joined result is saved
    # a part left by a run with other settings is refused, not mixed in
    (mit / "parts" / "part_0000").mkdir(parents=True)
    (mit / "parts" / "part_0000" / "done.json").write_text('{"key": "from another run"}')
    r = run("mitigate", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--method", "rna",
            "--out", str(mit), "--generations", "1", "--num-inference-steps", "4")
    assert r.returncode == 2 and "holds mitigation parts of other prompts" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((mit / "mitigation.json").read_text()) == done


def test_detect_scores_seed_consistency_as_the_python_api_does(tmp_path, tiny_pipe_dir):
    from diffmem.core.loading import load_pipeline, sampler_defaults
    from diffmem.detect import DetectionResult, SeedConsistencyDetector

    texts = ["a cat", "a red cube on grass"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(texts) + "\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(f"reference prompt {i}" for i in range(20)) + "\n")
    common = ("--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--num-inference-steps", "4")
    r = run("detect", *common, "--method", "seed-consistency", "--out", str(tmp_path / "x0.parquet"),
            "--calibrate-with", str(ref), "--fpr", "0.1")
    assert r.returncode == 0, r.stderr
    assert "flagged" in r.stdout and (tmp_path / "x0.png").stat().st_size > 1000
    pipe = load_pipeline(tiny_pipe_dir)
    guidance = sampler_defaults(pipe)["guidance_scale"]
    got = DetectionResult.load(tmp_path / "x0.parquet")
    expected = SeedConsistencyDetector(pipe, "x0", 4, 4, guidance).score(texts)
    assert got.method == "seed_consistency" and got.settings["mode"] == "x0" and got.seeds == [0, 1, 2, 3]
    assert got.scores == pytest.approx(expected.scores, rel=1e-5) and got.threshold is not None
    r = run("detect", *common, "--method", "seed-consistency", "--mode", "images", "--generations", "2", "--seed", "5",
            "--out", str(tmp_path / "images.json"))
    assert r.returncode == 0, r.stderr
    got = DetectionResult.load(tmp_path / "images.json")
    expected = SeedConsistencyDetector(pipe, "images", 2, 4, guidance, seed=5).score(texts)
    assert got.settings["mode"] == "images" and got.seeds == [5, 6]
    assert got.scores == pytest.approx(expected.scores, rel=1e-5)
    # a calibration of one detector does not judge the other's scores
    r = run("detect", *common, "--out", str(tmp_path / "nn.parquet"), "--calibration", str(tmp_path / "x0.calibration.json"))
    assert r.returncode == 2 and "method 'noise_norm' vs calibrated 'seed_consistency'" in r.stderr, r.stderr
    # the other detector's options, or impossible ones: said before the model loads (it is not there), nothing written
    for extra, said in ((["--method", "seed-consistency", "--steps", "0,1"], "--steps applies to --method noise-norm"),
                        (["--mode", "x0"], "--mode applies to --method seed-consistency"),
                        (["--method", "seed-consistency", "--mode", "latents"], "--mode must be x0 or images"),
                        (["--method", "seed-consistency", "--generations", "1"], "--generations must be at least 2"),
                        (["--method", "wen"], "--method must be noise-norm or seed-consistency")):
        r = run("detect", "--prompts", str(prompts), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "bad.parquet"),
                *extra)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "bad.parquet").exists()


def test_detect_scores_a_model_with_its_lora_fused(tmp_path, tiny_pipe_dir, tiny_lora):
    from diffmem.core.loading import load_pipeline
    from diffmem.detect import DetectionResult, NoiseNormDetector

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na red cube on grass\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(f"reference prompt {i}" for i in range(20)) + "\n")
    base_out, lora_out = tmp_path / "base.parquet", tmp_path / "lora.parquet"
    common = ("--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--num-inference-steps", "4")
    r = run("detect", *common, "--out", str(base_out), "--calibrate-with", str(ref), "--fpr", "0.1")
    assert r.returncode == 0, r.stderr
    r = run("detect", *common, "--out", str(lora_out), "--lora", str(tiny_lora), "--lora-scale", "0.7")
    assert r.returncode == 0, r.stderr
    fused = DetectionResult.load(lora_out)
    expected = NoiseNormDetector(load_pipeline(tiny_pipe_dir, lora=tiny_lora, lora_scale=0.7), 4, 7.5).score(
        ["a cat", "a red cube on grass"])
    assert fused.scores == pytest.approx(expected.scores, rel=1e-5)
    assert not fused.scores == pytest.approx(DetectionResult.load(base_out).scores, rel=1e-3)
    assert fused.model["lora"]["scale"] == 0.7
    # the base model's calibration does not apply to the fused model, and says which LoRA makes the difference
    r = run("detect", *common, "--out", str(tmp_path / "l2.parquet"), "--lora", str(tiny_lora),
            "--calibration", str(tmp_path / "base.calibration.json"))
    assert r.returncode == 2 and "with the LoRA pytorch_lora_weights.safetensors at scale 1 is not" in r.stderr, r.stderr
    assert not (tmp_path / "l2.parquet").exists()
    # a scale without a LoRA, or a LoRA that is not there: said before the model loads, nothing written
    for extra, said in ((["--lora-scale", "0.5"], "--lora-scale scales a --lora: give that too"),
                        (["--lora", str(tmp_path / "nowhere.safetensors")], "LoRA not found")):
        r = run("detect", *common, "--out", str(tmp_path / "l3.parquet"), *extra)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "l3.parquet").exists()


def test_explain_reads_a_textual_inversion_file_as_the_pipeline_does(tmp_path, tiny_pipe, tiny_pipe_dir):
    import torch
    from safetensors.torch import save_file

    width = tiny_pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"<my-style>": torch.randn(3, width, generator=torch.Generator().manual_seed(5))}, tmp_path / "style.safetensors")
    out = tmp_path / "ex"
    r = run("explain", "--prompt", "a <my-style> cat", "--model", str(tiny_pipe_dir), "--num-inference-steps", "4",
            "--textual-inversion", str(tmp_path / "style.safetensors"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    done = json.loads((out / "attribution.json").read_text())
    assert done["words"] == ["a", "<my-style>", "cat"]  # one word, read with all three of its vectors
    assert [t for t in done["tokens"] if t.startswith("<my-style>")] == ["<my-style>", "<my-style>_1", "<my-style>_2"]
    r = run("explain", "--prompt", "a <my-style> cat", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "ex2"),
            "--textual-inversion", str(tmp_path / "style.pt"))
    assert r.returncode == 2 and "textual-inversion embedding not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ex2").exists()


def test_a_finished_job_removes_its_parts_and_keeps_the_users_own_parts_folder(tmp_path, tiny_pipe_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    project = tmp_path / "project"
    (project / "parts").mkdir(parents=True)
    (project / "parts" / "bolt.step").write_text("the user's own")
    r = run("mitigate", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--method", "gni", "--generations", "1",
            "--num-inference-steps", "2", "--out", str(project))
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (project / "parts").iterdir()] == ["bolt.step"]  # the job's part_0000 went, not the folder
    assert (project / "mitigation.json").exists()


def test_mitigate_measures_any_model_against_its_training_images_and_clip(tmp_path, tiny_pipe_dir, tiny_clip_dir):
    """Without MemLab's manifest, mitigate kept only losses; with --train-images (and --sscd / --clip) it
    measures replication and alignment on any model. Here the training set holds the model's own
    unmitigated generations, so every generation before mitigation is a copy of a known row."""
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square on the left\n")
    common = ["--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--method", "rna", "--generations", "2",
              "--num-inference-steps", "4"]
    r = run("mitigate", *common, "--placement", "end", "--n-numbers", "2", "--out", str(tmp_path / "plain"))
    assert r.returncode == 0, r.stderr
    plain = json.loads((tmp_path / "plain" / "mitigation.json").read_text())
    assert plain["measures"] == {} and plain["settings"]["placement"] == "end" and plain["settings"]["n_numbers"] == 2
    assert all(new.startswith(old + " ") and len(new.split()) == len(old.split()) + 2  # rna's options reach it
               for new, old in zip(plain["mitigated_prompts"], prompts.read_text().splitlines()))
    before = np.load(tmp_path / "plain" / "images.npz")["before"]
    train = tmp_path / "train"
    train.mkdir()
    for i in range(2):
        for j in range(2):  # rows 2i + j, in file-name order
            Image.fromarray((before[i, j] * 255).round().astype(np.uint8)).save(train / f"gen_{i}_{j}.png")
    out = tmp_path / "measured"
    r = run("mitigate", *common, "--train-images", str(train), "--clip", str(tiny_clip_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    done = json.loads((out / "mitigation.json").read_text())
    m = done["measures"]
    assert m["replication_before"] == [1.0, 1.0] and m["nearest_before"][0] in (0, 1) and m["nearest_before"][1] in (2, 3)
    assert [m["nearest_location_before"][i] == f"gen_{i}_{m['nearest_before'][i] % 2}.png" for i in (0, 1)] == [True, True]
    assert len(m["alignment_before"]) == len(m["alignment_after"]) == 2 and all(abs(a) <= 1 for a in m["alignment_after"])
    assert "4 training images from" in done["settings"]["measured_with"]["replication"]
    assert "replication 1.000 -> " in r.stdout and "alignment: CLIP score" in r.stdout
    assert "nearest to each prompt's generations" in " ".join(r.stdout.split())
    assert sorted(p.name for p in out.glob("nearest_*.png")) == ["nearest_0000.png", "nearest_0001.png"]
    assert {"replication_before", "similarity_after", "nearest_after", "nearest_location_after", "alignment_after"} <= set(
        open(out / "mitigation.csv").readline().strip().split(","))

    # bad measure inputs fail before the model loads and write nothing
    bad = tmp_path / "bad"
    for extra, said in ((["--sscd", str(tmp_path / "sscd.pt")], "--sscd and --image-column measure replication against --train-images"),
                        (["--train-images", str(tmp_path / "nowhere")], "dataset not found"),
                        (["--train-images", str(train), "--sscd", str(tmp_path / "sscd.pt")], "SSCD model file not found"),
                        (["--clip", str(tmp_path / "no-clip")], "CLIP model folder not found"),
                        # another method's options were ignored without a word
                        (["--target", "0.5", "--lr", "0.1"], "--target (embedding), --lr (embedding) are options of "
                                                             "another method than --method rna; leave them out"),
                        (["--sigma", "0.3"], "--sigma (gni) is an option of another method than --method rna"),
                        (["--n-tokens", "3"], "--n-tokens (rta) is an option of another method than --method rna"),
                        (["--placement", "middle"], "--placement must be one of random, end, got 'middle'"),
                        # an option two methods share is named once, with both
                        (["--method", "gni", "--placement", "end"], "--placement (rta, rna) is an option of another "
                                                                    "method than --method gni; leave it out")):
        r = run("mitigate", *common, *extra, "--out", str(bad))
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert not bad.exists()


def test_train_reads_a_table_by_the_columns_it_is_given(tmp_path, tiny_pipe_dir, colour_folder_with_a_broken_row):
    # --image-column, which the scan had, reaches diffmem train: a table the scan read with it can be trained on
    import json

    import pandas as pd

    rows = [json.loads(line) for line in (colour_folder_with_a_broken_row / "metadata.jsonl").read_text().splitlines()]
    table = colour_folder_with_a_broken_row / "table.csv"
    pd.DataFrame({"picture": [r["file_name"] for r in rows], "words": [r["text"] for r in rows]}).to_csv(table, index=False)
    args = ["train", "--model", str(tiny_pipe_dir), "--data", str(table), "--out", str(tmp_path / "out"), "--batch-size", "2",
            "--steps", "1", "--checkpoint-every", "0", "--caption-column", "words"]
    r = run(*args)
    assert r.returncode == 2 and "no image column" in r.stderr and "--image-column" in r.stderr, r.stderr
    r = run(*args, "--image-column", "picture")
    assert r.returncode == 0, r.stderr
    assert "(3 image-caption pairs; 1 row skipped" in " ".join(r.stdout.split())


def test_train_end_to_end_and_resume(tmp_path, tiny_pipe_dir, colour_folder_with_a_broken_row):
    import json

    data = colour_folder_with_a_broken_row
    out = tmp_path / "out"
    args = ["train", "--model", str(tiny_pipe_dir), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--checkpoint-every", "2", "--prediction-type", "v_prediction", "--ema"]
    r = run(*args, "--steps", "3")
    assert r.returncode == 0, r.stderr
    # a skipped row is said before training, not only written to a file
    assert "1 of 4 rows of" in r.stderr and "row 3, unreadable image" in r.stderr, r.stderr
    assert "(3 image-caption pairs; 1 row skipped, listed in" in " ".join(r.stdout.split())
    assert json.loads((out / "data_problems.json").read_text())[0]["row"] == 3
    assert (out / "checkpoint" / "state.json").exists()
    parts = sorted(out.glob("latents/part-*.safetensors"))
    assert len(parts) == 1 and (out / "latents" / "key.json").exists()
    stamps = [p.stat().st_mtime_ns for p in parts]
    r = run(*args, "--steps", "5", "--mixed-precision", "bf16")  # resumes from the checkpoint at step 2
    assert r.returncode == 0, r.stderr
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("latents/part-*.safetensors"))] == stamps  # not encoded again
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    log = json.loads((out / "model" / "diffmem_train.json").read_text())
    assert log["rows"] == 3 and log["config"]["ema"] is True
    assert log["config"]["mixed_precision"] == "bf16" and log["device"] == "cpu"
    assert log["mem_filter"] is None and (out / "model" / "training.png").stat().st_size > 1000
    assert f"loss curve in {out / 'model' / 'training.png'}" in " ".join(r.stdout.split())
    saved = (out / "model" / "diffmem_train.json").read_text()
    r = run(*args, "--steps", "5", "--lr", "5e-4")  # not a continuation of that run: refused, nothing rewritten
    assert r.returncode == 2 and "is a checkpoint of another training run (lr 0.0001 -> 0.0005)" in r.stderr
    assert (out / "model" / "diffmem_train.json").read_text() == saved
    # the memorization filter says what it dropped: 3 rows in batches of 2 (2 steps an epoch); at 0 it drops
    # every captioned sample (the caption-dropout ones have no text-conditional part, and are kept)
    filtered = tmp_path / "filtered"
    r = run("train", "--model", str(tiny_pipe_dir), "--data", str(data), "--out", str(filtered), "--batch-size", "2",
            "--steps", "3", "--mem-filter-threshold", "0")
    assert r.returncode == 0, r.stderr
    mf = json.loads((filtered / "model" / "diffmem_train.json").read_text())["mem_filter"]
    assert [(e["samples"], e["complete"]) for e in mf["epochs"]] == [(4, True), (2, False)]
    assert mf["samples"] == 6 and mf["dropped"] == sum(e["dropped"] for e in mf["epochs"]) > 0
    said = f"dropped {mf['dropped']} of 6 samples ({mf['dropped'] / 6:.1%}) over 2 epoch(s)"
    assert said in " ".join(r.stdout.split()) and (filtered / "model" / "training.png").exists()


def test_train_a_lora_then_audit_it_with_the_base_model(tmp_path, tiny_pipe_dir, colour_folder_with_a_broken_row):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "out"
    r = run("train", "--model", str(tiny_pipe_dir), "--data", str(colour_folder_with_a_broken_row), "--out", str(out),
            "--batch-size", "2", "--steps", "4", "--lr", "1e-2", "--lora-rank", "4", "--train-text-encoder")
    assert r.returncode == 0, r.stderr
    assert f"trained LoRA (rank 4) saved to {out / 'model'} (audit it with --model {tiny_pipe_dir} --lora {out / 'model'})" \
        in " ".join(r.stdout.split())
    assert sorted(p.name for p in (out / "model").iterdir()) == ["diffmem_train.json", "pytorch_lora_weights.safetensors",
                                                                 "training.png"]
    # the saved LoRA is what the run trained: the adapters of its last checkpoint (step 4), in diffusers' keys
    saved = load_file(out / "model" / "pytorch_lora_weights.safetensors")
    trained = {**{"unet." + k: v for k, v in load_file(out / "checkpoint" / "unet.safetensors").items()},
               **{"text_encoder." + k: v for k, v in load_file(out / "checkpoint" / "text_encoder.safetensors").items()}}

    def diffusers_key(key):
        if key.startswith("unet."):
            return key.replace(".lora_A.default.", ".lora.down.").replace(".lora_B.default.", ".lora.up.")
        return key.replace(".lora_A.default.", ".lora_linear_layer.down.").replace(".lora_B.default.", ".lora_linear_layer.up.")

    assert saved.keys() == {diffusers_key(k) for k in trained}
    assert all(torch.equal(saved[diffusers_key(k)], v) for k, v in trained.items())
    prompts = tmp_path / "p.txt"
    prompts.write_text("colour 1\n")
    r = run("detect", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--lora", str(out / "model"),
            "--num-inference-steps", "4", "--out", str(tmp_path / "d.parquet"))
    assert r.returncode == 0, r.stderr


def test_train_refuses_a_device_or_precision_it_cannot_use(tmp_path, tiny_pipe_dir):
    import torch

    base = ["train", "--model", str(tiny_pipe_dir), "--data", "memlab", "--steps", "1"]
    r = run(*base, "--out", str(tmp_path / "a"), "--mixed-precision", "fp8")
    assert r.returncode == 2 and "mixed_precision must be one of no, bf16, fp16" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a" / "model").exists() and not (tmp_path / "a" / "checkpoint").exists()
    if not torch.cuda.is_available():
        r = run(*base, "--out", str(tmp_path / "b"), "--device", "cuda")
        assert r.returncode == 2 and "CUDA is not available" in r.stderr and "Traceback" not in r.stderr


def test_app_refuses_a_port_in_use_before_loading_the_model():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("app", "--port", str(port))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "scoring" not in r.stderr and "diffmem app on" not in r.stdout  # neither calibrated nor announced
    r = run("app", "--port", str(port), "--allow-origin", "hub.example.org")  # checked before the port, too
    assert r.returncode == 2 and "--allow-origin takes a page's origin" in r.stderr and "Traceback" not in r.stderr


def test_usage_errors_are_one_clear_message(tmp_path):
    """Unknown options and out-of-range values: click's message and exit code 2, whichever click
    (typer vendors its own from 0.2x) raised them."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    for args, msg in ((["detect", "--prompts", str(prompts), "--generations", "0"], "--generations"),
                      (["detect", "--bogus"], "No such option: --bogus"),
                      (["explain", "--prompt", "a cat", "--num-inference-steps", "0"], "--num-inference-steps"),
                      (["detect", "--prompts", str(prompts), "--guidance-scale", "nan"], "--guidance-scale"),
                      (["mitigate", "--prompts", str(prompts), "--target", "1", "--guidance-scale", "inf"], "--guidance-scale"),
                      (["detect", "--prompts", str(prompts), "--calibrate-with", str(prompts), "--fpr", "2"], "--fpr"),
                      (["audit", "--fpr", "0", "--out", str(tmp_path / "audit")], "--fpr"),
                      (["bench", "explain", "--max-prompts", "0", "--out", str(tmp_path / "b")], "--max-prompts"),
                      (["bench", "mitigate", "--max-prompts", "-1", "--out", str(tmp_path / "b")], "--max-prompts"),
                      (["bench", "categorize", "--max-prompts", "0", "--out", str(tmp_path / "b")], "--max-prompts"),
                      (["mitigate", "--prompts", str(prompts), "--method", "gni", "--seed", "-5"], "--seed"),
                      (["detect", "--prompts", str(prompts), "--seed", str(2**32)], "--seed")):
        r = run(*args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_bench_mitigate_refuses_a_blank_only_before_the_model_loads(tmp_path):
    r = run("bench", "mitigate", "--only", "", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "only must name part of a row's" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


def test_exit_codes_reach_the_shell(monkeypatch, capsys):
    import pytest
    import typer

    from diffmem import cli

    @cli.memlab_app.command("exit-probe", hidden=True)
    def probe():
        raise typer.Exit(3)

    with pytest.raises(SystemExit) as e:
        cli.main(["memlab", "exit-probe"])
    assert e.value.code == 3

    @cli.memlab_app.command("interrupt-probe", hidden=True)
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:  # Ctrl-C: the shell's 130 and a word, whichever click handled it
        cli.main(["memlab", "interrupt-probe"])
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_ctrl_c_says_where_the_saved_work_is_that_the_same_command_goes_on_from(tmp_path, capsys):
    from pathlib import Path

    from diffmem import cli

    def probe(name, resumes, saves):
        @cli.memlab_app.command(name, hidden=True)
        def interrupted(out: Path):
            cli._hold(out, resumes=resumes)
            if saves:
                (out / "part_0000").mkdir()
            raise KeyboardInterrupt

    probe("resumable-probe", True, True)
    probe("early-probe", True, False)
    probe("restarting-probe", False, True)
    said = {}
    for name in ("resumable-probe", "early-probe", "restarting-probe"):
        out = tmp_path / name
        with pytest.raises(SystemExit) as e:
            cli.main(["memlab", name, str(out)])
        assert e.value.code == 130
        said[name] = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert said["resumable-probe"] == (f"interrupted; the work saved in {tmp_path / 'resumable-probe'} is kept: run the "
                                       "same command again to go on from it")
    # nothing saved yet (the folder it made is removed), or a command that starts over: the word alone
    assert said["early-probe"] == said["restarting-probe"] == "interrupted"
    assert not (tmp_path / "early-probe").exists()


def test_categorize_end_to_end_on_memlab(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a lucky red circle on the left in the snow\n")
    controls = tmp_path / "c.txt"
    controls.write_text("a blue square at the top\na green ring on the right in a room\n")
    out = tmp_path / "cat"
    r = run("categorize", "--prompts", str(prompts), "--controls", str(controls), "--n", "2", "--out", str(out),
            env={"COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    import json

    prof = json.loads((out / "profile.json").read_text())
    # the table writes the prompt once over its memorized features, not again on every row
    assert sum(row["memorized"] for row in prof["rows"]) > 1 and r.stdout.count("a lucky red circle") == 1
    n = sum(row["memorized"] for row in prof["rows"])
    assert f"{n} memorized features over 1 prompt;" in r.stdout  # one prompt, said as one
    assert prof["settings"]["n"] == 2 and prof["control_prompts"] == controls.read_text().split("\n")[:2]
    assert (out / "prompt_0000.png").stat().st_size > 1000
    # what the command printed per memorized feature is what the file holds
    assert all(row["kind"] in ("explicit", "implicit", "unintended") for row in prof["rows"] if row["memorized"])


def test_categorize_bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = run("categorize", "--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "holds no prompts" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "p.txt").write_text("a red circle\n")
    r = run("categorize", "--prompts", str(tmp_path / "p.txt"), "--extractor", "clip:/nowhere", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--vocabulary" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "v.yaml").write_text("stamp: a small stamp\n")
    r = run("categorize", "--prompts", str(tmp_path / "p.txt"), "--extractor", "vlm:/nowhere", "--vocabulary",
            str(tmp_path / "v.yaml"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "vision-language model folder not found" in r.stderr and "Traceback" not in r.stderr
    # MemLab's reader has its own features: a vocabulary given with it was ignored without a word
    r = run("categorize", "--prompts", str(tmp_path / "p.txt"), "--vocabulary", str(tmp_path / "v.yaml"),
            "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--vocabulary names the features of a clip:PATH or vlm:PATH extractor" in r.stderr
    # a feature without its description was asked about as "None"
    (tmp_path / "v2.yaml").write_text("stamp: a small stamp\nlogo:\n")
    r = run("categorize", "--prompts", str(tmp_path / "p.txt"), "--extractor", "clip:/nowhere", "--vocabulary",
            str(tmp_path / "v2.yaml"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "got 'logo': None" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # a misspelt feature in the expectation map: refused before the model (here a missing folder) loads
    (tmp_path / "e.yaml").write_text("snow: [whte_ground]\n")
    r = run("categorize", "--prompts", str(tmp_path / "p.txt"), "--expectations", str(tmp_path / "e.yaml"),
            "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "never reports: ['whte_ground']" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    # an --out that cannot be made: said before the model (here a missing folder) loads
    (tmp_path / "a-file").write_text("kept")
    r = run("categorize", "--prompts", str(tmp_path / "p.txt"), "--model", str(tmp_path / "no-model"),
            "--out", str(tmp_path / "a-file" / "o"))
    assert r.returncode == 2 and "cannot be created" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_explain_end_to_end_equals_the_api(tmp_path, tiny_pipe_dir, tiny_pipe):
    import numpy as np

    from diffmem.explain import AttributionResult, TokenAblation, TokenAttribution

    out = tmp_path / "ablation"
    r = run("explain", "--prompt", "a red circle", "--model", str(tiny_pipe_dir), "--method", "ablation",
            "--num-inference-steps", "4", "--steps", "0,1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (out / "attribution.png").stat().st_size > 1000
    assert 'data-word-index="2"' in (out / "attribution.html").read_text()
    got = AttributionResult.load(out / "attribution.json")
    want = TokenAblation(tiny_pipe, num_inference_steps=4, steps=[0, 1]).attribute("a red circle")
    np.testing.assert_allclose(got.word_scores, want.word_scores, rtol=1e-4, atol=1e-6)
    assert got.settings["num_inference_steps"] == 4 and got.method == "token_ablation"
    # the model runs in the dtype asked for: bfloat16 gradients are close to float32 ones, not equal
    out16 = tmp_path / "bf16"
    r = run("explain", "--prompt", "a red circle", "--model", str(tiny_pipe_dir), "--num-inference-steps", "4",
            "--dtype", "bfloat16", "--out", str(out16))
    assert r.returncode == 0, r.stderr
    full = TokenAttribution(tiny_pipe, num_inference_steps=4).attribute("a red circle").word_scores
    half = AttributionResult.load(out16 / "attribution.json").word_scores
    assert not np.array_equal(half, full)
    np.testing.assert_allclose(half, full, rtol=0.1)
    # an overlong prompt is tokenized at several places in the explainer: the warning is said once
    r = run("explain", "--prompt", "word " * 100, "--model", str(tiny_pipe_dir), "--num-inference-steps", "4")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("truncated to 77 tokens") == 1, r.stderr
    *_, ranking, lead = r.stdout.strip().splitlines()  # the 75 words the model reads: the first 12 listed
    assert lead.startswith('top word "word": ') and 'the other "word"' in lead  # the same word, standing again
    assert ranking.count("word=") == 12 and ranking.endswith("... and 63 more words"), r.stdout


def test_explain_bad_inputs(tmp_path, tiny_pipe_dir):
    out = tmp_path / "o"
    cases = [
        (["--prompt", "  "], "the prompt to explain is empty"),
        (["--prompt", "a cat", "--method", "saliency"], "--method must be attribution or ablation"),
        (["--prompt", "a cat", "--ablation-mode", "remove"], "--ablation-mode applies to --method ablation"),
        (["--prompt", "a cat", "--model", str(tmp_path / "nope")], "model folder not found"),
        (["--prompt", "a cat", "--model", str(tiny_pipe_dir), "--dtype", "float8"], "unknown dtype"),
    ]
    for args, msg in cases:
        r = run("explain", *args, "--out", str(out))
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not out.exists() or not any(out.iterdir()), args
    # "café" typed in a Latin-1 terminal: its byte 0xe9 reaches Python as a lone surrogate, on which
    # the tokenizer failed with a traceback; a process of its own, so that the real argv carries the byte
    r = run("explain", "--prompt", "caf\udce9 latte", "--model", str(tiny_pipe_dir), "--out", str(out), env={})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "holds a lone surrogate \\udce9 at character 3: the byte 0xe9, which is not UTF-8" in r.stderr, r.stderr
    assert not out.exists()


def test_control_characters_in_the_users_text_are_shown_not_sent_to_the_terminal(tmp_path, tiny_pipe_dir):
    # a scraped caption may hold an escape sequence: printed as it is, "\x1b[2J" clears the screen of
    # whoever reads the output, and "\x1b]0;...\x07" retitles their terminal window
    prompt = "a red\x1b[2J circle\x07 at\rnight"
    r = run("explain", "--prompt", prompt, "--model", str(tiny_pipe_dir), "--num-inference-steps", "4",
            "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert not any(c in r.stdout for c in "\x1b\x07\r"), repr(r.stdout)
    assert "a red\u241b[2J circle\u2407 at\u240dnight" in r.stdout  # the prompt, its words coloured, controls drawn
    from diffmem.explain import AttributionResult

    assert AttributionResult.load(tmp_path / "o" / "attribution.json").prompt == prompt  # the data keeps them
    # a prompt with line breaks (a .jsonl may hold one) stays on its one line of the listing
    r = run("explain", "--prompt", "a red\ncircle\u2028on a square", "--model", str(tiny_pipe_dir),
            "--num-inference-steps", "4", "--out", str(tmp_path / "o2"))
    assert r.returncode == 0 and "a red\u23cecircle\u23ceon a square" in r.stdout, repr(r.stdout)
    r = run("explain", "--prompt", "a cat", "--model", str(tmp_path / "nope\x1b]0;owned\x07"))
    assert r.returncode == 2 and "nope\u241b]0;owned\u2407" in r.stderr and "\x1b" not in r.stderr, repr(r.stderr)


def test_a_tables_cells_show_their_control_characters_too():
    # categorize prints its prompts, features and training captions in a table
    import io

    from rich.table import Table

    from diffmem.cli import _ShowingConsole

    buf = io.StringIO()
    table = Table("prompt", "evidence", "caption")
    table.add_row("a red\x1b[2J circle", "caption\x07", "\u202eon a square")
    _ShowingConsole(file=buf, width=200, markup=False).print(table)
    assert "a red\u241b[2J circle" in buf.getvalue() and "caption\u2407" in buf.getvalue()
    assert "\x1b" not in buf.getvalue() and "\x07" not in buf.getvalue()
    # a right-to-left override would reverse the rest of the line where the terminal lays out bidi text
    assert "\ufffdon a square" in buf.getvalue() and "\u202e" not in buf.getvalue()


def test_explain_a_prompt_file_equals_the_api_and_resumes(tmp_path, tiny_pipe_dir, tiny_pipe):
    import numpy as np
    import pandas as pd

    from diffmem.core.denoise import PromptTruncationWarning
    from diffmem.explain import AttributionSet, TokenAttribution, explain_prompts

    long = " ".join(f"w{i}" for i in range(80))
    (tmp_path / "p.csv").write_text(f"id,caption\n1,a red circle\n2,a blue square\n3,{long}\n")
    out = tmp_path / "o"
    args = ["explain", "--prompts", str(tmp_path / "p.csv"), "--column", "caption", "--model", str(tiny_pipe_dir),
            "--num-inference-steps", "4", "--out", str(out)]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert "explained 3 prompts (1 longer than the model reads" in r.stdout and "a red circle" in r.stdout
    got = AttributionSet.load(out / "attributions.json")
    with pytest.warns(PromptTruncationWarning, match="truncated to 77 tokens"):
        want = explain_prompts(TokenAttribution(tiny_pipe, num_inference_steps=4), ["a red circle", "a blue square", long])
    for a, b in zip(got.results, want.results, strict=True):
        np.testing.assert_allclose(a.word_scores, b.word_scores, rtol=1e-4, atol=1e-6)
    # near ties (top word under 20% ahead of the second) are named per prompt and counted
    ties = [a for a in got.results if a.near_tie]
    assert (f"{len(ties)} whose top word leads the second by under 20%" in r.stdout) == bool(ties)
    for t in ties:
        assert f"-> {t.top_word} (near tie with {t.runner_up_text()})" in r.stdout
    words = pd.read_parquet(out / "words.parquet")
    assert len(words) == 6 + 75 and words.groupby("prompt_index")["truncated"].first().tolist() == [False, False, True]
    assert (out / "attributions.html").read_text().count('class="diffmem-attribution"') == 3
    # a second run finds every prompt done and only rewrites the outputs; other settings are refused
    before = (out / "attributions.json").read_bytes()
    assert run(*args).returncode == 0 and (out / "attributions.json").read_bytes() == before
    r = run(*args, "--seed", "5")
    assert r.returncode == 2 and "other settings" in r.stderr and "Traceback" not in r.stderr
    assert (out / "attributions.json").read_bytes() == before


def test_explain_prompt_file_bad_inputs(tmp_path, tiny_pipe_dir):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    (tmp_path / "ok.txt").write_text("a cat\n")
    out = tmp_path / "o"
    cases = [
        (["--prompt", "a cat", "--prompts", str(tmp_path / "ok.txt"), "--out", str(out)], "exactly one of --prompt and --prompts"),
        ([], "exactly one of --prompt and --prompts"),
        (["--prompts", str(tmp_path / "ok.txt")], "--prompts needs --out"),
        (["--prompt", "a cat", "--column", "caption"], "--column and --flagged apply to --prompts"),
        (["--prompt", "a cat", "--flagged"], "--column and --flagged apply to --prompts"),
        (["--prompts", str(tmp_path / "ok.txt"), "--flagged", "--out", str(out)], "--flagged needs a table"),
        (["--prompts", str(tmp_path / "p.txt"), "--out", str(out)], "line 2: empty prompt"),
        (["--prompts", str(tmp_path / "nope.txt"), "--out", str(out)], "prompt file not found"),
    ]
    for args, msg in cases:
        r = run("explain", *args, "--model", str(tiny_pipe_dir))
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not out.exists(), args


def test_bench_detect_runs_in_the_dtype_asked_for_and_says_so(tmp_path, tiny_pipe_dir):
    data = tmp_path / "l.csv"
    data.write_text("prompt,label\na cat,1\na dog,1\na red circle,0\na blue square,0\n")
    base = ["bench", "detect", "--data", str(data), "--model", str(tiny_pipe_dir), "--generations", "1", "--no-black-box"]
    r = run(*base, "--out", str(tmp_path / "o"), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "o" / "bench_detect.json").read_text())
    assert saved["settings"]["runs_on"] == {"device": "cpu", "dtype": "torch.bfloat16"}
    assert not (tmp_path / "o" / "parts").exists()  # the saved scores go once the figures are written
    r = run(*base, "--out", str(tmp_path / "b"), "--dtype", "fp8")
    assert r.returncode == 2 and "unknown dtype 'fp8'" in r.stderr and not (tmp_path / "b" / "bench_detect.json").exists()


def test_bench_detect_measures_a_model_with_its_lora_fused(tmp_path, tiny_pipe_dir, tiny_lora):
    from sklearn.metrics import roc_auc_score

    from diffmem.core.loading import load_pipeline
    from diffmem.detect import NoiseNormDetector

    texts, labels = ["a cat", "a dog", "a red circle", "a blue square", "a green star"], [1, 1, 0, 0, 0]
    data = tmp_path / "l.csv"
    data.write_text("prompt,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    base = ["bench", "detect", "--data", str(data), "--model", str(tiny_pipe_dir), "--generations", "1", "--no-black-box"]
    r = run(*base, "--out", str(tmp_path / "o"), "--lora", str(tiny_lora), "--lora-scale", "0.5")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "o" / "bench_detect.json").read_text())
    assert saved["model"]["lora"]["scale"] == 0.5
    fused = load_pipeline(tiny_pipe_dir, lora=tiny_lora, lora_scale=0.5)
    first = next(row for row in saved["grid"] if row["steps"] == "first step")
    expected = NoiseNormDetector(fused, saved["settings"]["num_inference_steps"], saved["settings"]["guidance_scale"]).score(
        texts).scores
    assert first["auc"] == pytest.approx(roc_auc_score(labels, expected))
    # a LoRA that is not there: said before the model loads, nothing written
    r = run(*base, "--out", str(tmp_path / "b"), "--lora", str(tmp_path / "none.safetensors"))
    assert r.returncode == 2 and "LoRA not found" in r.stderr and not (tmp_path / "b").exists(), r.stderr


def test_bench_detect_refuses_options_of_the_other_prompt_source(tmp_path):
    # each was ignored: --negatives alone ran the MemLab set, --positives beside --data was never read,
    # and --column / --feature-word-negatives applied to the source not chosen
    one = tmp_path / "one.txt"
    one.write_text("a cat\n")
    labelled = tmp_path / "l.csv"
    labelled.write_text("prompt,label\na red circle,1\na cat,0\n")
    out = tmp_path / "b"
    for args, said in ((["--negatives", str(one)], "both --positives and --negatives"),
                       (["--data", str(labelled), "--positives", str(one)], "not both (--positives given)"),
                       (["--data", "memlab", "--negatives", str(one)], "--negatives cannot be added to it"),
                       (["--column", "caption"], "--column names the prompt column of --data"),
                       (["--data", str(labelled), "--feature-word-negatives"], "sorts MemLab's own prompts")):
        r = run("bench", "detect", *args, "--out", str(out))
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not out.exists()


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_failed_run_leaves_no_new_folder(tmp_path, tiny_pipe_dir):
    from doubles import held_by_another_run

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    busy = tmp_path / "busy"
    (busy / "parts").mkdir(parents=True)
    (busy / "parts" / "kept.txt").write_text("the first run's")
    with held_by_another_run(busy):
        r = run("mitigate", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--method", "gni",
                "--generations", "1", "--num-inference-steps", "2", "--out", str(busy))
        assert r.returncode == 2 and f"{busy} is in use by another diffmem run" in r.stderr and "Traceback" not in r.stderr
        assert sorted(p.name for p in busy.rglob("*")) == ["kept.txt", "parts"]
    # held once the input is checked: a model that fails to load leaves no empty output folder behind
    r = run("mitigate", "--prompts", str(prompts), "--model", str(tmp_path / "no-model"), "--method", "gni",
            "--out", str(tmp_path / "new"))
    assert r.returncode == 2 and "model folder not found" in r.stderr and not (tmp_path / "new").exists()


def test_a_second_explain_of_one_prompt_into_a_folder_in_use_is_refused(tmp_path, tiny_pipe_dir):
    # a single explain held nothing: two into one folder left one's attribution.json beside the other's .png
    from doubles import held_by_another_run

    busy = tmp_path / "busy"
    with held_by_another_run(busy):
        r = run("explain", "--prompt", "a red circle", "--model", str(tiny_pipe_dir), "--num-inference-steps", "2",
                "--out", str(busy))
        assert r.returncode == 2 and f"{busy} is in use by another diffmem run" in r.stderr and "Traceback" not in r.stderr
        assert list(busy.iterdir()) == []
    r = run("explain", "--prompt", "a red circle", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "new"))
    assert r.returncode == 2 and "model folder not found" in r.stderr and not (tmp_path / "new").exists()


def test_a_second_detect_into_the_same_results_file_is_refused(tmp_path, tiny_pipe_dir):
    # detect held nothing: a second run into OUT wrote the same chunks in OUT.parts, and the first to
    # finish removed that folder under the other
    from doubles import held_by_another_run

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "r.parquet"
    chunks = tmp_path / "r.parquet.parts"
    chunks.mkdir()
    (chunks / "chunk_000000.parquet").write_text("the first run's")
    with held_by_another_run(chunks):  # a first run, still scoring
        r = run("detect", "--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--num-inference-steps", "2",
                "--out", str(out))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"{chunks} is in use by another diffmem run; wait for it to end, or write to another output file" in r.stderr
        assert [p.name for p in chunks.iterdir()] == ["chunk_000000.parquet"] and not out.exists()
    # a run that fails once the input is checked leaves no chunks folder behind
    r = run("detect", "--prompts", str(prompts), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "s.parquet"))
    assert r.returncode == 2 and "model folder not found" in r.stderr
    assert not (tmp_path / "s.parquet.parts").exists()


def test_a_refused_pickle_lora_says_how_to_convert_it_and_the_converted_file_is_taken(tmp_path, tiny_pipe_dir, tiny_lora):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "lora"
    folder.mkdir()
    torch.save(load_file(tiny_lora / "pytorch_lora_weights.safetensors"), folder / "pytorch_lora_weights.bin")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    common = ("--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--num-inference-steps", "2", "--lora", str(folder))
    r = run("detect", *common, "--out", str(tmp_path / "a.parquet"))
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and f"diffmem convert {folder / 'pytorch_lora_weights.bin'}" in said, r.stderr
    r = run("convert", str(folder / "pytorch_lora_weights.bin"))
    assert r.returncode == 0 and "converted the LoRA" in r.stdout, r.stderr
    r = run("detect", *common, "--out", str(tmp_path / "a.parquet"))
    assert r.returncode == 0, r.stderr
    # converting again would replace the file: refused, unless asked
    r = run("convert", str(folder / "pytorch_lora_weights.bin"))
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert run("convert", str(folder / "pytorch_lora_weights.bin"), "--overwrite").returncode == 0


def test_a_refused_single_file_checkpoint_says_how_to_convert_it_and_the_folder_is_taken(tmp_path, tiny_pipe, tiny_pipe_dir):
    from ldm_checkpoint import write_ldm_checkpoint

    file = write_ldm_checkpoint(tiny_pipe, tmp_path / "sd.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    r = run("detect", "--prompts", str(prompts), "--model", str(file), "--out", str(tmp_path / "a.parquet"))
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and f"diffmem convert {file} --config DIR" in said, r.stderr
    r = run("convert", str(file), "--config", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "model folder not found" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run("convert", str(file), "--config", str(tiny_pipe_dir))
    said = " ".join(r.stdout.split())
    assert r.returncode == 0 and f"use it with --model {tmp_path / 'sd-diffusers'}" in said, r.stderr
    r = run("detect", "--prompts", str(prompts), "--model", str(tmp_path / "sd-diffusers"), "--num-inference-steps", "2",
            "--out", str(tmp_path / "a.parquet"))
    assert r.returncode == 0, r.stderr


def test_several_loras_are_given_by_repeating_lora_and_their_scales(tmp_path, tiny_pipe_dir, tiny_lora):
    from diffmem.core.loading import load_pipeline
    from diffmem.detect import DetectionResult, NoiseNormDetector

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na red cube on grass\n")
    common = ("--prompts", str(prompts), "--model", str(tiny_pipe_dir), "--num-inference-steps", "4",
              "--lora", str(tiny_lora), "--lora", str(tiny_lora))
    r = run("detect", *common, "--lora-scale", "0.5", "--lora-scale", "0.25", "--out", str(tmp_path / "two.parquet"))
    assert r.returncode == 0, r.stderr
    got = DetectionResult.load(tmp_path / "two.parquet")
    assert [x["scale"] for x in got.model["lora"]] == [0.5, 0.25]
    expected = NoiseNormDetector(load_pipeline(tiny_pipe_dir, lora=[tiny_lora] * 2, lora_scale=[0.5, 0.25]), 4, 7.5).score(
        ["a cat", "a red cube on grass"])
    assert got.scores == pytest.approx(expected.scores, rel=1e-5)
    # one scale scales them all; two scales for three LoRAs is refused before the model loads
    r = run("detect", *common, "--lora-scale", "0.5", "--out", str(tmp_path / "one.parquet"))
    assert r.returncode == 0 and [x["scale"] for x in DetectionResult.load(tmp_path / "one.parquet").model["lora"]] == [0.5, 0.5]
    r = run("detect", *common, "--lora", str(tiny_lora), "--lora-scale", "1", "--lora-scale", "2",
            "--out", str(tmp_path / "bad.parquet"))
    assert r.returncode == 2 and "2 --lora-scale for 3 --lora" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "bad.parquet").exists()
