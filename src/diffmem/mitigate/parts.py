"""Mitigating many prompts in saved parts, so that a killed run redoes at most one part.

Each part (``part_size`` prompts) is mitigated and saved under ``folder/part_NNNN`` with a
``done.json`` written last; a re-run keeps every part whose ``done.json`` names the same method,
settings, seeds, model and prompts. The settings hold the method's revision, so parts saved by a
diffmem whose method gave other outputs (RNA's numbers drawn from another range, say) are not kept.
Every method draws its randomness per prompt (from the seed and the prompt's text), so a prompt's
mitigation does not depend on the part it falls in; only the generation batches differ from an
unsplit run, which can move the images in the last bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..core.errors import InputError
from ..core.parts import in_parts
from ..core.results import digest
from .result import MitigationResult

PART_SIZE = 8  # prompts per saved part: the unit a killed run redoes


def part_key(method, prompts: Sequence[str]) -> str:
    """What a saved part must match to be reused: the method, its settings (its revision included)
    and seeds, the model (identity and dtype) and the part's prompts."""
    from ..core.loading import weights_identity

    return digest({"method": method.method, "settings": method.settings, "seeds": method.seeds(),
                   "model": weights_identity(method.pipe), "prompts": list(prompts)})


def mitigate_in_parts(method, prompts: Sequence[str], folder: str | Path, part_size: int = PART_SIZE,
                      progress: bool = False, stale: str = "refuse", batch_size: int = 64) -> MitigationResult:
    """``method.mitigate(prompts)`` (images included), ``part_size`` prompts at a time, each part
    saved in ``folder``. Parts are not measured: callers measure the joined result
    (``report.apply_measures``), so a resumed run never mixes two runs' measures.

    A part saved by another method, settings, model or prompt list is never mixed in:
    ``stale="refuse"`` stops with an error before any work (the folder is the user's),
    ``"restart"`` redoes it (for callers that own the folder, as the audit does).
    """
    from tqdm.auto import tqdm

    from ..detect.noise_norm import check_prompts

    if part_size < 1:
        raise InputError(f"part_size must be at least 1, got {part_size}")
    prompts = check_prompts(prompts)
    chunks = [prompts[i : i + part_size] for i in range(0, len(prompts), part_size)]

    def compute(chunk):
        return method.mitigate(chunk, generate_images=True, batch_size=batch_size)

    parts = in_parts(chunks, [part_key(method, c) for c in chunks], folder, compute, save=lambda part, r: r.save(part),
                     load=MitigationResult.load, stale=stale, what="mitigation parts of other prompts, settings or another model, "
                     "or of an earlier diffmem's version of the method")
    results = []
    with tqdm(total=len(prompts), desc="mitigating", unit="prompt", disable=not progress) as bar:
        for chunk, r in zip(chunks, parts):
            results.append(r)
            bar.update(len(chunk))
    return MitigationResult.concat(results)
