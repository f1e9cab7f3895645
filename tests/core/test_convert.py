import os
import re

import pytest
import torch
from doubles import hub_cache_with
from safetensors.torch import load_file

from diffmem.core.convert import convert_adapter
from diffmem.core.errors import ModelLoadError
from diffmem.core.loading import load_pipeline, weights_fingerprints


def _command_payload(marker):
    """An object whose unpickling runs ``touch marker``: what a malicious pickle carries."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return Payload()


def test_a_pickled_lora_converts_to_the_same_fused_weights(tmp_path, tiny_pipe_dir, tiny_lora):
    # most LoRAs shared before safetensors are pickles; diffmem refuses to unpickle them while loading
    keys = load_file(tiny_lora / "pytorch_lora_weights.safetensors")
    # a slice sharing storage with another tensor, which safetensors refuses to write as it is
    tied = {**keys, "unet.extra.lora.down.weight": next(iter(keys.values()))[:1]}
    torch.save({**keys, "step": 1200}, tmp_path / "lora.bin")
    done = convert_adapter(tmp_path / "lora.bin")
    assert (done.kind, done.out, done.tensors, done.left_out) == ("lora", str(tmp_path / "lora.safetensors"), len(keys), ["step"])
    assert "--lora " + str(tmp_path / "lora.safetensors") in done.describe()
    written = load_file(tmp_path / "lora.safetensors")
    assert written.keys() == keys.keys() and all(torch.equal(written[k], keys[k]) for k in keys)
    fused = load_pipeline(tiny_pipe_dir, lora=tmp_path / "lora.safetensors", lora_scale=0.5)
    assert weights_fingerprints(fused) == weights_fingerprints(load_pipeline(tiny_pipe_dir, lora=tiny_lora, lora_scale=0.5))
    # tensors that share storage are written each on its own
    torch.save(tied, tmp_path / "tied.pt")
    assert convert_adapter(tmp_path / "tied.pt").tensors == len(tied)


def test_a1111_and_diffusers_pickled_embeddings_convert_and_load(tmp_path, tiny_pipe_dir):
    width = load_pipeline(tiny_pipe_dir).text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(1))
    # A1111's .pt: its vectors under a placeholder, beside its name, step and checkpoint
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "cat-toy", "step": 3000,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}, tmp_path / "cat-toy.pt")
    with pytest.raises(ModelLoadError, match=re.escape(f"convert it: diffmem convert {tmp_path / 'cat-toy.pt'}")):
        load_pipeline(tiny_pipe_dir, textual_inversion=[tmp_path / "cat-toy.pt"])  # refused unread, saying how
    done = convert_adapter(tmp_path / "cat-toy.pt")
    assert (done.kind, done.token, done.vectors, done.width) == ("textual_inversion", "cat-toy", 2, width)
    assert done.left_out == ["name", "sd_checkpoint", "sd_checkpoint_name", "step", "string_to_token"]
    assert "token 'cat-toy'" in done.describe() and "--textual-inversion" in done.describe()
    # diffusers' learned_embeds.bin: one tensor named by its token; to another name
    torch.save({"<my-style>": vectors[0]}, tmp_path / "learned_embeds.bin")
    other = convert_adapter(tmp_path / "learned_embeds.bin", tmp_path / "style.safetensors")
    assert (other.token, other.vectors) == ("<my-style>", 1)
    pipe = load_pipeline(tiny_pipe_dir, textual_inversion=[done.out, other.out])
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["cat-toy", "cat-toy_1", "<my-style>"])
    assert torch.equal(table[ids], torch.cat([vectors, vectors[:1]]))


@pytest.mark.parametrize("case", ["code", "not_a_pickle", "safetensors", "folder", "missing", "whole_model", "no_tensors",
                                  "list", "exists", "other_suffix", "a1111_two_params", "empty"])
def test_what_is_not_a_safe_pickled_adapter_is_refused_and_nothing_written(tmp_path, tiny_lora, case):
    keys = load_file(tiny_lora / "pytorch_lora_weights.safetensors")
    source, out, marker = tmp_path / "in.pt", None, tmp_path / "ran"
    if case == "code":  # a pickle that would run a command when unpickled
        torch.save({"w": _command_payload(marker)}, source)
        said = "holds objects other than tensors and plain containers (it holds posix.system)"
    elif case == "not_a_pickle":
        source.write_text("hello")
        said = "is not a readable torch pickle"
    elif case == "empty":  # torch's EOFError carries no words: the message named its kind and then a dangling colon
        source.write_bytes(b"")
        said = "is not a readable torch pickle: EOFError"
    elif case == "safetensors":
        source = tiny_lora / "pytorch_lora_weights.safetensors"
        said = "it is safetensors already"
    elif case == "folder":
        source, said = tiny_lora, "is a folder"
    elif case == "missing":
        said = "not found"
    elif case == "whole_model":
        torch.save({"conv_in.weight": torch.zeros(4, 4, 3, 3), "conv_in.bias": torch.zeros(4)}, source)
        said = "is it a whole model's weights?"
    elif case == "no_tensors":
        torch.save({"step": 3}, source)
        said = "holds no tensors (step)"
    elif case == "list":
        torch.save([torch.zeros(2)], source)
        said = "holds a list, where a LoRA or an embedding is a dict of tensors"
    elif case == "exists":
        torch.save(keys, source)
        (tmp_path / "in.safetensors").write_text("mine")
        said = "exists; choose another output"
    elif case == "other_suffix":
        torch.save(keys, source)
        out, said = tmp_path / "in.bin2", "must end in .safetensors"
    else:
        torch.save({"string_to_param": {"*": torch.zeros(2, 8), "#": torch.zeros(2, 8)}}, source)
        said = "string_to_param holds 2 tensors, where one is expected"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ModelLoadError, match=re.escape(said)) as refused:
        convert_adapter(source, out)
    assert not str(refused.value).rstrip().endswith(":")  # an error without words gives its kind alone
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing replaced
    assert not marker.exists()
    if case == "exists":
        assert (tmp_path / "in.safetensors").read_text() == "mine"


def test_overwrite_replaces_the_output_and_a_refusal_leaves_it(tmp_path, tiny_lora):
    keys = load_file(tiny_lora / "pytorch_lora_weights.safetensors")
    torch.save(keys, tmp_path / "in.pt")
    (tmp_path / "in.safetensors").write_text("old")
    assert convert_adapter(tmp_path / "in.pt", overwrite=True).kind == "lora"
    assert load_file(tmp_path / "in.safetensors").keys() == keys.keys()
    # vectors that are neither one vector nor a matrix of them: the file it would replace stays as it was
    torch.save({"string_to_param": {"*": torch.zeros(2, 3, 8)}}, tmp_path / "emb.pt")
    (tmp_path / "emb.safetensors").write_text("old")
    with pytest.raises(ModelLoadError, match=re.escape("vectors have shape (2, 3, 8)")):
        convert_adapter(tmp_path / "emb.pt", overwrite=True)
    assert (tmp_path / "emb.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.pt", "emb.safetensors", "in.pt", "in.safetensors"]


def test_an_output_another_conversion_wrote_meanwhile_is_not_replaced(tmp_path, tiny_lora, monkeypatch):
    # two conversions into one output, both started before either wrote it: the check before the work
    # passes for both, and the one that finished last replaced the other's file without --overwrite
    import diffmem.core.convert as convert_module

    keys = load_file(tiny_lora / "pytorch_lora_weights.safetensors")
    torch.save(keys, tmp_path / "in.pt")
    out = tmp_path / "in.safetensors"
    reading = convert_module._adapter_tensors

    def while_another_conversion_finishes(*args):
        out.write_text("the other run's")
        return reading(*args)

    monkeypatch.setattr(convert_module, "_adapter_tensors", while_another_conversion_finishes)
    with pytest.raises(ModelLoadError, match=re.escape(f"{out} exists; choose another output")):
        convert_adapter(tmp_path / "in.pt")
    assert out.read_text() == "the other run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt", "in.safetensors"]  # no temporary file left
    # with overwrite, replacing it is what was asked
    assert convert_adapter(tmp_path / "in.pt", overwrite=True).kind == "lora"
    assert load_file(out).keys() == keys.keys()


def test_files_are_published_new_where_hard_links_are_not_supported(tmp_path, monkeypatch):
    # some file systems (FAT, some network mounts) make no hard links: checked, then renamed
    import errno

    from diffmem.core.results import atomic_path

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with atomic_path(tmp_path / "a.txt", replace=False) as tmp:
        open(tmp, "w").write("new")
    assert (tmp_path / "a.txt").read_text() == "new"
    with pytest.raises(FileExistsError), atomic_path(tmp_path / "a.txt", replace=False) as tmp:
        open(tmp, "w").write("second")
    assert (tmp_path / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def _pickled_pipeline(tiny_pipe_dir, folder):
    """The tiny pipeline as diffusers saved pipelines before safetensors: every weight a .bin."""
    import shutil

    shutil.copytree(tiny_pipe_dir, folder)
    for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        weights = folder / name / f"{stem}.safetensors"
        torch.save(load_file(weights), folder / name / f"{'pytorch_model' if name == 'text_encoder' else stem}.bin")
        weights.unlink()
    return folder


def test_a_pipeline_of_pickles_converts_to_a_folder_of_the_same_weights(tmp_path, tiny_pipe_dir):
    from diffmem.core.convert import convert

    old = _pickled_pipeline(tiny_pipe_dir, tmp_path / "old-sd")
    with pytest.raises(ModelLoadError, match=re.escape(f"convert the pipeline once: diffmem convert {old} ")):
        load_pipeline(old)  # refused unread, saying how
    done = convert(old)
    assert (done.kind, done.out, done.from_pickles) == ("pipeline", str(tmp_path / "old-sd-safetensors"),
                                                       ["unet", "vae", "text_encoder"])
    assert f"--model {done.out}" in done.describe()
    new = load_pipeline(done.out)  # no pickle left to allow
    assert not [p for p in (tmp_path / "old-sd-safetensors").rglob("*") if p.suffix == ".bin"]
    assert weights_fingerprints(new) == weights_fingerprints(load_pipeline(tiny_pipe_dir))
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(new, name).state_dict(), getattr(load_pipeline(tiny_pipe_dir), name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # the output is not replaced unless asked; a pipeline of safetensors needs no conversion
    with pytest.raises(ModelLoadError, match="exists; choose a new folder"):
        convert(old)
    assert convert(old, overwrite=True).out == done.out
    with pytest.raises(ModelLoadError, match="has safetensors weights already: pass the folder as it is"):
        convert(tiny_pipe_dir, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    # an output another conversion is writing is refused before any work; the hold made the folder and removes it
    from doubles import held_by_another_run

    from diffmem.core.errors import InputError

    with held_by_another_run(tmp_path / "busy"), pytest.raises(InputError, match="is in use by another diffmem run"):
        convert(old, tmp_path / "busy", overwrite=True)
    assert not any((tmp_path / "busy").iterdir()) and not (tmp_path / "busy.tmp").exists()
    convert(old, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "model_index.json").is_file() and not (tmp_path / "fresh.tmp").exists()


def test_a_pipeline_output_another_conversion_wrote_meanwhile_is_not_replaced(tmp_path, tiny_pipe_dir, monkeypatch):
    # the other conversion finished, and let go of the folder, between this one's check and its hold
    import diffmem.core.results as results
    from diffmem.core.convert import convert

    old = _pickled_pipeline(tiny_pipe_dir, tmp_path / "old-sd")
    out = tmp_path / "out"
    holding = results.folder_held

    def after_another_conversion_finished(folder, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "model_index.json").write_text("the other run's")
        return holding(folder, **kwargs)

    monkeypatch.setattr(results, "folder_held", after_another_conversion_finished)
    with pytest.raises(ModelLoadError, match=re.escape(f"{out} exists; choose a new folder")):
        convert(old, out)
    assert [p.name for p in out.iterdir()] == ["model_index.json"]
    assert (out / "model_index.json").read_text() == "the other run's"


def test_a_pipeline_whose_pickle_would_run_code_is_refused_and_nothing_written(tmp_path, tiny_pipe_dir):
    from diffmem.core.convert import convert

    old = _pickled_pipeline(tiny_pipe_dir, tmp_path / "old-sd")
    marker = tmp_path / "ran"
    torch.save({"conv_in.weight": _command_payload(marker)}, old / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=re.escape(f"{old / 'unet' / 'diffusion_pytorch_model.bin'} holds objects other "
                                                       "than tensors and plain containers (it holds posix.system)")):
        convert(old, tmp_path / "out")
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["old-sd"]


def test_a_single_file_checkpoint_is_not_taken_for_an_adapter(tmp_path):
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, "global_step": 3},
               tmp_path / "v1-5.ckpt")
    with pytest.raises(ModelLoadError, match=re.escape(f"is a whole model's single-file checkpoint, not a LoRA or an "
                                                       f"embedding: convert it to a pipeline folder with diffmem convert "
                                                       f"{tmp_path / 'v1-5.ckpt'} --config DIR")):
        convert_adapter(tmp_path / "v1-5.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1-5.ckpt"]


def _configs_only(pipeline_folder, folder):
    """A copy of a pipeline folder without its weights: what a checkpoint takes from its --config."""
    import shutil

    shutil.copytree(pipeline_folder, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


def _same_weights(a, b) -> bool:
    """Whether two pipelines' UNets, VAEs and text encoders hold equal tensors under the same names."""
    return all(getattr(a, part).state_dict().keys() == getattr(b, part).state_dict().keys()
               and all(torch.equal(v, getattr(b, part).state_dict()[k]) for k, v in getattr(a, part).state_dict().items())
               for part in ("unet", "vae", "text_encoder"))


def _sd_layout(tiny_pipe):
    """A small pipeline laid out as SD 1.x is: two resnets a level, attention on the high-resolution levels
    (the tiny pipeline has one, and attention on the low ones), three levels in the VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=tiny_pipe.text_encoder.config.hidden_size, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    return type(tiny_pipe)(**{**tiny_pipe.components, "unet": unet, "vae": vae, "safety_checker": None,
                              "requires_safety_checker": False})


@pytest.mark.parametrize("layout", ["tiny", "sd"])
def test_a_single_file_checkpoint_converts_back_to_the_pipeline_it_was_written_from(tmp_path, monkeypatch, tiny_pipe, layout):
    # the original SD layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*), as the
    # releases and civitai ship it, was refused with a diffusers snippet to run by hand
    from ldm_checkpoint import write_ldm_checkpoint

    from diffmem.core.convert import convert

    pipe = tiny_pipe if layout == "tiny" else _sd_layout(tiny_pipe)
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    file = write_ldm_checkpoint(pipe, tmp_path / "sd.safetensors")
    config = _configs_only(tmp_path / "pipe", tmp_path / "config")  # its weights are not read
    with pytest.raises(ModelLoadError, match=re.escape(f"diffmem convert {file} --config DIR")):
        load_pipeline(file)  # refused, saying how
    with pytest.raises(ModelLoadError, match=re.escape(f"diffmem convert {file} --config DIR")):
        convert(file)  # not an adapter: the same words
    done = convert(file, config=config)
    assert (done.kind, done.out, done.config, done.ema) == ("checkpoint", str(tmp_path / "sd-diffusers"), str(config), None)
    assert f"-> {done.out}; use it with --model {done.out}" in done.describe() and "EMA" not in done.describe()
    new = load_pipeline(done.out)
    assert _same_weights(new, pipe) and weights_fingerprints(new) == weights_fingerprints(pipe)
    settings = [{k: v for k, v in p.scheduler.config.items() if not k.startswith("_")} for p in (new, pipe)]
    assert settings[0] == settings[1] and done.tensors == sum(
        len(getattr(pipe, part).state_dict()) for part in ("unet", "vae", "text_encoder"))
    assert new.tokenizer("a red cube").input_ids == pipe.tokenizer("a red cube").input_ids
    with pytest.raises(ModelLoadError, match="exists; choose a new folder"):
        convert(file, config=config)
    assert convert(file, config=config, overwrite=True).out == done.out
    with pytest.raises(ModelLoadError, match="--config is for a single-file checkpoint"):
        convert(tmp_path / "pipe", config=config)
    # a hub id in the hub cache, offline, is read as its snapshot folder
    snapshot = hub_cache_with(tmp_path, monkeypatch, "someone/sd-configs", config)
    cached = convert(file, config="someone/sd-configs", out=tmp_path / "from-hub")
    assert cached.config == str(snapshot) and _same_weights(load_pipeline(cached.out), pipe)
    with pytest.raises(ModelLoadError, match=r"--no-ema\) chooses a single-file checkpoint's weights: give its --config"):
        convert(file, ema=False)


def test_a_ckpt_with_ema_weights_gives_them_unless_told_not_to(tmp_path, tiny_pipe, tiny_pipe_dir):
    # SD 1.x's v1-5-pruned.ckpt holds the UNet's EMA copy beside its trained weights; diffusers converts the
    # trained ones unless told, where the releases generate with the EMA ones
    from ldm_checkpoint import unet_to_ldm, write_ldm_checkpoint
    from safetensors.torch import load_file

    from diffmem.core.convert import convert

    tensors = load_file(write_ldm_checkpoint(tiny_pipe, tmp_path / "plain.safetensors"))
    # the EMA copy's names as the original trainer flattens them ("model_ema.diffusion_modelinput_blocks00weight")
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in unet_to_ldm(tiny_pipe.unet).items()}
    torch.save({"state_dict": {**tensors, **ema}, "global_step": 5}, tmp_path / "sd.ckpt")
    done = convert(tmp_path / "sd.ckpt", config=tiny_pipe_dir)
    assert done.ema is True and "its UNet's EMA weights" in done.describe()
    taken = load_pipeline(done.out)
    assert all(torch.equal(v + 1, taken.unet.state_dict()[k]) for k, v in tiny_pipe.unet.state_dict().items())
    assert _same_weights(taken, type(tiny_pipe)(**{**tiny_pipe.components, "unet": taken.unet}))  # VAE, text encoder as written
    trained = convert(tmp_path / "sd.ckpt", config=tiny_pipe_dir, out=tmp_path / "trained", ema=False)
    assert trained.ema is False and "trained weights" in trained.describe()
    assert _same_weights(load_pipeline(trained.out), tiny_pipe)


def test_a_checkpoint_that_does_not_fit_its_config_is_refused_by_what_does_not_fit(tmp_path, tiny_pipe, tiny_pipe_dir):
    # diffusers said "Cannot copy out of meta tensor" of a tensor the file lacks, and "Cannot load  because ..."
    # of a shape
    from ldm_checkpoint import write_ldm_checkpoint
    from safetensors.torch import load_file, save_file

    from diffmem.core.convert import convert
    from diffmem.core.loading import load_pipeline as load

    file = write_ldm_checkpoint(tiny_pipe, tmp_path / "sd.safetensors")
    memlab = load("memlab")
    ours, theirs = (tuple(p.unet.conv_in.weight.shape) for p in (tiny_pipe, memlab))
    with pytest.raises(ModelLoadError, match=re.escape(f"the file's UNet tensor conv_in.weight is {'x'.join(map(str, ours))}, "
                                                       f"theirs {'x'.join(map(str, theirs))}: is it a pipeline of the "
                                                       "file's architecture?")):
        convert(file, config="memlab")
    tensors = load_file(file)
    del tensors["model.diffusion_model.middle_block.1.norm.bias"]
    save_file(tensors, tmp_path / "short.safetensors")
    with pytest.raises(ModelLoadError, match=re.escape(f"the file's UNet lacks 1 of the {len(tiny_pipe.unet.state_dict())} "
                                                       "tensors of theirs, the first mid_block.attentions.0.norm.bias")):
        convert(tmp_path / "short.safetensors", config=tiny_pipe_dir)
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}, tmp_path / "no-vae.safetensors")
    with pytest.raises(ModelLoadError, match="no-vae.safetensors with the configurations of .*: the file holds no VAE of this layout$"):
        convert(tmp_path / "no-vae.safetensors", config=tiny_pipe_dir)  # as some are shared: diffmem takes no VAE from elsewhere
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.")}, tmp_path / "no-unet.safetensors")
    with pytest.raises(ModelLoadError, match=r"no-unet.safetensors holds no UNet of an original single-file checkpoint "
                                             r"\(model.diffusion_model.\*; its first tensor: (cond|first)_stage_model\.[^)]+\): a LoRA or an "
                                             r"embedding is passed as it is$"):
        convert(tmp_path / "no-unet.safetensors", config=tiny_pipe_dir)
    with pytest.raises(ModelLoadError, match="model folder not found"):
        convert(file, config=tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="'owner/absent' is a hub id the hub cache does not hold, and diffmem converts offline"):
        convert(file, config="owner/absent")
    (tmp_path / "broken.safetensors").write_bytes(b"not a header")
    with pytest.raises(ModelLoadError, match="broken.safetensors is not a readable safetensors file"):
        convert(tmp_path / "broken.safetensors", config=tiny_pipe_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "no-unet.safetensors", "no-vae.safetensors",
                                                          "sd.safetensors", "short.safetensors"]


def test_a_ckpt_whose_pickle_would_run_code_is_refused_and_nothing_written(tmp_path, tiny_pipe_dir):
    from diffmem.core.convert import convert

    marker = tmp_path / "ran"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": _command_payload(marker)}},
               tmp_path / "sd.ckpt")
    with pytest.raises(ModelLoadError, match="holds objects other than tensors and plain containers \\(it holds posix.system\\)"):
        convert(tmp_path / "sd.ckpt", config=tiny_pipe_dir)
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sd.ckpt"]
