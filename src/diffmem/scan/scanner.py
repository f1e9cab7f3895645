"""``DatasetScanner``: a resumable scan of a captioned training set for duplication and triggers.

Two passes, in the shape of cleanlab's Datalab (one result shape for every check):

1. **per shard** (checkpointed): read ``shard_size`` rows, reduce each to compact features
   (normalized and truncated caption, MinHash signature, perceptual hash, thumbnail and, with a
   model, the per-sample noise norm) and write them to ``shards/shard-NNNNN.parquet`` atomically,
   then record the shard in ``scan_state.json``. A scan killed at any moment resumes after the
   last recorded shard; a shard file without its record is simply recomputed, so no row is ever
   lost or counted twice. Memory is bounded by the shard size.
2. **global** (cheap, recomputed): clusters, caption groups and trigger phrases from the features.

The result is a per-row table with ``is_<check>_issue`` and ``<check>_score``, a one-row summary
per check, and an info dict (clusters, caption groups, phrases).
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.results import dump_json, folder_held, read_parquet, reading_saved, write_parquet
from .sources import Source, open_source, shards

CHECKS = ("image_duplicates", "caption_duplicates", "triggers", "memorization")
DEFAULT_CHECKS = ("image_duplicates", "caption_duplicates", "triggers")
STATE = "scan_state.json"
# what `diffmem scan` writes in its output folder (ScanResult.save, report.write_report), its work folder aside
SCAN_OUTPUTS = ("scan_rows.parquet", "scan_summary.json", "scan_images.npz", "report.md", "clusters.png", "memorization.png")


def check_scan_folder(out: Path, work: str = "work") -> None:
    """An output folder may hold other files (the data set's own folder, say), but none that the scan
    would overwrite unless an earlier scan wrote them."""
    out = Path(out)
    if (out / work / STATE).exists() or (out / "scan_summary.json").exists():
        return  # an earlier scan's
    taken = [name for name in (*SCAN_OUTPUTS, work) if (out / name).exists()]
    if taken:
        raise InputError(f"{out} holds {', '.join(taken)}, which the scan would overwrite, and no earlier scan; "
                         "choose another --out")


SCAN_VERSION = 2  # 2: images read upright by EXIF, 16-bit scaled, non-text captions flagged (features differ from 1)


@dataclass
class ScanSettings:
    checks: tuple[str, ...] = DEFAULT_CHECKS
    shard_size: int = 1024
    limit: int | None = None  # scan only the first rows (a quick look at a big dataset)
    # image near-duplicates
    max_hamming: int = 4
    neighbours: int = 10
    min_agreement: float = 0.6
    # the thumbnails' neighbour search: exact, approximate (faiss IVF), or auto: exact up to
    # LARGE_IMAGE_SCAN images, approximate past them, where the exact one's time grows as their square
    image_index: str = "auto"
    # caption near-duplicates
    caption_jaccard: float = 0.8
    # triggers
    min_support: int = 5
    min_purity: float = 0.9
    max_n: int = 8
    # per-sample memorization score (Wen et al.'s training-time statistic)
    model: str | None = None
    lora: str | list[str] | None = None  # a LoRA fused into the model (load_pipeline), at lora_scale, or several
    lora_scale: float | list[float] = 1.0  # one for every LoRA, or one each
    textual_inversion: tuple[str, ...] = ()  # embeddings added to the model: FILE or TOKEN=FILE each
    timestep: int | None = None  # None: half the training schedule, the same for every row
    seed: int = 0
    memorization_threshold: float | None = None  # None: flag robust outliers (median + 3 MAD)
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        from ..core.loading import lora_settings, resolve_dtype

        self.checks = tuple(self.checks)
        self.lora, self.lora_scale = lora_settings(self.lora, self.lora_scale)
        self.textual_inversion = tuple(str(x) for x in self.textual_inversion)
        self.dtype = str(resolve_dtype(self.dtype)).removeprefix("torch.")  # one name per dtype, checked now
        unknown = [c for c in self.checks if c not in CHECKS]
        if unknown:
            raise InputError(f"unknown scan check(s) {unknown}; choose from {list(CHECKS)}")
        if not self.checks:
            raise InputError("no scan checks chosen")
        if "memorization" in self.checks:
            from ..core.loading import resolve_device

            if not self.model:
                raise InputError("the memorization check needs a model (--model memlab or a pipeline folder)")
            resolve_device(self.device)  # before any shard is written
            from ..core.loading import check_adapters

            check_adapters(self.lora, self.lora_scale, self.textual_inversion)
        else:  # the memorization check's own settings would go unused without a word
            given = [f"--{name.replace('_', '-')}" for name in ("model", "lora", "textual_inversion", "timestep",
                                                                  "memorization_threshold")
                     if getattr(self, name) not in (None, ())]
            if given:
                raise InputError(f"{', '.join(given)} {'sets' if len(given) == 1 else 'set'} the memorization check, "
                                 "which is not among the checks: add memorization to --checks")
        if self.memorization_threshold is not None and not math.isfinite(self.memorization_threshold):
            raise InputError(f"memorization_threshold must be a finite number, got {self.memorization_threshold}")
        if self.image_index not in IMAGE_INDEXES:
            raise InputError(f"unknown image index {self.image_index!r}: choose from {', '.join(IMAGE_INDEXES)}")
        if self.shard_size < 1:
            raise InputError("shard_size must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise InputError("limit must be at least 1")
        if not 0 < self.min_purity <= 1 or self.min_support < 2:
            raise InputError("triggers need min_support >= 2 and 0 < min_purity <= 1")

    def pass1_key(self) -> dict:
        """The settings that change per-shard features: a resume with other values is refused."""
        keys = ["shard_size", "limit", "model", "timestep", "seed"]
        d = {k: getattr(self, k) for k in keys}
        d["memorization"] = "memorization" in self.checks
        if self.lora is not None:  # scans without one keep the key they always had, and scans of one theirs
            from ..core.loading import lora_entries, saved_form

            d["lora"] = saved_form([{"path": str(Path(path).expanduser().resolve()), "scale": scale}
                                    for path, scale in lora_entries(self.lora, self.lora_scale)])
        if self.textual_inversion:
            d["textual_inversion"] = list(self.textual_inversion)
        if d["memorization"]:
            # images not of the model's size are cropped to their centre square, as training shows them;
            # scans before stretched them, and their rows are not joined with rows scored this way
            d["memorization_pixels"] = "centre-crop"
        if d["memorization"] and self.dtype != "float32":
            # a half-precision model scores differently; the device does not enter (same numbers),
            # and float32 scans keep the key they always had
            d["dtype"] = self.dtype
        return d


LARGE_IMAGE_SCAN = 100_000  # images past which the exact image search is slow: auto turns approximate
IMAGE_INDEXES = ("auto", "exact", "approximate")
MAX_CLUSTER_IMAGES = 1000  # median thumbnails kept for the largest clusters (a 32x32 RGB each)


@dataclass
class ScanResult:
    settings: dict
    source: dict
    rows: "object"  # pandas frame, one row per dataset row
    summary: "object"  # pandas frame, one row per check
    info: dict = field(default_factory=dict)  # clusters, caption groups, phrases
    images: dict = field(default_factory=dict)  # "mean" and "cluster_<id>" median thumbnails (uint8)
    thumbs: list | None = field(default=None, repr=False)  # per-row thumbnails of this run (not saved)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_parquet(self.rows.drop(columns=["thumb"], errors="ignore"), folder / "scan_rows.parquet",
                      {"settings": self.settings, "source": self.source})
        dump_json({"settings": self.settings, "source": self.source, "summary": self.summary.to_dict("records"),
                   "info": self.info}, folder / "scan_summary.json")
        if self.images:
            from ..core.results import atomic_path

            with atomic_path(folder / "scan_images.npz") as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, **self.images)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ScanResult":
        import pandas as pd

        folder = Path(folder)
        if not (folder / "scan_summary.json").exists():
            raise InputError(f"{folder} holds no scan results (scan_summary.json)")
        with reading_saved(folder, "scan"):
            meta = json.loads((folder / "scan_summary.json").read_text())
            rows, _ = read_parquet(folder / "scan_rows.parquet")
            images = {}
            if (folder / "scan_images.npz").exists():
                with np.load(folder / "scan_images.npz", allow_pickle=False) as z:
                    images = {k: z[k] for k in z.files}
            return cls(meta["settings"], meta["source"], rows, pd.DataFrame(meta["summary"]), meta["info"], images)

    def cluster_images(self) -> dict[int, np.ndarray]:
        return {int(k.split("_", 1)[1]): v for k, v in self.images.items() if k.startswith("cluster_")}

    @property
    def triggers(self):
        import pandas as pd

        return pd.DataFrame(self.info.get("triggers", []))

    def plot_clusters(self, path: str | Path, thumbs: np.ndarray | None = None, max_clusters: int = 12,
                      per_cluster: int = 8) -> Path | None:
        """A PNG grid: one line per largest image cluster, its first members' thumbnails."""
        from ..core.figures import subplots

        clusters = self.info.get("image_clusters", [])[:max_clusters]
        if thumbs is None or not clusters:
            return None
        fig, axes = subplots(len(clusters), per_cluster, figsize=(per_cluster * 1.1, len(clusters) * 1.25),
                                 squeeze=False)
        for line, cl in zip(axes, clusters):
            for k, ax in enumerate(line):
                ax.axis("off")
                if k < len(cl["example_rows"]) and thumbs[cl["example_rows"][k]] is not None:
                    ax.imshow(thumbs[cl["example_rows"][k]], interpolation="nearest")
            line[0].set_title(f"cluster {cl['cluster']}: {cl['size']} rows", fontsize=7, loc="left")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path


class DatasetScanner:
    """Scan ``dataset`` (``memlab``, an image folder, a table file, a saved or in-memory datasets
    Dataset, or a ``Source``) into ``work_dir``; an existing scan there is resumed."""

    def __init__(self, dataset, work_dir: str | Path | None = None, caption_column: str | None = None,
                 image_column: str | None = None, progress: bool = True, **settings):
        self.source: Source = open_source(dataset, caption_column, image_column)
        self.settings = ScanSettings(**settings)
        self._tmp = None
        if work_dir is None:  # removed when a scan ends, fails or is killed, or the scanner is dropped
            self._tmp = tempfile.TemporaryDirectory(prefix="diffmem-scan-")
            work_dir = self._tmp.name
        self.work_dir = Path(work_dir)
        self.progress = progress
        self._pipe = None

    # -- pass 1 ------------------------------------------------------------------------------

    def _n_rows(self) -> int:
        n = len(self.source)
        return min(n, self.settings.limit) if self.settings.limit else n

    def _state(self) -> dict:
        return {"version": SCAN_VERSION, "source": self.source.describe(), "pass1": self.settings.pass1_key(),
                "rows": self._n_rows(), "done": []}

    def _load_state(self) -> dict:
        path = self.work_dir / STATE
        fresh = self._state()
        if not path.exists():
            return fresh
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise InputError(f"{path} is damaged; delete the folder to start the scan again") from None
        for key in ("version", "source", "pass1", "rows"):
            if json.dumps(state.get(key), sort_keys=True) != json.dumps(fresh[key], sort_keys=True):
                what = f"{key} differs"
                if key == "pass1" and isinstance(state.get(key), dict):  # which of its settings: --timestep, --lora, ...
                    old, new = state[key], fresh[key]
                    names = sorted(k for k in set(old) | set(new) if json.dumps(old.get(k), sort_keys=True)
                                   != json.dumps(new.get(k), sort_keys=True))
                    what = f"its {', '.join(names)} {'differs' if len(names) == 1 else 'differ'} from this run's"
                raise InputError(f"{self.work_dir} holds a scan of another dataset or with other settings "
                                 f"({what}); use a new output folder or delete this one")
        return state

    def _shard_path(self, k: int) -> Path:
        return self.work_dir / "shards" / f"shard-{k:05d}.parquet"

    def run_pass1(self) -> dict:
        # held while shards are written: a second scan into the folder, from another process, would
        # write the same shards and record them at once
        with folder_held(self.work_dir):
            return self._pass1()

    def _pass1(self) -> dict:
        from tqdm.auto import tqdm

        state = self._load_state()
        done = set(state["done"])
        n = self._n_rows()
        todo = [(k, a, b) for k, a, b in shards(self.source, self.settings.shard_size) if a < n and k not in done]
        if todo and "memorization" in self.settings.checks:
            # a model or timestep it refuses stops the scan before any shard is written
            self._check_memorization_weights(state)
        total = math.ceil(n / self.settings.shard_size)
        bar = tqdm(total=n, initial=min(n, len(done) * self.settings.shard_size), unit="row", desc="scanning",
                   disable=not self.progress)
        truncation = _truncation_keys()
        reduce = self._image_reducer() if todo else None
        for k, start, stop in todo:
            stop = min(stop, n)
            frame = self._shard_features(self.source.reduced_rows(start, stop, reduce), truncation)
            write_parquet(frame, self._shard_path(k))
            state["done"] = sorted(done | {k})
            done.add(k)
            dump_json(state, self.work_dir / STATE)  # the record follows the file: never the reverse
            bar.update(stop - start)
        bar.close()
        if len(done) != total:
            raise RuntimeError(f"scan incomplete: {len(done)} of {total} shards")
        return state

    def _image_reducer(self):
        """What a row keeps of its image (``Source.reduced_rows``): its perceptual hash and thumbnail, and
        for the memorization check the model-size input it encodes; the full-size pixels go as soon as
        these are made, so a shard never holds them all."""
        from .features import phash64, thumbnail

        size = None
        if "memorization" in self.settings.checks:  # its module imports diffusers: only for the check
            from . import memorization

            size = memorization.model_pixels(self._memorization_model())

        def reduce(image):
            kept = None if size is None else memorization.compact_pixels(memorization.model_sized(image, size))
            return phash64(image), thumbnail(image).tobytes(), kept

        return reduce

    def _shard_features(self, rows, truncation):
        import pandas as pd

        from .caption_duplicates import minhash_signatures
        from .features import normalize_caption

        norm = [normalize_caption(r.caption) if r.caption_issue is None else None for r in rows]
        norm = [c if c else None for c in norm]
        sig = minhash_signatures(norm)
        phash = [r.phash for r in rows]
        thumbs = [r.thumb for r in rows]
        frame = pd.DataFrame({
            "row": [r.row for r in rows],
            "caption": [r.caption for r in rows],
            "caption_issue": [r.caption_issue for r in rows],
            "image_issue": [r.image_issue for r in rows],
            "image_key": [r.image_key for r in rows],
            "location": [r.location for r in rows],
            "caption_norm": norm,
            "caption_truncated": truncation(norm),
            "minhash": [s.tobytes() for s in sig],
            "phash": pd.array(phash, dtype="Int64"),
            "thumb": thumbs,
        })
        if "memorization" in self.settings.checks:
            frame["memorization_score"] = self._noise_norms(rows, norm)
        return frame

    def _memorization_model(self):
        """The memorization check's pipeline, loaded once and its timestep checked against its schedule."""
        if self._pipe is None:
            from ..core.loading import load_pipeline
            from .memorization import scan_timestep

            pipe = load_pipeline(self.settings.model, device=self.settings.device, dtype=self.settings.dtype,
                                 lora=self.settings.lora, lora_scale=self.settings.lora_scale,
                                 textual_inversion=self.settings.textual_inversion)
            scan_timestep(pipe, self.settings.timestep)
            self._pipe = pipe
        return self._pipe

    def _check_memorization_weights(self, state: dict) -> None:
        """Record the memorization model's weights in ``state``, or refuse to resume a scan whose shards
        another model's weights scored: the settings name the model by its path, whose files may have
        been replaced since (scans recorded before this resume unchecked)."""
        from ..core.loading import weights_fingerprints

        weights = weights_fingerprints(self._memorization_model())
        if state.setdefault("model_weights", weights) != weights:
            raise InputError(f"{self.work_dir} holds a scan whose memorization scores came from other weights than "
                             f"{self.settings.model}'s now (the model changed since); use a new output folder or "
                             "delete this one")

    def _noise_norms(self, rows, norm) -> np.ndarray:
        from .memorization import sample_noise_norms

        return sample_noise_norms(self._memorization_model(), rows, timestep=self.settings.timestep, seed=self.settings.seed)

    # -- pass 2 ------------------------------------------------------------------------------

    def load_features(self, rescan_damaged: bool = True):
        """(features, thumbnails): the shards' per-row features, with a ``has_image`` column, and their
        thumbnails as one uint8 array (rows, side, side, 3), zeros where a row has no image, or None where
        none has one. The thumbnails are copied into the array a shard at a time: kept as a bytes object
        a row beside it, they were a second copy through the whole analysis (3 GB a million)."""
        import pandas as pd
        import pyarrow.parquet as pq

        state = self._load_state()
        n = self._n_rows()
        parts, damaged, thumbs, at = [], [], None, 0
        for k in sorted(state["done"]):
            try:
                table = pq.read_table(self._shard_path(k))
                shard_thumbs, has_image = stack_thumbnails(table.column("thumb").to_pylist())
                part = table.drop_columns(["thumb"]).to_pandas()
            except Exception as e:  # lost or damaged after it was recorded: hours of a scan need not go with it
                damaged.append(k)
                warnings.warn(f"scanning shard {k} again: {self._shard_path(k)} cannot be read ({type(e).__name__})",
                              stacklevel=2)
                continue
            part["has_image"] = has_image
            if shard_thumbs is not None and at + len(part) <= n and not damaged:
                if thumbs is None:
                    thumbs = np.zeros((n, *shard_thumbs.shape[1:]), np.uint8)
                thumbs[at : at + len(part)] = shard_thumbs
            parts.append(part)
            at += len(part)
        if damaged:
            if not rescan_damaged:
                raise RuntimeError(f"scan shards {damaged} in {self.work_dir} cannot be read even when written again")
            state["done"] = sorted(set(state["done"]) - set(damaged))
            dump_json(state, self.work_dir / STATE)
            self.run_pass1()
            return self.load_features(rescan_damaged=False)
        frame = pd.concat(parts, ignore_index=True)
        if frame["row"].duplicated().any() or len(frame) != n:
            raise RuntimeError(f"scan features in {self.work_dir} are inconsistent; delete the folder and scan again")
        return frame, thumbs

    def scan(self, checks=None) -> ScanResult:
        if checks is not None:
            self.settings = ScanSettings(**{**asdict(self.settings), "checks": tuple(checks)})
        if self._tmp is not None and not self.work_dir.exists():  # scanned before: a new folder of its own
            self._tmp = tempfile.TemporaryDirectory(prefix="diffmem-scan-")
            self.work_dir = Path(self._tmp.name)
        try:
            with folder_held(self.work_dir):  # a damaged shard found while reading is scanned again
                self.run_pass1()
                features, thumbs = self.load_features()
            return analyse(features, self.settings, self.source.describe(), thumbs=thumbs)
        finally:
            if self._tmp is not None:  # nothing there can be resumed: no later scanner knows the folder
                self._tmp.cleanup()


def _truncation_keys():
    from .features import TruncationKeys

    return TruncationKeys()


def stack_thumbnails(values: list) -> tuple[np.ndarray | None, np.ndarray]:
    """(thumbnails, has_image) of per-row thumbnail bytes (None: no image): one uint8 array (rows, side,
    side, 3), zeros where a row has no image, or None where none has one."""
    has_image = np.array([v is not None for v in values], bool)
    if not has_image.any():
        return None, has_image
    side = int(round(math.sqrt(len(values[int(np.argmax(has_image))]) / 3)))
    thumbs = np.zeros((len(values), side, side, 3), np.uint8)
    for i in np.flatnonzero(has_image):
        thumbs[i] = np.frombuffer(values[i], np.uint8).reshape(side, side, 3)
    return thumbs, has_image


def analyse(features, settings: ScanSettings, source: dict, thumbs: np.ndarray | None = None) -> ScanResult:
    """Pass 2: every global check from the per-row features: ``load_features``' features and
    thumbnails, or features whose ``thumb`` column holds each row's thumbnail bytes."""
    import pandas as pd

    f = features
    n = len(f)
    if "thumb" in f:
        thumbs, has_image = stack_thumbnails(f["thumb"].tolist())
    else:
        has_image = f["has_image"].to_numpy(bool)
    rows = f[["row", "caption", "caption_issue", "image_issue", "image_key"]].copy()
    # shards scanned before rows recorded where their image is have no location
    rows.insert(5, "location", f["location"].to_numpy(object) if "location" in f else np.full(n, None, object))
    rows["is_bad_caption_issue"] = f["caption_issue"].notna().to_numpy()
    rows["is_bad_image_issue"] = f["image_issue"].notna().to_numpy()
    summary = [
        {"check": "bad_caption", "issues": int(rows["is_bad_caption_issue"].sum()),
         "detail": {str(k): int(v) for k, v in f["caption_issue"].value_counts().items()}},
        {"check": "bad_image", "issues": int(rows["is_bad_image_issue"].sum()),
         # counted by kind ("unreadable image: FileNotFoundError"): each full message names its own file
         "detail": {str(k): int(v) for k, v in
                    f["image_issue"].dropna().map(lambda m: ": ".join(str(m).split(": ")[:2])).value_counts().items()}},
    ]
    info: dict = {}
    norm = [c if isinstance(c, str) and c else None for c in f["caption_norm"]]
    clusters = np.full(n, -1)

    if "image_duplicates" in settings.checks:
        if has_image.any():
            from .image_duplicates import image_clusters

            n_images, index = int(has_image.sum()), settings.image_index
            if index == "auto":
                index = "approximate" if n_images > LARGE_IMAGE_SCAN else "exact"
            if index == "exact" and n_images > LARGE_IMAGE_SCAN:
                import warnings

                # said before the wait, not after (benchmarks/scan_image_scale.py)
                warnings.warn(f"{n_images:,} images: the exact near-duplicate image search compares each with every "
                              "other, so its time grows with the square of the count (on 2 CPU cores about 3 min for "
                              "60,000 images, by extrapolation 20 to 30 min for 200,000); image_index='approximate' "
                              "(--image-index approximate) takes a fraction of that", stacklevel=2)
            phash = f["phash"].fillna(0).to_numpy(np.int64)
            cl = image_clusters(phash, thumbs, has_image, settings.max_hamming, settings.neighbours,
                                settings.min_agreement, index=index)
            clusters, score = cl.labels, cl.score
            method = f"perceptual hash + thumbnail neighbours ({'exact' if index == 'exact' else 'approximate: faiss IVF'})"
        elif f["image_key"].notna().any():
            # text-only data with an image identity (URL, hash): rows sharing it share the image
            from .caption_duplicates import _group_ids

            clusters = _group_ids([k if isinstance(k, str) and k else None for k in f["image_key"]])
            score = (clusters >= 0).astype(np.float32)
            method = "equal image key"
        else:
            score = np.full(n, np.nan)
            method = "none: no images and no image key"
        rows["image_cluster"] = clusters
        rows["is_image_duplicates_issue"] = clusters >= 0
        rows["image_duplicates_score"] = score
        sizes = pd.Series(clusters[clusters >= 0]).value_counts()
        info["image_clusters"] = [
            {"cluster": int(c), "size": int(s), "example_rows": [int(r) for r in np.flatnonzero(clusters == c)[:8]],
             "example_captions": [f["caption"].iloc[r] for r in np.flatnonzero(clusters == c)[:3]],
             "example_locations": [rows["location"].iloc[r] for r in np.flatnonzero(clusters == c)[:8]]}
            for c, s in sizes.sort_index().items()]
        summary.append({"check": "image_duplicates", "issues": int((clusters >= 0).sum()),
                        "detail": {"clusters": int(len(sizes)), "largest": int(sizes.max()) if len(sizes) else 0,
                                   "method": method}})

    if "caption_duplicates" in settings.checks:
        from .caption_duplicates import caption_groups

        sig = np.stack([np.frombuffer(b, np.uint32) for b in f["minhash"]]) if n else np.zeros((0, 64), np.uint32)
        trunc = [t if isinstance(t, str) else None for t in f["caption_truncated"]]
        g = caption_groups(norm, trunc, sig, settings.caption_jaccard)
        rows["exact_caption_group"] = g.exact
        rows["truncation_caption_group"] = g.truncation
        rows["near_caption_group"] = g.near
        issue = (g.exact >= 0) | (g.truncation >= 0) | (g.near >= 0)
        rows["is_caption_duplicates_issue"] = issue
        rows["caption_duplicates_score"] = g.near_score
        info["caption_groups"] = _caption_group_info(f, g)
        summary.append({"check": "caption_duplicates", "issues": int(issue.sum()), "detail": {
            "exact_groups": int(g.exact.max() + 1), "truncation_groups": int(g.truncation.max() + 1),
            "near_groups": int(g.near.max() + 1)}})

    if "triggers" in settings.checks:
        from .triggers import find_triggers

        tp = find_triggers(norm, clusters, settings.min_support, settings.min_purity, settings.max_n)
        rows["is_triggers_issue"] = tp.row_flag
        rows["triggers_score"] = tp.row_score
        info["triggers"] = tp.table.to_dict("records")
        if not (clusters >= 0).any() and f["image_key"].notna().any():
            info["shared_phrases"] = _shared_phrases(norm, f["image_key"], settings)
        summary.append({"check": "triggers", "issues": int(tp.row_flag.sum()),
                        "detail": {"phrases": int(len(tp.table)),
                                   "note": "" if (clusters >= 0).any() else "no image clusters: no trigger can be found"}})

    if "memorization" in settings.checks:
        s = f["memorization_score"].to_numpy(float)
        ok = np.isfinite(s)
        thr = settings.memorization_threshold
        if thr is None and ok.any():
            med = float(np.median(s[ok]))
            mad = float(np.median(np.abs(s[ok] - med))) * 1.4826
            thr = med + 3 * mad
        rows["memorization_score"] = s
        rows["is_memorization_issue"] = ok & (s > thr) if thr is not None else np.zeros(n, bool)
        qs = np.quantile(s[ok], [0, 0.25, 0.5, 0.75, 0.95, 0.99, 1]).tolist() if ok.any() else []
        summary.append({"check": "memorization", "issues": int(rows["is_memorization_issue"].sum()),
                        "detail": {"threshold": thr, "quantiles_0_25_50_75_95_99_100": qs}})

    result = ScanResult(asdict(settings), source, rows, pd.DataFrame(summary), info)
    if has_image.any():
        result.thumbs = [thumbs[i] if has_image[i] else None for i in range(n)]  # views: no copy
        # what trigger verification compares generations with: the dataset's mean thumbnail and,
        # per trigger cluster, its members' median (the layout they share, without their objects)
        result.images["mean"] = mean_thumbnail(result.thumbs)
        # the trigger clusters first, then the largest others (audit shows them beside flagged prompts)
        wanted = {int(t["cluster"]) for t in info.get("triggers", [])}
        wanted |= {int(c["cluster"]) for c in sorted(info.get("image_clusters", []), key=lambda c: -c["size"])[:MAX_CLUSTER_IMAGES]}
        for cid in sorted(wanted):
            members = np.stack([result.thumbs[i] for i in np.flatnonzero(clusters == cid)]).astype(np.float32)
            result.images[f"cluster_{cid}"] = np.median(members, 0).round().astype(np.uint8)
    return result


def mean_thumbnail(thumbs: list, chunk: int = 65536) -> np.ndarray:
    """The mean of the rows' uint8 thumbnails (None: no image), summed a chunk at a time: one float32
    stack of them all is 12 KB a row, 12 GB for a million images, beside the clustering's copies."""
    valid = [t for t in thumbs if t is not None]
    total = np.zeros(valid[0].shape, np.float64)
    for i in range(0, len(valid), chunk):
        total += np.stack(valid[i : i + chunk]).sum(0, dtype=np.float64)
    return (total / len(valid)).round().astype(np.uint8)


def _shared_phrases(norm, image_keys, settings: ScanSettings) -> list[dict]:
    """Text-only data: phrases shared by >= min_support distinct captions, with the image host
    (URL domain) most of them come from. Not a trigger verdict, since no image was compared, but
    LAION's template duplicates (one site's product shots or cover art) show up as phrases
    concentrated on one host."""
    from urllib.parse import urlparse

    from .caption_duplicates import _group_ids
    from .triggers import find_triggers

    hosts = [(urlparse(k).netloc or k) if isinstance(k, str) and k else None for k in image_keys]
    ids = _group_ids(hosts)
    names = {int(g): h for g, h in zip(ids, hosts) if g >= 0}
    tp = find_triggers(norm, ids, settings.min_support, 0.0, settings.max_n)
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    out = []
    for rec in tp.table.to_dict("records"):
        # a phrase of stop words, numbers or markup remnants ("i" from <i>) says nothing of a template
        if rec["purity"] < 0.5 or not any(len(w) >= 3 and w.isalpha() and w not in ENGLISH_STOP_WORDS
                                          for w in rec["phrase"].split()):
            continue
        rec["host"] = names.get(rec.pop("cluster"), None)
        rec["host_share"] = rec.pop("purity")
        out.append(rec)
    return out


def _caption_group_info(f, g, top: int = 20) -> dict:
    out = {}
    for kind, ids in (("exact", g.exact), ("truncation", g.truncation), ("near", g.near)):
        groups = []
        for gid in range(min(top, int(ids.max()) + 1)):
            members = np.flatnonzero(ids == gid)
            groups.append({"group": gid, "size": int(len(members)), "example_rows": members[:5].tolist(),
                           "example_captions": list(dict.fromkeys(f["caption"].iloc[members]))[:3]})
        out[kind] = groups
    return out
