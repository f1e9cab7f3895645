"""``train_pipeline``: the Python entry point behind ``diffmem train``."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import InputError
from ..core.results import dump_json, finish_replace, folder_held, foreign_folder, replace_folder
from .data import describe_problem
from .latents import check_latents_folder, encode_source
from .trainer import TrainConfig, TrainData, Trainer, checkpoint_state

MODEL_DIR = "model"  # in the output folder: the trained pipeline
TRAIN_LOG = "diffmem_train.json"  # in MODEL_DIR: the run's settings and loss log, written only by diffmem train
TRAINING_PLOT = "training.png"  # in MODEL_DIR: the loss by step, and the share the filter dropped per epoch


def train_pipeline(model: str, data: str, out: str | Path, steps: int = 1000, batch_size: int = 32, lr: float = 1e-4,
                   prediction_type: str | None = None, train_text_encoder: bool = False, ema: bool = False,
                   caption_column: str | None = None, image_column: str | None = None, checkpoint_every: int = 500,
                   mem_filter_threshold: float | None = None, seed: int = 0, allow_pickle: bool = False,
                   device: str = "cpu", mixed_precision: str = "no", lora_rank: int | None = None,
                   progress: bool = True) -> Path:
    """Fine-tune ``model`` on ``data``; returns the folder of the saved pipeline (``out/model``). With
    ``lora_rank``, a LoRA of that rank is trained instead of every weight, and ``out/model`` holds it
    as ``save_lora_weights`` writes it (pytorch_lora_weights.safetensors), to load with
    ``load_pipeline(model, lora=out/model)`` (``--model M --lora OUT/model``).

    Images are centre-cropped and resized to the model's resolution and encoded once with its VAE,
    a chunk at a time (so the data set must fit in memory as latents, not as pixels); the chunks
    are saved in ``out/latents`` (see ``diffmem.train.latents``). Re-running with the same ``out``
    resumes: the encoding after its last saved chunk, the training from its last checkpoint.
    ``caption_column`` / ``image_column`` name the columns where the scan's defaults do not find them.
    ``device`` is where the model trains (cpu, cuda, cuda:1, mps); ``mixed_precision`` (no, bf16,
    fp16) autocasts its forward passes while the weights stay float32.
    """
    import numpy as np

    from ..core.loading import load_pipeline

    out = Path(out)
    _check_model_folder(Path(model), out / MODEL_DIR)  # before anything is written
    # held until the model is saved: a second run into OUT, from another process, would encode the same
    # latents and write the same checkpoints at once
    with folder_held(out):
        # a model a kill left whole beside its folder (in model.new) is moved in, even if this run stops early
        finish_replace(out / MODEL_DIR, TRAIN_LOG)
        check_latents_folder(out / "latents")
        # the config checks its values before the model loads and the data is encoded
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, train_text_encoder=train_text_encoder, ema=ema,
                          checkpoint_every=checkpoint_every, mem_filter_threshold=mem_filter_threshold, seed=seed,
                          warmup_steps=min(200, steps // 10), mixed_precision=mixed_precision, lora_rank=lora_rank)
        pipe = load_pipeline(model, device=device, allow_pickle=allow_pickle)
        if prediction_type is not None:
            if prediction_type not in ("epsilon", "v_prediction"):
                raise InputError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
            pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=prediction_type)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        # encoded a chunk at a time (never all at once as pixels), each chunk saved in out/latents: a
        # killed or resumed run encodes nothing twice
        latents, captions, problems = encode_source(pipe, data, size, caption_column, folder=out / "latents",
                                                    progress=progress, replace=not checkpoint_state(out).exists(),
                                                    image_column=image_column)
        trainer = Trainer(pipe, TrainData(latents, np.arange(len(captions)), captions), cfg, out)
        trainer.check_resumable()  # another run's folder is refused before anything in it is rewritten
        if problems:
            import warnings

            dump_json(problems, out / "data_problems.json")
            # said before the long training starts, not only in a file: the user may be training on far less than they think
            first = problems[0]
            warnings.warn(f"{len(problems)} of {len(problems) + len(captions)} rows of {data} skipped (the first: row "
                          f"{first['row']}, {describe_problem(first)}); all are listed in {out / 'data_problems.json'}", stacklevel=2)
        else:  # a list left by an earlier run, on data since mended, would name problems that are gone
            (out / "data_problems.json").unlink(missing_ok=True)
        trainer.run(progress=progress)
        mem_filter = None
        if mem_filter_threshold is not None:
            epochs = trainer.filter_log
            mem_filter = {"threshold": mem_filter_threshold, "dropped": trainer.filter_counts["dropped"],
                          "samples": sum(e["samples"] for e in epochs), "epochs": epochs}

        def write(tmp: Path):
            from .plot import plot_training

            if lora_rank is None:
                pipe.save_pretrained(tmp, safe_serialization=True)
            else:
                from diffusers import StableDiffusionPipeline

                from .trainer import lora_layers

                tmp.mkdir(parents=True)
                StableDiffusionPipeline.save_lora_weights(
                    tmp, unet_lora_layers=lora_layers(pipe.unet),
                    text_encoder_lora_layers=lora_layers(pipe.text_encoder) if train_text_encoder else None, safe_serialization=True)
            dump_json({"config": cfg.to_dict(), "device": str(pipe.device), "source_model": model, "data": data,
                       "rows": len(captions), "skipped_rows": len(problems), "log": trainer.log, "mem_filter": mem_filter},
                      tmp / TRAIN_LOG)
            plot_training(trainer.log, mem_filter and mem_filter["epochs"], tmp / TRAINING_PLOT,
                          f"{model} on {data}: {len(captions)} rows, {cfg.steps} steps of {cfg.batch_size}, lr {cfg.lr}"
                          + (f", LoRA of rank {lora_rank}" if lora_rank is not None else "")
                          + (f", memorization filter at {mem_filter_threshold}" if mem_filter else ""))

        # saved beside and swapped in whole: a kill while saving leaves the earlier run's model, not half of each
        return replace_folder(out / MODEL_DIR, write)


def _check_model_folder(model: Path, model_dir: Path) -> None:
    """``out/model`` receives the trained pipeline: refuse to replace a folder an earlier run of
    ``diffmem train`` did not write (the user's own model), or the model this run starts from."""
    if model_dir.exists() and model.exists() and model.resolve() == model_dir.resolve():
        raise InputError(f"the trained pipeline would replace the model it starts from ({model_dir}); "
                         "choose another --out")
    if model_dir.is_file() or foreign_folder(model_dir, TRAIN_LOG):
        raise InputError(f"{model_dir} holds files diffmem train did not write, and the trained pipeline is saved "
                         "there; choose another --out")
