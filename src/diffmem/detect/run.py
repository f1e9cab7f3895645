"""Scoring a prompt file: the work behind ``diffmem detect``.

The file is checked whole before any scoring (so a bad line 9,000 fails in a second, not after an
hour); prompts are then streamed in chunks and written incrementally to a temporary file that is
renamed into place only when every prompt is scored. Memory does not grow with the prompt count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.prompts import iter_prompts
from ..core.results import atomic_path
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

    def line(self) -> str:
        base = f"scored {self.n_prompts} prompts in {self.seconds:.1f}s -> {self.out}"
        if self.threshold is None:
            return (f"{base}; scores median {self.score_median:.4g}, max {self.score_max:.4g} "
                    "(no calibration: pass --calibration or --calibrate-with for verdicts)")
        return f"{base}; {self.n_flagged} flagged as memorized (score > {self.threshold:.4g})"


def detect_file(detector, prompts_path: str | Path, out: str | Path, column: str | None = None,
                calibration: Calibration | None = None, chunk: int = 1024, progress: bool = True) -> DetectSummary:
    out = Path(out)
    if out.suffix not in (".parquet", ".json"):
        raise InputError(f"results file must end in .parquet or .json, got {out.name}")
    n = sum(1 for _ in iter_prompts(prompts_path, column))  # validates every line first
    from tqdm.auto import tqdm

    t0 = time.time()
    bar = tqdm(total=n, desc="scoring", unit="prompt", disable=not progress)
    scores_seen: list[np.ndarray] = []
    flagged = 0

    def scored():
        nonlocal flagged
        for buf in _chunks(iter_prompts(prompts_path, column), chunk):
            res = detector.score(buf)
            if calibration is not None:
                res = calibration.apply(res)
                flagged += int(res.verdicts.sum())
            scores_seen.append(np.asarray(res.scores, np.float32))
            bar.update(len(buf))
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
            parts = list(scored())
            DetectionResult([p for r in parts for p in r.prompts], np.concatenate([r.scores for r in parts]),
                            np.concatenate([r.values for r in parts]), parts[0].settings, parts[0].seeds,
                            parts[0].method, parts[0].model, parts[0].threshold, parts[0].calibration).save(out)
    finally:
        bar.close()
    allscores = np.concatenate(scores_seen)
    return DetectSummary(n, flagged if calibration else None, calibration.threshold if calibration else None,
                         time.time() - t0, out, float(allscores.min()), float(np.median(allscores)), float(allscores.max()))


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
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(res.to_frame(), preserve_index=False)
    if writer is None:
        meta = dict(table.schema.metadata or {})
        meta[b"diffmem"] = json.dumps({**res._meta(), "values_shape": [-1, *res.values.shape[1:]]}).encode()
        writer = pq.ParquetWriter(path, table.schema.with_metadata(meta))
    writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
    return writer
