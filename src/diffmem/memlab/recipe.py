"""How the shipped MemLab model is made: ``diffmem memlab train`` runs this recipe.

Seeds and settings are recorded in ``memlab_recipe.json`` inside the saved pipeline folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError
from ..core.components import PipelineSpec, build_pipeline
from ..core.results import finish_replace, folder_held, foreign_folder, replace_folder
from ..train.trainer import TrainConfig, TrainData, Trainer, encode_images, train_vae
from . import dataset as ds

VAE_STATS = "vae_stats.json"  # beside OUT/vae: the VAE stage's figures
RECIPE_RECORD = "memlab_recipe.json"  # in a finished model folder: its recipe, VAE figures and training log
# DDIM steps and guidance a MemLab generation uses unless told otherwise
DEFAULT_SAMPLER = {"num_inference_steps": 25, "guidance_scale": 5.0}


@dataclass
class MemLabRecipe:
    data: ds.MemLabConfig = field(default_factory=ds.MemLabConfig)
    spec: PipelineSpec = field(default_factory=PipelineSpec)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=6000, batch_size=32, lr=1e-3, checkpoint_every=500, ema=True))
    vae_steps: int = 2000
    seed: int = 0

    def to_dict(self) -> dict:
        return {"data": self.data.to_dict(), "spec": self.spec.to_dict(), "train": self.train.to_dict(),
                "vae_steps": self.vae_steps, "seed": self.seed, "sampler": DEFAULT_SAMPLER}

    @classmethod
    def from_dict(cls, d: dict) -> "MemLabRecipe":
        spec = dict(d["spec"])
        spec["unet_channels"] = tuple(spec["unet_channels"])
        spec["vae_channels"] = tuple(spec["vae_channels"])
        return cls(ds.MemLabConfig(**d["data"]), PipelineSpec(**spec), TrainConfig(**d["train"]), d["vae_steps"], d["seed"])


def training_data(pipe, dataset: ds.MemLabDataset, progress: bool = True) -> TrainData:
    ids, images = dataset.unique_images(progress=progress)
    latents = encode_images(pipe, images)
    pos = {int(i): k for k, i in enumerate(ids)}
    index = np.array([pos[r.image_id] for r in dataset.rows], dtype=np.int64)
    return TrainData(latents=latents, image_index=index, captions=dataset.captions)


def run(recipe: MemLabRecipe, out_dir: str | Path, progress: bool = True, device="cpu") -> Path:
    """Train a MemLab model into ``out_dir/model`` (checkpoints in ``out_dir``, resumable).

    ``device`` is where both stages train; the weights are initialised on the CPU from the seed
    first, so every device starts from the same model (the shipped one was trained on the CPU).
    """
    from ..core.loading import resolve_device

    dev = resolve_device(device)  # before any folder is made: a missing GPU writes nothing
    out = Path(out_dir)
    check_run_folder(out)
    # held until the model is saved: a second run into OUT, from another process, would write the
    # same VAE stage and checkpoints at once
    with folder_held(out):
        return _train_into(recipe, out, dev, progress)


def _train_into(recipe: MemLabRecipe, out: Path, dev, progress: bool) -> Path:
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    t0 = time.time()
    dataset = ds.build(recipe.data)
    pipe = build_pipeline(recipe.spec, seed=recipe.seed).to(dev)
    vae_file = finish_replace(out / "vae", "config.json")  # a VAE stage a kill left whole in vae.new is done too
    finish_replace(out / "model", RECIPE_RECORD)  # and a model, before this run saves it again
    vae_reused = (vae_file / "config.json").exists()
    if vae_reused:  # resuming: the VAE stage is done
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(vae_file, use_safetensors=True).to(dev)
        vae_stats = json.loads((out / VAE_STATS).read_text())
    else:
        _, images = dataset.unique_images(progress=progress)
        vae_stats = train_vae(pipe, images, steps=recipe.vae_steps, seed=recipe.seed, progress=progress)
        (out / VAE_STATS).write_text(json.dumps(vae_stats))  # first: it marks the folder as a run's (check_run_folder)
        # swapped in whole: a run takes an OUT/vae holding config.json for a finished stage
        replace_folder(vae_file, pipe.vae.save_pretrained)
    data = training_data(pipe, dataset, progress=progress)
    trainer = Trainer(pipe, data, recipe.train, out)
    trainer.run(progress=progress)
    # wall_time_s is this run's: a resumed one says where it resumed, and train_log's elapsed_s
    # counts the training across every run
    info = {"recipe": recipe.to_dict(), "device": str(dev), "vae": vae_stats, "train_log": trainer.log,
            "wall_time_s": time.time() - t0, "torch": torch.__version__,
            "this_run": {"vae_stage_reused": vae_reused, "training_from_step": trainer.started_at_step}}
    if recipe.train.mem_filter_threshold is not None:  # samples the filter dropped, per epoch
        info["mem_filter_epochs"] = trainer.filter_log

    def write(tmp: Path):
        pipe.save_pretrained(tmp, safe_serialization=True)
        ds.save_manifest(dataset.manifest, tmp / "memlab_manifest.json")
        (tmp / RECIPE_RECORD).write_text(json.dumps(info, indent=1))

    # swapped in whole: a kill while saving leaves no half model for verify or sample to load
    return replace_folder(out / "model", write)


def check_run_folder(out: Path) -> None:
    """A run writes OUT/vae, OUT/checkpoint and OUT/model, and reads an OUT/vae it finds as its own
    finished VAE stage: OUT must be new, empty or an earlier run's (which holds VAE_STATS from the
    end of its first stage on; before that it is empty)."""
    if out.is_file():
        raise InputError(f"{out} is a file; memlab train needs a folder")
    if foreign_folder(out, VAE_STATS):
        raise InputError(f"{out} is not empty and holds no {VAE_STATS}, so it is not an earlier MemLab training run: "
                         "training there would overwrite or misread its files; choose a new or empty folder")


def _vae_stage(recipe: dict) -> dict:
    """The settings the VAE stage depends on: the distinct images (duplication only repeats rows),
    the architecture, its step count and the seed."""
    data = {k: v for k, v in recipe["data"].items() if k != "duplicate_planted"}
    return {"data": data, "spec": recipe["spec"], "vae_steps": recipe["vae_steps"], "seed": recipe["seed"]}


def reuse_vae(vae_from: str | Path, out_dir: str | Path, recipe: MemLabRecipe | None = None) -> None:
    """Seed ``out_dir`` with a finished VAE stage so ``run`` resumes after it.

    The VAE stage depends only on the distinct training images, the architecture and the seed, which
    the main and control data share (the control sees each planted image once instead of 64 times),
    and which a training-time filter does not touch; so such runs may take a VAE already trained
    instead of training the same one again. ``vae_from`` is either a run's ``OUT/vae`` (its figures
    in ``OUT/vae_stats.json``) or a finished MemLab model folder (``"memlab"``: the shipped one),
    whose ``memlab_recipe.json`` holds the figures and the recipe, checked against ``recipe``.
    """
    import shutil

    from ..core.loading import resolve_model

    src = Path(resolve_model(vae_from))
    if (src / RECIPE_RECORD).is_file():  # a model folder: its vae/ beside the record
        src = src / "vae"
    record = src.parent / RECIPE_RECORD
    stats = src.parent / VAE_STATS
    if not (src / "config.json").is_file() or not (stats.is_file() or record.is_file()):
        raise InputError(f"{vae_from} is not a finished MemLab VAE stage: give a run's OUT/vae (beside vae_stats.json) "
                         f"or a finished MemLab model folder (holding vae/ and {RECIPE_RECORD})")
    if stats.is_file():
        stats_text = stats.read_text()
    else:
        recorded = json.loads(record.read_text())
        if recipe is not None and _vae_stage(recorded["recipe"]) != _vae_stage(recipe.to_dict()):
            raise InputError(f"{vae_from} was trained with other data, architecture, VAE steps or seed than this run's "
                             "recipe, so its VAE is not this run's VAE stage; train it instead (leave out the VAE source)")
        stats_text = json.dumps(recorded["vae"])
    out = Path(out_dir)
    check_run_folder(out)
    if (out / "vae" / "config.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / VAE_STATS).write_text(stats_text)  # first, as run() writes it
    replace_folder(out / "vae", lambda tmp: shutil.copytree(src, tmp))


def control_recipe(recipe: MemLabRecipe) -> MemLabRecipe:
    """The duplication-free control: the same recipe with every planted pair seen once."""
    return replace(recipe, data=replace(recipe.data, duplicate_planted=False))
