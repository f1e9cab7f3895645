import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*requires torchvision.*")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and not os.environ.get("DIFFMEM_TEST_THREADS"):
    # pytest-xdist runs a worker per core: torch's threads in each, its command-line children
    # included (they read OMP_NUM_THREADS at import), share the cores instead of contending for them
    os.environ["DIFFMEM_TEST_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", os.environ["DIFFMEM_TEST_THREADS"])
if os.environ.get("DIFFMEM_TEST_THREADS"):
    import torch

    torch.set_num_threads(int(os.environ["DIFFMEM_TEST_THREADS"]))

# Fixtures that take half a minute or more: under pytest-xdist (--dist loadgroup) every test that
# uses one runs on the same worker, so each is built once, not once per worker.
BUILT_ONCE = ("memlab_audit", "memlab_scan")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        used = [name for name in BUILT_ONCE if name in getattr(item, "fixturenames", ())]
        if used:
            item.add_marker(pytest.mark.xdist_group(used[0]))


@pytest.fixture(scope="session", autouse=True)
def diffmem_cache(tmp_path_factory):
    """One disk cache for the session (the CLI subprocesses inherit it): tests neither read a
    developer's cache nor leave entries in it, and still share MemLab's rendered training set."""
    path = os.environ.setdefault("DIFFMEM_CACHE", str(tmp_path_factory.mktemp("diffmem_cache")))
    return path


@pytest.fixture(scope="session")
def tiny_pipe():
    from diffmem.core.components import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_pipe_v():
    from diffmem.core.components import tiny_pipeline

    return tiny_pipeline(seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_pipe_with(tiny_pipe):
    """``tiny_pipe_with("EulerAncestralDiscreteScheduler", timestep_spacing="leading")``: the tiny
    pipeline with another sampler (and config overrides), leaving the session's ``tiny_pipe`` as it is."""
    import diffusers

    def with_sampler(name: str, **config):
        sampler = getattr(diffusers, name).from_config(tiny_pipe.scheduler.config, **config)
        return type(tiny_pipe)(**{**tiny_pipe.components, "scheduler": sampler})

    return with_sampler


@pytest.fixture(scope="session")
def tiny_pipe_ti(tiny_pipe):
    """The tiny pipeline with two textual-inversion tokens loaded: "<my-style>" of 3 vectors, which the
    pipeline writes out as "<my-style> <my-style>_1 <my-style>_2", and "<one>" of one."""
    import copy

    import torch

    pipe = type(tiny_pipe)(**{**tiny_pipe.components, "tokenizer": copy.deepcopy(tiny_pipe.tokenizer),
                              "text_encoder": copy.deepcopy(tiny_pipe.text_encoder)})
    vectors = torch.Generator().manual_seed(5)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    pipe.load_textual_inversion({"<my-style>": torch.randn(3, width, generator=vectors)}, token="<my-style>")
    pipe.load_textual_inversion({"<one>": torch.randn(width, generator=vectors)}, token="<one>")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory, tiny_pipe):
    d = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_pipe.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny_pipe):
    """A rank-4 LoRA of the tiny pipeline's attention (UNet and text encoder) with random weights, saved
    by diffusers' ``save_lora_weights`` as a training script saves one: the folder holding
    pytorch_lora_weights.safetensors."""
    import copy

    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(3)
    unet, text_encoder = copy.deepcopy(tiny_pipe.unet), copy.deepcopy(tiny_pipe.text_encoder)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    d = tmp_path_factory.mktemp("lora") / "lora"
    StableDiffusionPipeline.save_lora_weights(
        d, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)),
        safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def memlab_manifest():
    from diffmem.memlab.verify import load_manifest

    return load_manifest("memlab")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP saved locally (safetensors and tokenizer): real CLIP weights cannot be downloaded here."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from diffmem.core.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "max_position_embeddings": 77, "vocab_size": 49408},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(cfg).eval().save_pretrained(path, safe_serialization=True)
    clip_tokenizer(77).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sscd_stand_in(tmp_path_factory):
    """A TorchScript file standing in for SSCD (its weights cannot be downloaded here): 8x8 pooled
    pixels as the embedding."""
    import torch

    class PooledPixels(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)

    path = tmp_path_factory.mktemp("sscd") / "sscd_stand_in.pt"
    torch.jit.script(PooledPixels()).save(str(path))
    return path


@pytest.fixture
def colour_folder_with_a_broken_row(tmp_path):
    """Training data for ``diffmem train``: three plain-colour images with captions, and row 3 an unreadable file."""
    import json

    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (16, 16), colour).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"colour {i}"})
    (data / "broken.png").write_bytes(b"not a png")
    rows.append({"file_name": "broken.png", "text": "colour 3"})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return data


@pytest.fixture
def samples_as_shards_and_folder(tmp_path):
    """SHARD_SAMPLES as two WebDataset .tar shards in img2dataset's layout (key.png, key.txt, key.json,
    img2dataset's .parquet and stats beside them) and as an image folder with metadata.jsonl."""
    import json

    from shards import SHARD_SAMPLES, random_png, write_tar_shard

    shards, folder = tmp_path / "shards", tmp_path / "folder"
    shards.mkdir()
    folder.mkdir()
    members = [[], []]
    for i, (seed, caption) in enumerate(SHARD_SAMPLES):
        key = f"{i:09d}"
        members[i // 3] += [(f"{key}.png", random_png(seed)), (f"{key}.txt", caption.encode()),
                            (f"{key}.json", json.dumps({"key": key, "caption": caption, "url": f"http://x/{i}"}).encode())]
        (folder / f"{key}.png").write_bytes(random_png(seed))
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i:09d}.png", "text": c})
                                                     for i, (_, c) in enumerate(SHARD_SAMPLES)))
    for k, part in enumerate(members):
        write_tar_shard(shards / f"{k:05d}.tar", part)
    # img2dataset's metadata table and stats sit beside the shards; neither is a sample
    (shards / "00000.parquet").write_bytes(b"not read")
    (shards / "00000_stats.json").write_text("{}")
    return shards, folder

