"""Replication and alignment measures. Each is a class (holding what it loads once: a training
set's features, a model) and a plain function; both call the same kernel.

Replication: how close a generation comes to its nearest training image.
- ``MemLabReplication`` (MemLab): RMSE in units of the training image's own VAE round-trip
  error; replicated at ratio <= 2 (see ``diffmem.memlab.replication``).
- ``SSCDReplication`` (real data): SSCD copy-detection embeddings from a TorchScript file the user
  supplies. Preprocessing: resize the short side to 256, centre-crop 224, ImageNet mean/std
  normalisation; cosine similarity; max over the training images; 0.5 and above is a copy
  (the field's convention).
- ``PixelReplication`` (no weights): Pearson correlation of 64x64 grey thumbnails, max over the
  training images; crude (blind to shifts and crops) but needs nothing downloaded.

Alignment: how well a generation shows what the prompt asked for.
- ``MemLabAlignment``: the share of the prompt's named colour / shape / position that the
  attribute reader finds in the image.
- ``CLIPScore``: cosine similarity of CLIP image and text embeddings, from a local CLIP folder.
"""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..core.cache import content_key, files_fingerprint
from ..core.errors import InputError, first_line
from ..core.images import integer_full_scale
from ..core.results import file_digest, revision_key

# why mitigation's replication measure refuses a data set without rows or an empty list of images
NO_IMAGES_TO_COMPARE = "no training images to compare generations with"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_nchw(images) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1]. Integer images are scaled by their dtype as the scan and train read
    them (a dark uint8 image stays dark); float images are taken as [0, 1] unless their values run well past 1 (then 0..255)."""
    raw = np.asarray(images)
    if raw.dtype == object:
        raise ValueError("images of different sizes: give them as a list, one measure call per size, or resize them")
    arr = raw.astype(np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) or (H, W, 3) RGB, got shape {raw.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("the images hold NaN or inf values")
    if np.issubdtype(raw.dtype, np.integer):
        arr = arr / integer_full_scale(raw)
    elif arr.max(initial=0) > 1.5:
        arr = arr / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)


# -- replication kernels ----------------------------------------------------------------------
def max_cosine(gen: torch.Tensor, train: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Kernel: (similarity to the nearest row of ``train``, its index) for each row of ``gen``."""
    g = torch.nn.functional.normalize(gen.float().flatten(1), dim=1)
    t = torch.nn.functional.normalize(train.float().flatten(1), dim=1)
    sim = g @ t.T
    best, idx = sim.max(dim=1)
    return best.numpy(), idx.numpy()


def sscd_preprocess(images) -> torch.Tensor:
    x = _to_nchw(images)
    h, w = x.shape[-2:]
    scale = 256 / min(h, w)
    x = torch.nn.functional.interpolate(x, size=(max(256, round(h * scale)), max(256, round(w * scale))),
                                        mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - 224) // 2, (w - 224) // 2
    x = x[..., top : top + 224, left : left + 224]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def check_sscd_file(path: str | Path) -> Path:
    """The SSCD file's path, or a clear error before any work when it is not there."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"SSCD model file not found: {path}")
    return path


def check_clip_folder(path: str | Path) -> Path:
    from ..core.loading import check_model_folder

    return check_model_folder(path, "CLIP model")


def load_torchscript(path: str | Path):
    path = check_sscd_file(path)
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates jit.load, but SSCD's weights ship only as TorchScript
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as e:
        raise InputError(f"{path} is not a TorchScript model (SSCD is distributed as TorchScript, e.g. "
                         f"sscd_disc_mixup.torchscript.pt): {first_line(e) or type(e).__name__}") from None


def _each(featurize, images) -> torch.Tensor:
    """``featurize`` over an (N, H, W, 3) batch at once, or image by image for a list (sizes may differ)."""
    if isinstance(images, np.ndarray) or torch.is_tensor(images):
        return featurize(images)
    return torch.cat([_one(featurize, im) for im in images])


def _one(featurize, image) -> torch.Tensor:
    """``featurize`` of one image of a list, as ``_each`` and TrainingImages' ``stages`` apply it."""
    return featurize(np.asarray(image))


FEATURES_KIND = "training_image_features"  # the cache folder; in every key, so a format change is a new name


def _featurize_shard(batch, featurize, batch_size: int):
    """(features, rows, skipped, locations) of one shard's rows; unreadable images are skipped, not fatal."""
    skipped = [(r.row, r.image_issue or "no image") for r in batch if r.image is None]
    good = [r for r in batch if r.image is not None]
    feats = [featurize([r.image for r in good[i : i + batch_size]]) for i in range(0, len(good), batch_size)]
    return (torch.cat(feats) if feats else torch.zeros(0)), [r.row for r in good], skipped, [r.location for r in good]


def _json_array(value) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), np.uint8)


def _load_shard(key: str):
    from ..core.cache import load_arrays

    saved = load_arrays(FEATURES_KIND, key)
    if saved is None or "locations" not in saved:  # cached before locations were kept: made again, once
        return None
    skipped = [tuple(s) for s in json.loads(saved["skipped"].tobytes().decode())]
    locations = json.loads(saved["locations"].tobytes().decode())
    return torch.from_numpy(saved["features"]), saved["rows"].tolist(), skipped, locations


def _save_shard(key: str, features: torch.Tensor, rows: list[int], skipped: list, locations: list) -> None:
    from ..core.cache import save_arrays

    save_arrays(FEATURES_KIND, key, {"features": features.numpy(), "rows": np.asarray(rows, np.int64),
                                     "skipped": _json_array(skipped), "locations": _json_array(locations)})


class TrainingImages:
    """Features of the training images a replication measure compares generations with, the row each
    came from and where its image is (``locations``: a path, ``shard.tar:key``; None where a source
    names none).

    ``images``: an (N, H, W, 3) array or a list of images (rows 0..N-1), or a dataset as the scan
    reads it (an image folder, a .parquet / .jsonl / .csv table, a saved ``datasets`` folder, or a
    ``diffmem.scan`` source), read ``shard_size`` rows at a time so only the features stay in memory.
    Rows whose image cannot be read are left out and listed in ``skipped`` (row, why).

    A local dataset's features are kept shard by shard in diffmem's disk cache (``core.cache``),
    named by the dataset's path and files (names, sizes, modification times), the featurizer's
    ``identity`` and the shard: a killed run redoes one shard, and the next run on the same data
    reads them back.

    ``stages``: ``(prepare, finish)`` with ``featurize(images) == finish([prepare(im) for im in images])``.
    Given, each image of a dataset is prepared as soon as it is decoded, so a shard holds its prepared
    inputs and not its full-size pixels (a shard of 32 photos of 12 megapixels: 4.6 GB of float32).
    """

    def __init__(self, images, featurize, batch_size: int = 32, shard_size: int = 32, progress: bool = False,
                 image_column: str | None = None, identity: str | None = None, stages: tuple | None = None):
        from ..scan.sources import Source, ZeroRowsError, open_source, shards

        self.skipped: list[tuple[int, str]] = []
        if isinstance(images, (str, Path, Source)):
            try:
                source = open_source(images, image_column=image_column, captions=False)  # images alone are compared
            except ZeroRowsError as e:  # its words are the scan's, "nothing to scan"
                raise e.for_job(NO_IMAGES_TO_COMPARE) from None
            if not source.has_images:
                raise InputError(f"{images}: the data set holds no images to compare generations with")
            self.name = str(images) if isinstance(images, (str, Path)) else type(images).__name__
            fingerprint = files_fingerprint(images) if identity is not None else None
            feats, rows, locations = [], [], []
            from tqdm.auto import tqdm

            with tqdm(total=len(source), desc="training images", unit="image", disable=not progress) as bar:
                for _, start, stop in shards(source, shard_size):
                    key = fingerprint and content_key(FEATURES_KIND, identity, str(Path(images).resolve()), fingerprint,
                                                      str(image_column), f"{start}:{stop}", torch.__version__)
                    shard = _load_shard(key) if key else None
                    if shard is None:
                        if stages is None:
                            shard = _featurize_shard(source.rows(start, stop), featurize, batch_size)
                        else:
                            prepare, finish = stages
                            rows_read = source.reduced_rows(start, stop, lambda image: (None, None, prepare(image)))
                            shard = _featurize_shard(rows_read, finish, batch_size)
                        if key:
                            _save_shard(key, *shard)
                    feats.append(shard[0])
                    rows += shard[1]
                    self.skipped += shard[2]
                    locations += shard[3]
                    bar.update(stop - start)
            if not rows:
                raise InputError(f"{images}: none of its {len(source)} images can be read "
                                 f"(row {self.skipped[0][0]}: {self.skipped[0][1]})")
            self.features, self.rows = torch.cat([f for f in feats if len(f)]), np.asarray(rows)
            self.locations = locations
            self._source = source
        else:
            if len(images) == 0:
                raise InputError(NO_IMAGES_TO_COMPARE)
            self.name = f"{len(images)} images"
            self.features = torch.cat([featurize(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
            self.rows = np.arange(len(self.features))
            self.locations = [None] * len(self.rows)
            self._source = images

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, row: int) -> np.ndarray:
        """Row ``row``'s image, read again from the data (only features are kept): float32 (H, W, 3) in [0, 1]."""
        from ..core.images import image_array
        from ..scan.sources import Source

        if isinstance(self._source, Source):
            (found,) = self._source.rows(int(row), int(row) + 1)
            if found.image is None:  # it was read for its features; the data changed since
                raise InputError(f"row {row} of {self.name} can no longer be read: {found.image_issue}")
            return found.image
        return image_array(np.asarray(self._source[int(row)]))

    def describe(self) -> str:
        text = f"{len(self)} training images from {self.name}"
        if self.skipped:
            row, why = self.skipped[0]
            text += f" ({len(self.skipped)} unreadable left out; row {row}: {why})"
        return text

    def nearest(self, gen_features: torch.Tensor) -> dict:
        sim, idx = max_cosine(gen_features, self.features)
        return {"similarity": sim, "nearest": self.rows[idx], "location": [self.locations[i] for i in np.asarray(idx)]}


# Each measure's revision (core.results.revision_key), bumped when it gives other values for the same
# images: audits and benchmark rows measured by an earlier one, and cached training features, are
# then redone, not reused. The key of revision 1 is the key they had before measures had revisions.


def _revised(identity: str, measure) -> str:
    """A cached-features identity of ``measure``'s current revision (unchanged at revision 1)."""
    revision = revision_key(measure).get("revision")
    return f"{identity}:r{revision}" if revision else identity


class SSCDReplication:
    """SSCD copy detection (TorchScript file); ``train_images`` as ``TrainingImages`` takes them."""

    threshold = 0.5
    revision = 1

    def __init__(self, model_path: str | Path, train_images, batch_size: int = 32, progress: bool = False,
                 image_column: str | None = None):
        self.model_path = str(model_path)
        self.model = load_torchscript(model_path)
        self.batch_size = batch_size
        identity = _revised(f"sscd:{file_digest(model_path)}", self)  # cached training features belong to these weights only
        self.train = TrainingImages(train_images, self.embed, batch_size, progress=progress, image_column=image_column,
                                    identity=identity, stages=(partial(_one, sscd_preprocess), self._embed_prepared))

    def describe(self) -> str:
        return f"SSCD ({self.model_path}) cosine >= {self.threshold} to the nearest of {self.train.describe()}"

    @torch.inference_mode()
    def embed(self, images) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            out.append(self.model(_each(sscd_preprocess, images[i : i + self.batch_size])))
        return torch.cat(out)

    @torch.inference_mode()
    def _embed_prepared(self, prepared: list) -> torch.Tensor:
        return torch.cat([self.model(torch.cat(prepared[i : i + self.batch_size]))
                          for i in range(0, len(prepared), self.batch_size)])

    def __call__(self, images) -> dict:
        m = self.train.nearest(self.embed(images))
        return {**m, "replicated": m["similarity"] >= self.threshold}


def sscd_replication(images, train_images, model_path) -> dict:
    return SSCDReplication(model_path, train_images)(images)


def _thumbs(images, size: int = 64) -> torch.Tensor:
    x = _to_nchw(images).mean(dim=1, keepdim=True)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).flatten(1)
    return x - x.mean(dim=1, keepdim=True)


class PixelReplication:
    """No-weights fallback: Pearson correlation of grey 64x64 thumbnails; copies at >= 0.95."""

    threshold = 0.95
    revision = 1

    def __init__(self, train_images, progress: bool = False, image_column: str | None = None):
        self.train = TrainingImages(train_images, self.thumbs, progress=progress, image_column=image_column,
                                    identity=_revised("pixel-thumbs-64", self),
                                    stages=(partial(_one, _thumbs), torch.cat))

    def describe(self) -> str:
        return f"pixel correlation (grey 64x64 thumbnails, no weights) >= {self.threshold} to the nearest of {self.train.describe()}"

    @staticmethod
    def thumbs(images) -> torch.Tensor:
        return _each(_thumbs, images)

    def __call__(self, images) -> dict:
        m = self.train.nearest(self.thumbs(images))
        return {**m, "replicated": m["similarity"] >= self.threshold}


def pixel_replication(images, train_images) -> dict:
    return PixelReplication(train_images)(images)


class MemLabReplication:
    """MemLab's measure (ratio to the nearest training image's VAE round-trip error)."""

    revision = 1

    def __init__(self, pipe, manifest: dict | None = None):
        from ..memlab import dataset as ds
        from ..memlab.replication import MemLabReplication as Kernel

        manifest = manifest or _manifest_of(pipe)
        self.kernel = Kernel(ds.build(ds.MemLabConfig(**manifest["config"])), pipe.vae)
        self.threshold = self.kernel.threshold

    def __call__(self, images) -> dict:
        m = self.kernel.nearest(np.asarray(images).reshape(-1, *np.asarray(images).shape[-3:]))
        return {"ratio": m.ratio, "nearest": m.nearest_id, "replicated": m.replicated}


def memlab_replication(images, pipe) -> dict:
    return MemLabReplication(pipe)(images)


def _manifest_of(pipe) -> dict:
    p = Path(str(pipe.name_or_path)) / "memlab_manifest.json"
    if not p.exists():
        raise InputError("this pipeline is not a MemLab model (no memlab_manifest.json): give --sscd or use the pixel measure")
    return json.loads(p.read_text())


def measure_classes(train_images=None, sscd: str | Path | None = None, clip: str | Path | None = None) -> tuple:
    """The classes of the (replication, alignment) measures a mitigation is measured with, without
    loading them: those ``chosen_measures`` loads, and MemLab's own for one not chosen (what
    ``apply_measures`` falls back to on a MemLab model). Their revisions key saved work."""
    replication = MemLabReplication if train_images is None else SSCDReplication if sscd is not None else PixelReplication
    return replication, (CLIPScore if clip is not None else MemLabAlignment)


def chosen_measures(train_images=None, sscd: str | Path | None = None, clip: str | Path | None = None,
                    image_column: str | None = None, progress: bool = False) -> tuple:
    """(replication, alignment) as a user chose them, each None when not chosen: replication against
    ``train_images`` by SSCD with an ``sscd`` file, else by pixel correlation; alignment by CLIP score
    with a ``clip`` folder. Loading reads the training images, so call it before the model loads."""
    replication_class, alignment_class = measure_classes(train_images, sscd, clip)
    replication = alignment = None
    if train_images is not None:
        weights = (sscd,) if replication_class is SSCDReplication else ()  # the pixel measure has none
        replication = replication_class(*weights, train_images, progress=progress, image_column=image_column)
    if clip is not None:
        alignment = alignment_class(clip)
    return replication, alignment


# -- alignment --------------------------------------------------------------------------------
def named_features(prompt: str) -> dict[str, str]:
    """The MemLab features a prompt names (colour, shape, position)."""
    from ..memlab import world

    words = prompt.lower().replace(",", " ").split()
    out = {}
    for c in world.COLOURS:
        if c in words:
            out["colour"] = c
    for s in world.SHAPES:
        if s in words:
            out["shape"] = s
    for pos in world.POSITIONS:
        if pos in words:
            out["position"] = pos
    return out


def _one_prompt_each(images, prompts) -> list[str]:
    """The prompts as a list (a string is one prompt), one per image: zip would drop the surplus unsaid."""
    from ..core.prompts import prompt_list

    prompts = prompt_list(prompts)
    n = len(images) if not isinstance(images, np.ndarray) or images.ndim == 4 else 1
    if len(prompts) != n:
        raise InputError(f"alignment scores each image against its own prompt: got {n} image(s) and {len(prompts)} prompt(s)")
    return prompts


def memlab_alignment_kernel(reads: list[dict], prompts: list[str]) -> np.ndarray:
    scores = []
    for rd, p in zip(reads, prompts):
        named = named_features(p)
        scores.append(np.mean([rd.get(k) == v for k, v in named.items()]) if named else np.nan)
    return np.array(scores, float)


class MemLabAlignment:
    """MemLab's attribute reader's agreement with the features a prompt names."""

    revision = 1

    def __init__(self):
        from ..memlab.reader import AttributeReader

        self.reader = AttributeReader()

    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        """images (N, H, W, 3) with one prompt each."""
        prompts = _one_prompt_each(images, prompts)
        if isinstance(images, np.ndarray) and images.ndim == 3:  # one image
            images = images[None]
        return memlab_alignment_kernel(self.reader.read_many(images), prompts)


def memlab_alignment(images, prompts) -> np.ndarray:
    return MemLabAlignment()(images, prompts)


class CLIPScore:
    """Cosine similarity of CLIP image and text embeddings, from a local transformers CLIP folder."""

    revision = 1

    def __init__(self, path: str | Path):
        from transformers import CLIPModel, CLIPTokenizer

        from ..core.loading import model_folder_errors

        path = check_clip_folder(path)
        self.path = str(path)
        with model_folder_errors(path, "a transformers CLIP model with safetensors weights and its tokenizer"):
            self.model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.size = self.model.config.vision_config.image_size

    def describe(self) -> str:
        return f"CLIP score ({self.path}) against the prompt as written"

    @torch.inference_mode()
    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        prompts = _one_prompt_each(images, prompts)
        x = _to_nchw(images)
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
        std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
        img = self.model.get_image_features(pixel_values=(x - mean) / std)
        tok = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        txt = self.model.get_text_features(**tok)
        if not torch.is_tensor(img):
            img, txt = img.pooler_output, txt.pooler_output
        return torch.nn.functional.cosine_similarity(img, txt).numpy()


def clip_score(images, prompts, path) -> np.ndarray:
    return CLIPScore(path)(images, prompts)
