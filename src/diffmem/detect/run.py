"""Scoring a prompt file: the work behind ``diffmem detect``.

The file is checked whole before any scoring (so a bad line 9,000 fails in a second, not after an
hour); prompts are then streamed in chunks and written incrementally to a temporary file that is
renamed into place only when every prompt is scored. Memory does not grow with the prompt count.

Each scored chunk is also saved beside the output (``OUT.parts/``, a ``.done`` marker written
last), so a killed run resumes at the first unsaved chunk; the parts go once the output is in
place. Parts from another model, other settings, another calibration, other prompts or another
revision of the method are refused, never mixed in.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core import denoise
from ..core.errors import InputError
from ..core.prompts import ensure_not_an_input, iter_prompts
from ..core.results import atomic_path, atomic_write_text, digest, folder_held, revision_key, to_jsonable
from .calibration import Calibration
from .noise_norm import DetectionResult


@dataclass
class DetectSummary:
    n_prompts: int
    n_flagged: int | None
    threshold: float | None
    seconds: float
    out: Path
    score_min: float
    score_median: float
    score_max: float
    n_truncated: int = 0
    scores: np.ndarray | None = field(default=None, repr=False)  # every prompt's score, in file order
    method: str = "noise_norm"  # the detector's, which names the histogram's axis

    def plot(self, path: str | Path, reference=None, caption: str = "") -> Path:
        """The scores' histogram against the threshold, and the reference scores it was fitted on if given."""
        from .plot import score_figure

        if self.scores is None:
            raise InputError("this summary holds no scores to draw")
        fig = score_figure(self.scores, self.threshold, reference, caption, method=self.method)
        fig.savefig(path, dpi=120)
        return Path(path)

    def line(self) -> str:
        base = f"scored {self.n_prompts} prompt{'s' if self.n_prompts != 1 else ''} in {self.seconds:.1f}s -> {self.out}"
        if self.n_truncated:
            base += f" ({self.n_truncated} longer than the model reads, scored on their first tokens: column truncated)"
        if self.threshold is None:
            return (f"{base}; scores median {self.score_median:.4g}, max {self.score_max:.4g} "
                    "(no calibration: pass --calibration or --calibrate-with for verdicts)")
        return f"{base}; {self.n_flagged} flagged as memorized (score > {self.threshold:.4g})"


def detect_file(detector, prompts_path: str | Path, out: str | Path, column: str | None = None,
                calibration: Calibration | None = None, chunk: int = 256, progress: bool = True) -> DetectSummary:
    out = Path(out)
    if out.suffix not in (".parquet", ".json"):
        raise InputError(f"results file must end in .parquet or .json, got {out.name}")
    ensure_not_an_input(out, prompts=prompts_path)
    # one pass before any scoring: validates every line, counts them and keys each chunk's saved scores
    base = run_identity(detector, calibration)
    n, keys = 0, []
    for buf in _chunks(iter_prompts(prompts_path, column), chunk):
        n += len(buf)
        keys.append(digest({**base, "prompts": buf}))
    parts = out.with_name(out.name + ".parts")
    # held while scoring: a second run into OUT, from another process, would write the same chunks,
    # and the first to finish would remove them under the other
    with folder_held(parts, instead="write to another output file"):
        return _score_in_chunks(detector, prompts_path, column, calibration, chunk, progress, out, parts, keys, n)


def _score_in_chunks(detector, prompts_path, column, calibration, chunk: int, progress: bool, out: Path, parts: Path,
                     keys: list[str], n: int) -> DetectSummary:
    for marker in sorted(parts.glob("chunk_*.done")):
        i = int(marker.stem.removeprefix("chunk_"))
        if i >= len(keys) or marker.read_text() != keys[i]:
            raise InputError(f"{parts} holds scores of another model, other settings or other prompts, or of another "
                             f"diffmem's version of the method ({marker.name}); delete it or write to another output file")
    from tqdm.auto import tqdm

    t0 = time.time()
    bar = tqdm(total=n, desc="scoring", unit="prompt", disable=not progress)
    scores_seen: list[np.ndarray] = []
    flagged = n_truncated = 0

    # the bar moves within a chunk too, for detectors that report their progress: a chunk of full
    # generations (seed consistency's images mode) takes many minutes
    takes_progress = "on_progress" in inspect.signature(detector.score).parameters
    moved = [0]  # prompts of the current chunk the bar has counted

    def within_chunk(size: int) -> dict:
        def on_progress(done: int, total: int) -> None:
            now = size * done // total
            bar.update(now - moved[0])
            moved[0] = now

        return {"on_progress": on_progress} if takes_progress else {}

    def scored():
        nonlocal flagged, n_truncated
        for i, (buf, key) in enumerate(zip(_chunks(iter_prompts(prompts_path, column), chunk), keys)):
            part, marker = parts / f"chunk_{i:06d}.parquet", parts / f"chunk_{i:06d}.done"
            res = None
            if marker.exists():  # scored before an interruption (its key was checked above)
                try:
                    res = DetectionResult.load(part)
                except Exception as e:  # the marker outlived its scores: score the chunk again
                    warnings.warn(f"rescoring {part}: it cannot be read ({type(e).__name__}: {e})", stacklevel=2)
                else:
                    if res.truncated is None:  # saved before results had the column: every part's table must match
                        res.truncated = denoise.truncated(detector.pipe, res.prompts)
            if res is None:
                res = detector.score(buf, **within_chunk(len(buf)))
                if calibration is not None:
                    res = calibration.apply(res)
                res.save(part)
                atomic_write_text(marker, key)  # last: marks the chunk complete
            if res.threshold is not None:
                flagged += int(res.verdicts.sum())
            if res.truncated is not None:
                n_truncated += int(np.sum(res.truncated))
            scores_seen.append(np.asarray(res.scores, np.float32))
            bar.update(len(buf) - moved[0])
            moved[0] = 0
            yield res

    try:
        if out.suffix == ".parquet":
            with atomic_path(out) as tmp:  # rows stream to disk; renamed into place when all are scored
                writer = None
                try:
                    for res in scored():
                        writer = _append_parquet(writer, tmp, res)
                finally:
                    if writer is not None:
                        writer.close()
        else:
            done = list(scored())
            DetectionResult([p for r in done for p in r.prompts], np.concatenate([r.scores for r in done]),
                            np.concatenate([r.values for r in done]), done[0].settings, done[0].seeds,
                            done[0].method, done[0].model, done[0].threshold, done[0].calibration,
                            None if any(r.truncated is None for r in done) else np.concatenate([r.truncated for r in done])
                            ).save(out)
    finally:
        bar.close()
    shutil.rmtree(parts)  # the output holds everything they did
    allscores = np.concatenate(scores_seen)
    return DetectSummary(n, flagged if calibration else None, calibration.threshold if calibration else None,
                         time.time() - t0, out, float(allscores.min()), float(np.median(allscores)), float(allscores.max()),
                         n_truncated, allscores, detector.method)


def run_identity(detector, calibration: Calibration | None) -> dict:
    """What a saved chunk must have been scored with, besides its prompts."""
    from ..core.loading import weights_identity

    s = detector.settings
    return {"method": detector.method, **revision_key(detector),
            "settings": to_jsonable(s.to_dict() if hasattr(s, "to_dict") else s),
            "seeds": s.seeds() if hasattr(s, "seeds") else detector.seeds(),
            "model": weights_identity(detector.pipe),
            "threshold": calibration.threshold if calibration is not None else None}


def _chunks(it, size):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _append_parquet(writer, path: Path, res: DetectionResult):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(res.to_frame(), preserve_index=False)
    if writer is None:
        meta = dict(table.schema.metadata or {})
        meta[b"diffmem"] = json.dumps({**res._meta(), "values_shape": [-1, *res.values.shape[1:]]}).encode()
        writer = pq.ParquetWriter(path, table.schema.with_metadata(meta))
    writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
    return writer
