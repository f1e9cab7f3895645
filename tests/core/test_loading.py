import json
import re
import shutil

import pytest
import torch
from doubles import hub_cache_with

from diffmem.core.errors import ModelLoadError
from diffmem.core.loading import load_pipeline


def test_loads_a_local_pipeline_folder(tiny_pipe_dir, tiny_pipe):
    pipe = load_pipeline(str(tiny_pipe_dir))
    assert pipe.unet.config.sample_size == tiny_pipe.unet.config.sample_size
    for (k, a), b in zip(pipe.unet.state_dict().items(), tiny_pipe.unet.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_pipeline(str(tmp_path / "nope"))


def test_folder_that_is_not_a_pipeline(tmp_path, tiny_pipe_dir):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelLoadError, match="single model component"):
        load_pipeline(str(tiny_pipe_dir / "unet"))


@pytest.mark.parametrize("name, pickle_warning", [("model.safetensors", False), ("v1-5.ckpt", True)])
def test_a_single_file_checkpoint_is_told_how_to_convert(tmp_path, name, pickle_warning):
    (tmp_path / name).write_bytes(b"weights")
    with pytest.raises(ModelLoadError, match="single-file checkpoint") as e:
        load_pipeline(str(tmp_path / name))
    assert f"diffmem convert {tmp_path / name} --config DIR" in str(e.value) and ("is a pickle" in str(e.value)) == pickle_warning
    with pytest.raises(ModelLoadError, match="is a file, not a pipeline folder"):
        (tmp_path / "notes.txt").write_text("x")
        load_pipeline(str(tmp_path / "notes.txt"))


def test_missing_component(tmp_path, tiny_pipe_dir):
    d = tmp_path / "p"
    shutil.copytree(tiny_pipe_dir, d)
    shutil.rmtree(d / "unet")
    with pytest.raises(ModelLoadError, match="missing its 'unet' component"):
        load_pipeline(str(d))


def test_sdxl_is_refused_with_the_reason(tmp_path, tiny_pipe_dir):
    d = tmp_path / "xl"
    shutil.copytree(tiny_pipe_dir, d)
    idx = json.loads((d / "model_index.json").read_text())
    idx["_class_name"] = "StableDiffusionXLPipeline"
    idx["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (d / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(ModelLoadError, match="two text encoders"):
        load_pipeline(str(d))


def test_pickle_weights_need_explicit_permission(tmp_path, tiny_pipe_dir):
    d = tmp_path / "pkl"
    shutil.copytree(tiny_pipe_dir, d)
    w = d / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(w), d / "unet" / "diffusion_pytorch_model.bin")
    w.unlink()
    with pytest.raises(ModelLoadError, match="only pickle weights.*allow_pickle"):
        load_pipeline(str(d))
    pipe = load_pipeline(str(d), allow_pickle=True)
    assert pipe.unet is not None


def test_cuda_asked_for_without_cuda(tiny_pipe_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_pipeline(str(tiny_pipe_dir), device="cuda")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local folder"):
        load_pipeline("CompVis/stable-diffusion-v1-4")


def _copy_of(pipe):
    import copy

    return type(pipe)(**{k: copy.deepcopy(v) for k, v in pipe.components.items()})


@pytest.mark.parametrize("change", ["lora_fused_into_the_attention", "text_encoder_fine_tuned", "token_added", "vae_swapped"])
def test_the_identity_changes_with_any_of_the_weights(tiny_pipe, change):
    # the UNet's first tensors by name (conv_in, conv_norm_out, conv_out) were all the identity read, so a
    # LoRA fused into the attention or a new text encoder kept the old model's calibration and saved work
    from diffmem.core.loading import model_identity, weights_identity

    changed = _copy_of(tiny_pipe)
    with torch.no_grad():
        if change == "lora_fused_into_the_attention":
            for name, module in changed.unet.named_modules():
                if name.endswith("attn2.to_k"):  # W + B A, rank 1
                    module.weight += 1e-3 * torch.randn(module.weight.shape[0], 1) @ torch.randn(1, module.weight.shape[1])
        elif change == "text_encoder_fine_tuned":
            last_mlp = [m for n, m in changed.text_encoder.named_modules() if n.endswith("mlp.fc2")][-1]
            last_mlp.weight.mul_(1.01)
        elif change == "token_added":  # a textual-inversion embedding
            changed.tokenizer.add_tokens(["<my-style>"])
            changed.text_encoder.resize_token_embeddings(len(changed.tokenizer))
        else:
            changed.vae.decoder.conv_out.weight.mul_(1.01)
    same = _copy_of(tiny_pipe)
    assert weights_identity(same) == weights_identity(tiny_pipe)
    assert weights_identity(changed) != weights_identity(tiny_pipe)
    # the VAE decodes generations but takes no part in a score: calibrations do not ask for it
    assert (model_identity(changed) == model_identity(tiny_pipe)) == (change == "vae_swapped")


def test_a_folder_of_fp16_variant_weights_loads_them(tmp_path, tiny_pipe_dir):
    # SD's fp16 files, downloaded alone (or written by save_pretrained(variant="fp16")), were "no file
    # named diffusion_pytorch_model.safetensors"
    half = load_pipeline(tiny_pipe_dir, dtype="float16")
    half.save_pretrained(tmp_path / "fp16", safe_serialization=True, variant="fp16")
    with pytest.warns(UserWarning, match=r"unet, vae, text_encoder of .* have only fp16-variant weights"):
        pipe = load_pipeline(tmp_path / "fp16")
    assert pipe.dtype == torch.float32
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(half, name).state_dict()
        assert all(torch.equal(v, want[k].float()) for k, v in getattr(pipe, name).state_dict().items())
    # one component in plain weights: the others' variant, that one's plain file
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "fp16", mixed)
    (mixed / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    shutil.copy(tiny_pipe_dir / "vae" / "diffusion_pytorch_model.safetensors", mixed / "vae")
    with pytest.warns(UserWarning, match="unet, text_encoder of .* have only fp16"):
        pipe = load_pipeline(mixed)
    plain = load_pipeline(tiny_pipe_dir)
    assert all(torch.equal(v, plain.vae.state_dict()[k]) for k, v in pipe.vae.state_dict().items())


def test_weights_of_several_variants_and_no_plain_ones_are_refused(tmp_path, tiny_pipe_dir):
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipe_dir, folder)
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    shutil.copy(unet / "diffusion_pytorch_model.fp16.safetensors", unet / "diffusion_pytorch_model.non_ema.safetensors")
    with pytest.raises(ModelLoadError, match=r"'unet' .* several variants \(fp16, non_ema\), and nothing says which"):
        load_pipeline(folder)
    (unet / "diffusion_pytorch_model.non_ema.safetensors").unlink()
    text_encoder = folder / "text_encoder"
    (text_encoder / "model.safetensors").rename(text_encoder / "model.ema.safetensors")
    with pytest.raises(ModelLoadError, match="different variants .*unet: fp16, text_encoder: ema"):
        load_pipeline(folder)


def test_an_inpainting_or_guidance_distilled_model_is_refused_by_name(tmp_path, tiny_pipe):
    # its UNet takes 9 channels: scored from 9 channels of noise, every prompt got a number at the first
    # step and a shape error inside diffusers past it
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from diffmem.core.errors import InputError
    from diffmem.detect import NoiseNormDetector

    unet = UNet2DConditionModel.from_config({**tiny_pipe.unet.config, "in_channels": 9})
    inpaint = StableDiffusionInpaintPipeline(**{**tiny_pipe.components, "unet": unet})
    inpaint.save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    with pytest.raises(ModelLoadError, match="UNet takes 9 input channels where the VAE's latents have 4 .an inpainting model"):
        load_pipeline(tmp_path / "inpaint")
    with pytest.raises(InputError, match="diffmem audits text-to-image models"):
        NoiseNormDetector(inpaint, num_inference_steps=4)
    # a guidance-distilled UNet (LCM): the pipeline passes it the guidance scale and runs no unconditional pass
    lcm = type(tiny_pipe)(**{**tiny_pipe.components,
                             "unet": UNet2DConditionModel.from_config(tiny_pipe.unet.config, time_cond_proj_dim=8)})
    with pytest.raises(InputError, match="guidance-distilled .*no unconditional prediction"):
        NoiseNormDetector(lcm, num_inference_steps=4)


def _fused_by_diffusers(folder, lora, scale):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe


def _kohya_keys(diffusers_keys: dict) -> dict:
    """The same LoRA as a kohya / A1111 file (lora_unet_..., lora_te_text_model_..., with alphas), as
    most LoRAs shared for SD 1.x are saved."""
    out = {}
    for key, value in diffusers_keys.items():
        if key.startswith("unet."):
            module, kind = key.removeprefix("unet.").split(".lora.")
            base = "lora_unet_" + module.replace(".", "_")
        else:
            module, kind = key.removeprefix("text_encoder.").split(".lora_linear_layer.")
            base = "lora_te_text_model_" + module.replace(".", "_")
        out[f"{base}.lora_{kind.split('.')[0]}.weight"] = value
        if kind.startswith("down"):
            out[f"{base}.alpha"] = torch.tensor(float(value.shape[0]))  # alpha = rank: the scale diffusers saved
    return out


def test_a_lora_is_fused_as_diffusers_fuses_it(tmp_path, tiny_pipe_dir, tiny_lora):
    # a LoRA fine-tune (a few hundred images) is where memorization is likeliest, and diffmem had no way to load one
    from safetensors.torch import load_file, save_file

    from diffmem.core.loading import model_identity, model_name, weights_fingerprints

    pipe = load_pipeline(tiny_pipe_dir, lora=tiny_lora, lora_scale=0.5)
    reference = _fused_by_diffusers(tiny_pipe_dir, tiny_lora, 0.5)
    for part in ("unet", "text_encoder"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(reference, part).state_dict()
        assert ours.keys() == theirs.keys()  # plain weights: no adapter layers left behind
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    base = load_pipeline(tiny_pipe_dir)
    fused, plain = model_identity(pipe), model_identity(base)
    assert fused["unet_weights"] != plain["unet_weights"] and fused["text_encoder_weights"] != plain["text_encoder_weights"]
    assert fused["lora"] == {"path": str((tiny_lora / "pytorch_lora_weights.safetensors").resolve()), "scale": 0.5}
    assert "lora" not in plain and "with the LoRA pytorch_lora_weights.safetensors at scale 0.5" in model_name(fused)
    # at scale 0 the weights are the base model's, bit for bit
    assert weights_fingerprints(load_pipeline(tiny_pipe_dir, lora=tiny_lora, lora_scale=0.0)) == weights_fingerprints(base)
    # the same LoRA under kohya's keys and as PEFT's lora_A / lora_B, given as files
    keys = load_file(tiny_lora / "pytorch_lora_weights.safetensors")
    save_file(_kohya_keys(keys), tmp_path / "kohya.safetensors")
    from diffusers.utils import convert_state_dict_to_peft

    save_file(convert_state_dict_to_peft(keys), tmp_path / "peft.safetensors")
    for file in ("kohya.safetensors", "peft.safetensors"):
        again = load_pipeline(tiny_pipe_dir, lora=tmp_path / file, lora_scale=0.5)
        assert weights_fingerprints(again) == weights_fingerprints(pipe), file


def test_several_loras_are_fused_in_turn_as_diffusers_fuses_several_adapters(tmp_path, tiny_pipe_dir, tiny_lora):
    # a character LoRA on a style LoRA: what users run together is what memorizes together
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from diffmem.core.loading import model_identity, model_name, weights_fingerprints

    keys = load_file(tiny_lora / "pytorch_lora_weights.safetensors")
    second = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, (k, v) in enumerate(keys.items())}
    save_file(second, tmp_path / "style.safetensors")
    pipe = load_pipeline(tiny_pipe_dir, lora=[tiny_lora, tmp_path / "style.safetensors"], lora_scale=[0.5, 0.25])
    reference = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir, safety_checker=None, requires_safety_checker=False)
    reference.load_lora_weights(tiny_lora, adapter_name="a")
    reference.load_lora_weights(tmp_path, weight_name="style.safetensors", adapter_name="b")
    reference.set_adapters(["a", "b"], [0.5, 0.25])
    reference.fuse_lora(adapter_names=["a", "b"])
    reference.unload_lora_weights()
    for part in ("unet", "text_encoder"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(reference, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
    # both LoRAs count: neither alone gives these weights
    alone = load_pipeline(tiny_pipe_dir, lora=tiny_lora, lora_scale=0.5)
    assert weights_fingerprints(alone) != weights_fingerprints(pipe)
    identity = model_identity(pipe)
    assert identity["lora"] == [{"path": str((tiny_lora / "pytorch_lora_weights.safetensors").resolve()), "scale": 0.5},
                                {"path": str((tmp_path / "style.safetensors").resolve()), "scale": 0.25}]
    assert model_name(identity).endswith("with the LoRAs pytorch_lora_weights.safetensors at scale 0.5 and "
                                         "style.safetensors at scale 0.25")
    # one scale for all; one LoRA keeps the form its identity always had
    both_at_one = load_pipeline(tiny_pipe_dir, lora=[tiny_lora, tmp_path / "style.safetensors"])
    assert [x["scale"] for x in model_identity(both_at_one)["lora"]] == [1.0, 1.0]
    assert model_identity(alone)["lora"] == {"path": identity["lora"][0]["path"], "scale": 0.5}
    with pytest.raises(ModelLoadError, match="2 LoRA scales for 3 LoRAs: give one scale for them all, or one per LoRA"):
        load_pipeline(tiny_pipe_dir, lora=[tiny_lora, tiny_lora, tmp_path / "style.safetensors"], lora_scale=[1, 1])
    with pytest.raises(ModelLoadError, match="LoRA not found"):  # each file is checked before the model loads
        load_pipeline(tiny_pipe_dir, lora=[tiny_lora, tmp_path / "nowhere.safetensors"])


def test_lora_settings_keep_one_lora_in_the_form_settings_always_had():
    from diffmem.core.loading import lora_settings

    assert lora_settings(None, 0.3) == (None, 1.0) and lora_settings([], []) == (None, 1.0)
    assert lora_settings("a.safetensors") == ("a.safetensors", 1.0)
    assert lora_settings(["a.safetensors"], [0.5]) == ("a.safetensors", 0.5)
    assert lora_settings(["a", "b"], 0.5) == (["a", "b"], [0.5, 0.5])
    assert lora_settings(["a", "b"], (1, 0.25)) == (["a", "b"], [1.0, 0.25])
    with pytest.raises(ModelLoadError, match="1 LoRA scale for 2 LoRAs"):
        lora_settings(["a", "b"], [0.5])


def _renamed(keys: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in keys.items()}


@pytest.mark.parametrize("case", ["missing", "pickle_file", "pickle_folder", "pipeline_folder", "not_a_lora", "other_shapes",
                                  "layers_named_nowhere", "nan_weights", "several_files", "infinite_scale"])
def test_a_lora_that_is_unsafe_or_does_not_fit_is_refused(tmp_path, tiny_pipe_dir, tiny_lora, case):
    from safetensors.torch import load_file, save_file

    keys = load_file(tiny_lora / "pytorch_lora_weights.safetensors")
    lora, scale = tmp_path / "lora.safetensors", 1.0
    if case == "missing":
        said = "LoRA not found"
    elif case == "pickle_file":
        lora = tmp_path / "lora.bin"
        torch.save(keys, lora)
        said = "is a pickle (.bin), which diffmem does not load"
    elif case == "pickle_folder":
        lora = tmp_path / "folder"
        lora.mkdir()
        torch.save(keys, lora / "pytorch_lora_weights.bin")
        said = "holds no .safetensors file, only pickle weights (pytorch_lora_weights.bin)"
    elif case == "pipeline_folder":
        lora, said = tiny_pipe_dir, "it is a pipeline folder, to pass as the model"
    elif case == "not_a_lora":
        save_file({"conv_in.weight": torch.zeros(2, 2)}, lora)
        said = "holds no LoRA weights"
    elif case == "other_shapes":  # a LoRA of a wider model
        save_file({k: torch.randn(v.shape[0] + 3, v.shape[1]) if ".up." in k else v for k, v in keys.items()}, lora)
        said = "of its tensors have other shapes than this model's layers"
    elif case == "layers_named_nowhere":  # diffusers skips such layers with a warning, leaving a part of the LoRA out
        save_file(_renamed(keys, "down_blocks", "input_blocks"), lora)
        said = "8 of the 40 layers of the LoRA"  # down_blocks hold 8 of the UNet's 32, the text encoder 8 more
    elif case == "nan_weights":
        save_file({k: v.fill_(float("nan")) if ".up." in k and "mid_block" in k else v for k, v in keys.items()}, lora)
        said = "gives NaN weights when fused: its weights are broken"
    elif case == "several_files":
        lora = tmp_path / "folder"
        lora.mkdir()
        for name in ("a.safetensors", "b.safetensors"):
            save_file(keys, lora / name)
        said = "holds several .safetensors files (a.safetensors, b.safetensors)"
    else:
        shutil.copy(tiny_lora / "pytorch_lora_weights.safetensors", lora)
        scale, said = float("inf"), "the LoRA scale must be a finite number"
    with pytest.raises(ModelLoadError, match=re.escape(said)):
        load_pipeline(tiny_pipe_dir, lora=lora, lora_scale=scale)


def _embedding_files(folder, width):
    from safetensors.torch import save_file

    vectors = torch.Generator().manual_seed(5)
    save_file({"<my-style>": torch.randn(3, width, generator=vectors)}, folder / "style.safetensors")  # diffusers'
    save_file({"emb_params": torch.randn(2, width, generator=vectors)}, folder / "cat-toy.safetensors")  # A1111's
    (folder / "trained").mkdir()
    save_file({"<one>": torch.randn(1, width, generator=vectors)}, folder / "trained" / "learned_embeds.safetensors")


def test_textual_inversion_files_are_added_as_the_pipeline_adds_them(tmp_path, tiny_pipe_dir):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from diffmem.core.loading import model_identity, model_name

    width = load_pipeline(tiny_pipe_dir).text_encoder.get_input_embeddings().weight.shape[1]
    _embedding_files(tmp_path, width)
    pipe = load_pipeline(tiny_pipe_dir, textual_inversion=[tmp_path / "style.safetensors", tmp_path / "cat-toy.safetensors",
                                                           f"<renamed>={tmp_path / 'trained'}"])
    reference = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir, safety_checker=None, requires_safety_checker=False)
    reference.load_textual_inversion(load_file(tmp_path / "style.safetensors")["<my-style>"], token="<my-style>")
    reference.load_textual_inversion(load_file(tmp_path / "cat-toy.safetensors")["emb_params"], token="cat-toy")
    reference.load_textual_inversion(load_file(tmp_path / "trained" / "learned_embeds.safetensors")["<one>"], token="<renamed>")
    prompt = "a <my-style> photo of cat-toy and <renamed>"
    ours, theirs = (p.encode_prompt(prompt, "cpu", 1, False)[0] for p in (pipe, reference))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, load_pipeline(tiny_pipe_dir).encode_prompt(prompt, "cpu", 1, False)[0])
    identity = model_identity(pipe)
    assert [(x["token"], x["vectors"]) for x in identity["textual_inversion"]] == [("<my-style>", 3), ("cat-toy", 2), ("<renamed>", 1)]
    assert model_name(identity).endswith("with the textual-inversion tokens <my-style>, cat-toy, <renamed>")


@pytest.mark.parametrize("case", ["missing", "pickle", "empty_token", "token_in_vocabulary", "other_width", "nan",
                                  "several_tensors", "folder_without_embeds", "folder_with_pickled_embeds"])
def test_a_textual_inversion_file_that_is_unsafe_or_does_not_fit_is_refused(tmp_path, tiny_pipe_dir, case):
    from safetensors.torch import save_file

    width = load_pipeline(tiny_pipe_dir).text_encoder.get_input_embeddings().weight.shape[1]
    _embedding_files(tmp_path, width)
    entry = tmp_path / "bad.safetensors"
    if case == "missing":
        said = "textual-inversion embedding not found"
    elif case == "pickle":  # A1111's .pt embeddings
        entry = tmp_path / "style.pt"
        torch.save({"string_to_param": {"*": torch.zeros(1, width)}, "name": "style"}, entry)
        said = "is a pickle (.pt), which diffmem does not load"
    elif case == "empty_token":
        entry, said = f"={tmp_path / 'style.safetensors'}", "the token before '=' in"
    elif case == "token_in_vocabulary":
        entry, said = f"photo={tmp_path / 'style.safetensors'}", "the token 'photo' of the embedding"
    elif case == "other_width":  # SD 2.x's embedding on SD 1.x
        save_file({"<wide>": torch.zeros(1, width + 8)}, entry)
        said = f"has vectors of shape (1, {width + 8}), where this model's text encoder takes vectors of width {width}"
    elif case == "nan":
        save_file({"<nan>": torch.full((2, width), float("nan"))}, entry)
        said = "its vectors are not all finite"
    elif case == "several_tensors":
        save_file({"a": torch.zeros(1, width), "b": torch.zeros(1, width)}, entry)
        said = "holds 2 tensors, where a textual-inversion embedding holds one"
    elif case == "folder_without_embeds":
        entry, said = tiny_pipe_dir, "holds no learned_embeds.safetensors: pass the embedding's file"
    else:  # diffusers' training script saved pickles before safetensors
        entry = tmp_path / "old_run"
        entry.mkdir()
        torch.save({"<old>": torch.zeros(1, width)}, entry / "learned_embeds.bin")
        said = f"holds no learned_embeds.safetensors, only learned_embeds.bin, a pickle, which diffmem does not load: " \
               f"unpickling can run arbitrary code. If you trust its source, convert it: diffmem convert {entry / 'learned_embeds.bin'}"
    with pytest.raises(ModelLoadError, match=re.escape(said)):
        load_pipeline(tiny_pipe_dir, textual_inversion=[entry])
    if case == "folder_with_pickled_embeds":  # and once converted as it says, the folder is taken
        from diffmem.core.convert import convert_adapter

        convert_adapter(entry / "learned_embeds.bin")
        assert "<old>" in load_pipeline(tiny_pipe_dir, textual_inversion=[entry]).tokenizer.get_vocab()


def test_the_identity_follows_the_scale_and_switch_of_unfused_lora_adapters(tiny_pipe_dir, tiny_lora):
    # a LoRA loaded into a pipeline and not fused is scored at the scale set_adapters gives it, or not at all
    # once disabled; the fingerprint read its tensors alone, so every setting shared one calibration
    from diffusers import StableDiffusionPipeline

    from diffmem.core.loading import weights_fingerprints
    from diffmem.detect import NoiseNormDetector

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(tiny_lora, adapter_name="style")
    seen, scores = [], []
    for setting in ("loaded", "scaled", "disabled"):
        if setting == "scaled":
            pipe.set_adapters(["style"], adapter_weights=[0.3])
        elif setting == "disabled":
            pipe.disable_lora()
        seen.append(weights_fingerprints(pipe))
        scores.append(NoiseNormDetector(pipe, 4, 7.5).score(["a cat"]).scores[0])
    assert len({s for s in scores}) == 3  # three models, by what they compute
    assert all(seen[i]["unet_weights"] != seen[j]["unet_weights"] and seen[i]["text_encoder_weights"] != seen[j]["text_encoder_weights"]
               for i, j in ((0, 1), (1, 2), (0, 2)))


def test_a_cached_hub_id_of_fp16_variant_weights_loads_them_offline(tmp_path, monkeypatch, tiny_pipe_dir):
    # SD 1.5's fp16 files alone in the hub cache, offline: diffusers' "no file named
    # diffusion_pytorch_model.safetensors", where a local folder of the same files loaded
    half = load_pipeline(tiny_pipe_dir, dtype="float16")
    half.save_pretrained(tmp_path / "fp16", safe_serialization=True, variant="fp16")
    hub_cache_with(tmp_path, monkeypatch, "someone/tiny-sd", tmp_path / "fp16")
    with pytest.warns(UserWarning, match=r"unet, vae, text_encoder of 'someone/tiny-sd' .* have only fp16-variant weights"):
        pipe = load_pipeline("someone/tiny-sd")
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(half, name).state_dict()
        assert all(torch.equal(v, want[k].float()) for k, v in getattr(pipe, name).state_dict().items())
    # identified by the hub id, as a hub id loaded before: not by the snapshot's commit folder
    assert pipe.name_or_path == "someone/tiny-sd"


def test_a_cached_hub_id_is_checked_as_a_folder_is(tmp_path, monkeypatch, tiny_pipe_dir):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_pipe_dir, folder)
    unet = folder / "unet"
    from safetensors.torch import load_file

    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    hub_cache_with(tmp_path, monkeypatch, "someone/old-sd", folder)
    with pytest.raises(ModelLoadError, match=r"'unet' .* has only pickle weights \(diffusion_pytorch_model.bin\)"):
        load_pipeline("someone/old-sd")
    pipe = load_pipeline("someone/old-sd", allow_pickle=True)
    plain = load_pipeline(tiny_pipe_dir)
    assert all(torch.equal(v, plain.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    # not in the cache: the error says where it looked
    with pytest.raises(ModelLoadError, match=r"not a local folder.*offline"):
        load_pipeline("someone/not-cached")


def test_a_folder_error_without_words_is_named_by_its_kind():
    # str(e).splitlines()[0] of an exception with no message was an IndexError: a traceback in place of the error
    from diffmem.core.errors import InputError
    from diffmem.core.loading import model_folder_errors

    with pytest.raises(InputError, match=r"^clip is not a CLIP model folder: KeyError$"):
        with model_folder_errors("clip", "a CLIP model folder"):
            raise KeyError()
    with pytest.raises(InputError, match=r"^clip is not a CLIP model folder: no config.json$"):
        with model_folder_errors("clip", "a CLIP model folder"):
            raise OSError("no config.json\nmore words")
