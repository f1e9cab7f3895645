"""Saved parts of a long job: a part folder is complete when its ``done.json`` (written last)
names the key of the work it holds, so a killed run redoes only parts without a matching marker."""

from __future__ import annotations

import json
import re
import shutil
import warnings
import weakref
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import InputError
from .results import dump_json, hold_folder, let_go_folder


def saved_key(part: Path) -> str | None:
    """The key a part was completed with, or None (no marker: killed while saving, or never done)."""
    try:
        return json.loads((Path(part) / "done.json").read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def in_parts(chunks: Sequence[list], keys: Sequence[str], folder: str | Path, compute: Callable, save: Callable,
             load: Callable, prefix: str = "part", stale: str = "refuse", what: str = "saved work") -> Iterator:
    """An iterator over ``compute(chunk)`` for each chunk, in order: read back with ``load(part)`` from
    ``folder/{prefix}_NNNN`` when that part's marker names the chunk's key, else computed, written
    with ``save(part, result)`` and marked (the marker last, so a kill mid-write redoes the part).

    Checked now, before any work: a part completed under another key, or left beyond the chunks by a
    longer list, is refused with ``what`` in the message (``stale="refuse"``: the folder is the
    user's) or redone (``"restart"``: callers that own the folder). Unmarked leftovers are removed.
    A part marked with the chunk's key whose files cannot be read back is redone, with a warning.
    """
    if stale not in ("refuse", "restart"):
        raise InputError(f"stale must be 'refuse' or 'restart', got {stale!r}")
    folder = Path(folder)
    # held from now until the iterator ends, or is closed or dropped unfinished: a second run into
    # the folder, from another process, would write the same parts at once
    hold = hold_folder(folder)
    try:
        parts_iter = _in_parts(chunks, keys, folder, compute, save, load, prefix, stale, what)
    except BaseException:
        let_go_folder(hold)
        raise

    def held():
        try:
            yield from parts_iter
        finally:
            let_go()

    gen = held()
    let_go = weakref.finalize(gen, let_go_folder, hold)  # once: on its end, its close, or its collection
    return gen


def _in_parts(chunks, keys, folder: Path, compute, save, load, prefix, stale, what) -> Iterator:
    parts = [folder / f"{prefix}_{i:04d}" for i in range(len(chunks))]
    saved = [saved_key(p) for p in parts]
    extra = sorted(p for p in folder.glob(f"{prefix}_*") if p not in parts) if folder.is_dir() else []
    if stale == "refuse":
        wrong = [p.name for p, old, key in zip(parts, saved, keys) if old is not None and old != key]
        wrong += [p.name for p in extra if saved_key(p) is not None]
        if wrong:
            raise InputError(f"{folder} holds {what} ({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}); "
                             "use another output folder or delete it")
    for p in extra:  # left by a longer list: they would confuse the next resume
        shutil.rmtree(p)

    def run():
        for chunk, part, key, old in zip(chunks, parts, keys, saved):
            if old == key:
                try:
                    kept = load(part)  # finished before an interruption: kept as it is
                except Exception as e:  # its marker outlived its files: the part is this job's, so redo it
                    warnings.warn(f"redoing {part}: its saved files cannot be read ({type(e).__name__}: {e})",
                                  stacklevel=2)
                else:
                    yield kept
                    continue
            result = compute(chunk)
            (part / "done.json").unlink(missing_ok=True)  # a crash mid-write must not leave the old marker
            part.mkdir(parents=True, exist_ok=True)
            save(part, result)
            dump_json({"key": key, "prompts": list(chunk)}, part / "done.json")
            yield result

    return run()


_PART_NAME = re.compile(r".+_\d{4,}")  # in_parts' folders: {prefix}_NNNN


def remove_parts(folder: str | Path) -> None:
    """Remove a finished job's parts from ``folder``, and the folder once empty. Only the part folders
    go: an output folder chosen by the user may already hold a ``parts`` folder of its own."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_dir() and _PART_NAME.fullmatch(p.name):
            shutil.rmtree(p)
    if not any(folder.iterdir()):
        folder.rmdir()
