"""Train or fine-tune a diffusers Stable Diffusion pipeline on image-caption pairs.

The loop is the standard latent-diffusion recipe (diffusers' train_text_to_image, reduced to
what we need): VAE frozen, noise and timesteps uniform, epsilon or v-prediction targets from
the scheduler, caption dropout so classifier-free guidance has an unconditional model, AdamW
with warm-up and cosine decay, optional EMA and a jointly trained text encoder.

Checkpoints are safetensors only (model, EMA and optimizer tensors, plus a JSON of scalars):
resuming never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from ..core.errors import InputError
from ..core.results import finish_replace, folder_held, replace_folder, swap_names

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


CHECKPOINT_DIR = "checkpoint"  # in a run's output folder; swapped in through .tmp, .new and .old beside it


def checkpoint_state(out_dir: str | Path) -> Path:
    """The file whose presence means ``out_dir`` holds a checkpoint to resume. A save that a kill
    stopped after writing is finished first (``finish_replace``). A ``checkpoint.tmp`` holding
    ``state.json``, written last, is whole too, and is taken when there is no checkpoint: a first
    save killed just before it became ``checkpoint.new``, or a save by a diffmem before ``.new``,
    which swapped ``checkpoint.tmp`` in directly (its kill between the renames left the previous
    checkpoint in ``checkpoint.old``, never without a whole ``checkpoint.tmp`` beside it)."""
    path = finish_replace(Path(out_dir) / CHECKPOINT_DIR, "state.json")
    written = swap_names(path)[0]
    if not path.exists() and (written / "state.json").exists():
        written.rename(path)
    return path / "state.json"


# settings a resumed run may change; any other difference from the checkpoint's run is refused
RESUME_MAY_CHANGE = ("steps", "warmup_steps", "checkpoint_every", "threads", "mixed_precision")
# settings added to TrainConfig since checkpoints held their run's settings, with the value that trains as before
CONFIG_ADDED = {"lora_rank": None}


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    lr_end_fraction: float = 0.02
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    train_text_encoder: bool = True
    caption_dropout: float = 0.1
    ema: bool = False
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    grad_clip: float = 1.0
    # training-time mitigation (Wen et al.): drop samples whose text-conditional noise norm is
    # at or above this value from the loss; None disables it
    mem_filter_threshold: float | None = None
    threads: int | None = None
    # "no", "bf16" or "fp16": autocast the forward passes (weights, optimizer and loss stay float32);
    # fp16 adds a gradient scaler. Training runs on the device the pipeline is on.
    mixed_precision: str = "no"
    # train a LoRA of this rank (alpha = rank) on the UNet's attention projections, and on the text
    # encoder's with train_text_encoder, instead of every weight: the base weights stay as loaded, and
    # a LoRA is what most fine-tunes of SD are. None: a full fine-tune
    lora_rank: int | None = None

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise InputError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        # each checked here, before the model loads and the data is encoded: torch would say only
        # "Invalid learning rate: nan", and a NaN filter threshold would drop nothing, silently
        def check(name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
                span = f"{'(' if low_open else '['}{low}, {high}{']' if high < math.inf else ')'}"
                raise InputError(f"{name} must lie in {span}, got {value}")

        check("lr", 0, low_open=True)
        check("weight_decay", 0)
        check("grad_clip", 0)  # 0: no clipping
        check("lr_end_fraction", 0, 1)
        check("caption_dropout", 0, 1)
        check("ema_decay", 0, 1)
        if self.mem_filter_threshold is not None:
            check("mem_filter_threshold", 0)  # 0 drops every sample: each step skipped
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise InputError(f"lora_rank must be at least 1, got {self.lora_rank}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainData:
    """Training pairs: ``latents[image_index[i]]`` goes with ``captions[i]``."""

    latents: torch.Tensor  # (n_images, 4, h, w), already scaled by the VAE's scaling factor
    image_index: np.ndarray  # (n_rows,)
    captions: list[str]


def encode_images(pipe: StableDiffusionPipeline, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Encode float images (N, H, W, 3) in [0, 1] to scaled latents with the pipeline's VAE, on
    the VAE's device; the latents come back on the CPU (in float32) so the data set does not
    have to fit in the accelerator's memory."""
    vae = pipe.vae
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
            x = x.to(vae.device, vae.dtype)
            out.append((vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def _tokenize(pipe, captions: list[str]) -> torch.Tensor:
    from ..core.denoise import text_length

    return pipe.tokenizer(captions, padding="max_length", max_length=text_length(pipe), truncation=True,
                          return_tensors="pt").input_ids


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous()


LORA_TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}


def add_lora_adapters(module, part: str, rank: int, seed: int) -> None:
    """A LoRA of ``rank`` (alpha = rank, so scale 1) on ``part``'s attention projections, as diffusers'
    train_text_to_image_lora adds it; the module's own weights are frozen. Its random start is drawn
    from ``seed``, not from torch's global generator, so two runs of one seed train the same LoRA."""
    from peft import LoraConfig

    module.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # the adapters are made on the CPU; the caller's draws are left as they were
        torch.manual_seed(seed)
        module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                      target_modules=LORA_TARGETS[part]))


def lora_layers(module) -> dict:
    """``module``'s LoRA weights in diffusers' naming, as ``save_lora_weights`` takes them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


def _checkpoint_weights(module, lora: bool) -> dict:
    """What a checkpoint keeps of ``module``: all its weights, or in a LoRA run its adapters' alone
    (the rest is the starting model, which the run key fingerprints)."""
    if lora:
        return {k: v for k, v in module.state_dict().items() if ".lora_" in k}
    return module.state_dict()


def _save_checkpoint(path: Path, step: int, unet, text_encoder, optimizer, lr_sched, emas, gen, extra: dict,
                     lora: bool = False):
    def write(tmp: Path):
        tmp.mkdir(parents=True)
        for name, module in (("unet", unet), ("text_encoder", text_encoder)):
            save_file({k: _cpu(v) for k, v in _checkpoint_weights(module, lora).items()}, tmp / f"{name}.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        for name, ema in emas.items():
            save_file({str(i): _cpu(p) for i, p in enumerate(ema.shadow_params)}, tmp / f"ema_{name}.safetensors")
        save_file({"generator": gen.get_state()}, tmp / "rng.safetensors")
        state = {"step": step, "optimizer": opt_meta, "lr_scheduler": lr_sched.state_dict(),
                 "ema_steps": {n: e.optimization_step for n, e in emas.items()}, **extra}
        (tmp / "state.json").write_text(json.dumps(state))  # last: it marks the folder whole (checkpoint_state)

    # swapped in whole, so a kill mid-save leaves the previous checkpoint usable
    replace_folder(path, write)


def _differences(saved: dict, now: dict) -> str:
    """``lr 0.001 -> 0.0005, other data``: what separates a checkpoint's run from this one."""
    said = []
    for k in sorted(set(saved.get("config", {})) | set(now["config"])):
        a, b = saved.get("config", {}).get(k), now["config"].get(k)
        if a != b:
            said.append(f"{k} {a} -> {b}")
    if saved.get("model") != now["model"]:
        said.append("another starting model")
    if (saved.get("data_sha256"), saved.get("rows")) != (now["data_sha256"], now["rows"]):
        said.append(f"other training data ({saved.get('rows')} rows then, {now['rows']} now)")
    return ", ".join(said) or "it differs"


def _flatten_optimizer(optimizer: torch.optim.Optimizer):
    sd = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = _cpu(v)
            else:
                meta["scalars"][f"{pid}.{k}"] = v
    if not tensors:
        tensors["_empty"] = torch.zeros(1)
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key == "_empty":
            continue
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _warmup_cosine(warmup: int, total: int, floor: float):
    # diffusers' get_scheduler has no cosine-to-a-floor; this is linear warm-up, then cosine
    # decay from 1 to ``floor`` of the base learning rate
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Trains ``pipe``'s UNet (and optionally its text encoder) in place on ``data``: every weight, or
    with ``lora_rank`` LoRA adapters added to them (left unfused in ``pipe``)."""

    def __init__(self, pipe: StableDiffusionPipeline, data: TrainData, config: TrainConfig, out_dir: str | Path):
        if len(data.image_index) == 0:
            raise ValueError("training data is empty")
        self.pipe, self.data, self.cfg, self.out = pipe, data, config, Path(out_dir)
        self.log: list[dict] = []
        # with mem_filter_threshold: one record per epoch (n_rows samples drawn) of the samples
        # seen and dropped, and the running counts (the current epoch's, and the run's dropped total)
        self._reset_filter_counts()
        self._run_key: dict | None = None
        self._elapsed_before = 0.0  # seconds trained before this run started: a resumed checkpoint's
        self.started_at_step = 0  # the step this run began from: a resumed checkpoint's, else 0

    def _reset_filter_counts(self) -> None:
        self.filter_log: list[dict] = []
        self.filter_counts = {"dropped": 0, "epoch_samples": 0, "epoch_dropped": 0}

    def steps_per_epoch(self) -> int:
        """Batches are drawn with replacement: an epoch is as many samples as there are rows."""
        return max(1, math.ceil(len(self.data.image_index) / self.cfg.batch_size))

    def run(self, progress: bool = True, on_log: Callable[[dict], None] | None = None,
            on_step: Callable[[int], None] | None = None) -> StableDiffusionPipeline:
        # held while training: a second run into the folder, from another process, would write the
        # same checkpoints at once
        with folder_held(self.out):
            return self._train(progress, on_log, on_step)

    def _train(self, progress: bool, on_log: Callable[[dict], None] | None,
               on_step: Callable[[int], None] | None) -> StableDiffusionPipeline:
        cfg, pipe = self.cfg, self.pipe
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        from ..core.denoise import training_scheduler

        unet, te, sched = pipe.unet, pipe.text_encoder, training_scheduler(pipe)  # the pipeline keeps its sampler
        pipe.vae.requires_grad_(False)
        unet.train()
        te.train(cfg.train_text_encoder)
        te.requires_grad_(cfg.train_text_encoder)
        run_key = self.run_key()  # of the starting weights: taken (or kept) before training or a checkpoint changes them
        self.check_resumable(run_key)  # another run's checkpoint is refused before the pipeline gets adapters
        lora = cfg.lora_rank is not None
        if lora and not getattr(unet, "peft_config", None):  # (added once: a second run() goes on with them)
            add_lora_adapters(unet, "unet", cfg.lora_rank, cfg.seed)
            if cfg.train_text_encoder:
                add_lora_adapters(te, "text_encoder", cfg.lora_rank, cfg.seed + 1)
        trained = {"unet": unet, **({"text_encoder": te} if cfg.train_text_encoder else {})}
        # each trained module's parameters that the optimizer moves: every weight, or in a LoRA run the adapters'
        trainable = {name: [p for p in module.parameters() if p.requires_grad or not lora] for name, module in trained.items()}
        params = [p for name in trained for p in trainable[name]]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.lr_end_fraction))
        emas = {name: EMAModel(trainable[name], decay=cfg.ema_decay) for name in trained} if cfg.ema else {}
        # batches are drawn on the CPU from one seeded generator and then moved, so a run is the
        # same draw on every device and resumes exactly
        gen = torch.Generator().manual_seed(cfg.seed)
        dev = unet.device
        amp_dtype = MIXED_PRECISION[cfg.mixed_precision]

        def autocast():
            return torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

        # fp16 gradients underflow without loss scaling; disabled, the scaler passes everything through
        scaler = torch.amp.GradScaler(dev.type, enabled=cfg.mixed_precision == "fp16")
        # a resumed run takes its first step, training time and filter counts from its checkpoint below
        start, self._elapsed_before = 0, 0.0
        self._reset_filter_counts()
        ckpt = self.out / CHECKPOINT_DIR
        if checkpoint_state(self.out).exists():
            start = self._resume(ckpt, unet, te, optimizer, lr_sched, emas, gen, scaler)
        self.started_at_step = start

        ids_all = _tokenize(pipe, self.data.captions)
        empty_ids = _tokenize(pipe, [""])[0]
        empty_ids_on_dev = empty_ids.to(dev)  # the filter's unconditional caption, moved once
        latents_all = self.data.latents
        img_index = torch.from_numpy(np.asarray(self.data.image_index, dtype=np.int64))
        n_rows = len(img_index)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step", disable=not progress)
        # training time goes on from the checkpoint's, so a resumed run's log reads like a straight one's
        t0, counts, per_epoch = time.time() - self._elapsed_before, self.filter_counts, self.steps_per_epoch()
        for step in range(start, cfg.steps):
            rows = torch.randint(0, n_rows, (cfg.batch_size,), generator=gen)
            x0 = latents_all[img_index[rows]]
            ids = ids_all[rows].clone()
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
            ids[drop] = empty_ids
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
            x0, noise, t, ids, drop = x0.to(dev), noise.to(dev), t.to(dev), ids.to(dev), drop.to(dev)
            noisy = sched.add_noise(x0, noise, t)
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
            with autocast():
                with torch.set_grad_enabled(cfg.train_text_encoder):
                    emb = te(ids)[0]
                pred = unet(noisy, t, emb).sample
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            keep = torch.ones(cfg.batch_size, dtype=torch.bool, device=dev)
            if cfg.mem_filter_threshold is not None:
                with autocast():
                    norms = self._memorization_filter(pred, noisy, t, emb, empty_ids_on_dev)
                keep = norms.float() < cfg.mem_filter_threshold
                keep |= drop  # unconditional samples have no text-conditional part to filter
                n_dropped = int((~keep).sum())
                counts["dropped"] += n_dropped
                counts["epoch_samples"] += cfg.batch_size
                counts["epoch_dropped"] += n_dropped
                if (step + 1) % per_epoch == 0 or step == cfg.steps - 1:  # the last, maybe partial, epoch too
                    self.filter_log.append({"epoch": step // per_epoch + 1, "last_step": step,
                                            "samples": counts["epoch_samples"], "dropped": counts["epoch_dropped"],
                                            "complete": (step + 1) % per_epoch == 0})
                    counts["epoch_samples"] = counts["epoch_dropped"] = 0
            if keep.any():
                loss = per_sample[keep].mean()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                for name, ema in emas.items():
                    ema.step(trainable[name])
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"training loss became {loss_value} at step {step}; lower the learning rate")
            else:
                loss_value = float("nan")
            with warnings.catch_warnings():
                # a step whose samples were all filtered out skips the optimizer on purpose; the
                # schedule still counts it, so the budget means the same with and without the filter
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                lr_sched.step()
            bar.update(1)
            if step % 50 == 0 or step == cfg.steps - 1:
                rec = {"step": step, "loss": loss_value, "lr": lr_sched.get_last_lr()[0],
                       "elapsed_s": time.time() - t0, "dropped": counts["dropped"]}
                self.log.append(rec)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if on_log:
                    on_log(rec)
            # the last step too: a finished run re-run (its model save killed, or wanted again) trains
            # nothing twice, and one given more steps goes on from its end
            if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                _save_checkpoint(ckpt, step + 1, unet, te, optimizer, lr_sched, emas, gen,
                                 {"log": self.log, "grad_scaler": scaler.state_dict(), "run": run_key,
                                  "filter_log": self.filter_log, "filter_counts": counts, "elapsed_s": time.time() - t0},
                                 lora=lora)
            if on_step:
                on_step(step)
        bar.close()
        for name, ema in emas.items():
            ema.copy_to(trainable[name])
        unet.eval()
        te.eval()
        return pipe

    def _memorization_filter(self, pred, noisy, t, emb, empty_ids):
        """Per-sample text-conditional noise norm, in epsilon units (Wen et al., training time)."""
        from ..core.denoise import conditional_noise_norm

        with torch.no_grad():
            uncond_emb = self.pipe.text_encoder(empty_ids[None])[0]
            return conditional_noise_norm(self.pipe, noisy, t, emb, uncond_emb, cond_pred=pred)

    def run_key(self) -> dict:
        """What a checkpoint must share to be resumed: the starting model, the training data and
        the settings that shape the run. A resumed run may change only ``RESUME_MAY_CHANGE``: train
        for more steps (the schedule is recomputed over the new total), or switch precision or
        thread count."""
        import hashlib

        from ..core.loading import weights_fingerprints, weights_hash

        if self._run_key is not None:
            return self._run_key
        config = {k: v for k, v in self.cfg.to_dict().items() if k not in RESUME_MAY_CHANGE}
        h = hashlib.sha256()
        h.update(memoryview(np.ascontiguousarray(self.data.latents.detach().cpu().float().numpy())).cast("B"))
        h.update(np.asarray(self.data.image_index, dtype=np.int64).tobytes())
        h.update(json.dumps(list(self.data.captions)).encode())
        # the starting weights, not the path (it may be spelt another way); kept, as training changes them
        # unet_hash (the UNet's first tensors) is what checkpoints saved before the fingerprints hold
        model = {"unet_hash": weights_hash(self.pipe.unet), **weights_fingerprints(self.pipe),
                 "prediction_type": self.pipe.scheduler.config.prediction_type}
        self._run_key = {"config": config, "model": model, "data_sha256": h.hexdigest()[:16], "rows": len(self.data.captions)}
        return self._run_key

    def check_resumable(self, run_key: dict | None = None) -> None:
        """Raise if ``out/checkpoint`` holds another run's checkpoint (checkpoints made before the
        run key was saved resume unchecked), or one trained past ``steps``."""
        state = checkpoint_state(self.out)
        if not state.exists():
            return
        saved = json.loads(state.read_text())
        run_key = json.loads(json.dumps(run_key or self.run_key()))
        if saved.get("run") is not None:
            # a checkpoint saved before the key fingerprinted all the starting weights is checked by what it holds
            from ..core.loading import SCORED_PARTS

            later = {f"{part}_weights" for part in SCORED_PARTS} - set(saved["run"].get("model", {}))
            run_key["model"] = {k: v for k, v in run_key["model"].items() if k not in later}
            # settings added since, at the value that leaves a run as it was: absent from older checkpoints
            run_key["config"] = {k: v for k, v in run_key["config"].items()
                                 if k in saved["run"].get("config", {}) or CONFIG_ADDED.get(k, object()) != v}
            if run_key != saved["run"]:
                raise InputError(f"{state.parent} is a checkpoint of another training run "
                                 f"({_differences(saved['run'], run_key)}); "
                                 "use another output folder, or delete the checkpoint to start over")
        # resumed, it would be saved as a model of fewer steps than it was trained for
        if saved["step"] > self.cfg.steps:
            raise InputError(f"{state.parent} is already trained to step {saved['step']}, past the {self.cfg.steps} steps "
                             f"asked for; ask for at least {saved['step']}, or use another output folder")

    def _resume(self, ckpt: Path, unet, te, optimizer, lr_sched, emas, gen, scaler) -> int:
        """Load the checkpoint in ``ckpt``, which ``run`` has checked (``check_resumable``) before any change."""
        state = json.loads((ckpt / "state.json").read_text())
        lora = self.cfg.lora_rank is not None
        for module, name in ((unet, "unet"), (te, "text_encoder")):
            saved = load_file(ckpt / f"{name}.safetensors")
            if lora:  # its adapters alone: each of them must be there
                wanted = _checkpoint_weights(module, lora=True)
                if set(saved) != set(wanted):
                    raise InputError(f"{ckpt} holds other LoRA weights of the {name} than this run trains; use another "
                                     "output folder, or delete the checkpoint to start over")
                module.load_state_dict(saved, strict=False)
            else:
                module.load_state_dict(saved)
        optimizer.load_state_dict(_unflatten_optimizer(load_file(ckpt / "optimizer.safetensors"), state["optimizer"]))
        lr_sched.load_state_dict(state["lr_scheduler"])
        if state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        for name, ema in emas.items():
            shadow = load_file(ckpt / f"ema_{name}.safetensors", device=str(unet.device))
            ema.shadow_params = [shadow[str(i)] for i in range(len(shadow))]
            ema.optimization_step = state["ema_steps"][name]
        gen.set_state(load_file(ckpt / "rng.safetensors")["generator"])
        self.log = state.get("log", [])
        # the filter's counts go on from the checkpoint (made before diffmem saved them: from 0)
        self.filter_log = state.get("filter_log", [])
        self.filter_counts.update(state.get("filter_counts", {}))
        # (made before diffmem saved it: the last logged time, at most 50 steps short)
        self._elapsed_before = state.get("elapsed_s", self.log[-1]["elapsed_s"] if self.log else 0.0)
        return int(state["step"])


def train_vae(pipe: StableDiffusionPipeline, images: np.ndarray, steps: int = 1500, batch_size: int = 64,
              lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0, progress: bool = True) -> dict:
    """Train the pipeline's AutoencoderKL on float images (N, H, W, 3) in [0, 1], then set its
    scaling factor so that latents have unit variance (as SD's 0.18215 does for SD's VAE)."""
    from tqdm.auto import tqdm

    vae = pipe.vae
    vae.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=100, num_training_steps=steps)
    data = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1
    for _ in tqdm(range(steps), desc="training VAE", unit="step", disable=not progress):
        # batches drawn on the CPU with a CPU generator: the same images on every device
        x = data[torch.randint(0, len(data), (batch_size,), generator=gen)].to(vae.device)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.inference_mode():
        sample = data[:1024].to(vae.device)
        z = vae.encode(sample).latent_dist.mean
        rec = vae.decode(z).sample
        rmse = float(((rec - sample) / 2).pow(2).mean().sqrt())
        std = float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    psnr = 20 * math.log10(1.0 / rmse)
    return {"rmse": rmse, "psnr_db": psnr, "latent_std": std, "scaling_factor": 1.0 / std}
